"""`python -m experiments.report`: see the package's docstring."""
import sys

from experiments.report import main

sys.exit(main())
