# Two commands on a fresh clone (only python3 and make needed):
#   make run     create .venv and run pushsvc on the embedded default (SQLite, in-process broker)
#   make check   create .venv and run the whole check: ruff, ruff format, mypy, pytest
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: run check lint test bench clean

$(STAMP): setup.cfg pyproject.toml tests/example_plugin/setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,redis]' ./tests/example_plugin
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/pushsvc serve --dev

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

check: lint test

bench: $(STAMP)
	bench/peers.sh

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
