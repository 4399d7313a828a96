# The two commands of README.md: `make search` and `make test`. Both install first (torch pinned, then the project).
PYTHON ?= python3
# Not PIP_QUIET: make exports a variable set on its command line, and pip reads PIP_QUIET=-q as a bad value.
PIP_FLAGS ?= -q

.PHONY: install search lint test

install:
	$(PYTHON) -m pip install $(PIP_FLAGS) torch==2.13.0
	$(PYTHON) -m pip install $(PIP_FLAGS) -e ".[test]"

search: install
	$(PYTHON) -m experiments.rnn_search with smoke

lint: install
	$(PYTHON) -m ruff check .

test: install lint
	$(PYTHON) -m pytest -q
