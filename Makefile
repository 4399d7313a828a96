# The two commands of README.md: `make search` and `make test`. Both install first (torch pinned, then the project).
PYTHON ?= python3
PIP_QUIET ?= -q

.PHONY: install search test

install:
	$(PYTHON) -m pip install $(PIP_QUIET) torch==2.13.0
	$(PYTHON) -m pip install $(PIP_QUIET) -e ".[test]"

search: install
	$(PYTHON) -m experiments.rnn_search with smoke

test: install
	$(PYTHON) -m pytest -q
