# The two commands of the README: `make demo` and `make test`. Each creates .venv and installs edgetl
# into it first (again only when pyproject.toml changed since the last install).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?= -m "not slow"

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
