# The two commands of the README: `make demo` and `make test`. Each creates .venv and installs edgetl
# into it first (again only when pyproject.toml changed since the last install).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Two pytest workers, each taking whole files (module fixtures stay shared within a file): most of the suite's
# time is single-threaded conversion and subprocess start-up, so two processes fill a two-core machine
PYTEST_ARGS ?= -m "not slow" -n 2 --dist loadfile

.PHONY: setup setup-all demo test lint clean

# The demo needs the torch stack only; the tests cover the keras backend too.
$(VENV)/.installed-torch: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[torch,dev]'
	touch $@

$(VENV)/.installed-all: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[all]'
	touch $@ $(VENV)/.installed-torch

setup: $(VENV)/.installed-torch

setup-all: $(VENV)/.installed-all

demo: setup
	$(BIN)/edgetl demo

test: setup-all
	$(BIN)/ruff check .
	$(BIN)/pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
