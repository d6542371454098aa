# The two commands of the README: `make demo` and `make test`. Each creates .venv and installs edgetl
# into it first (only when pyproject.toml changed since the last install).
comma := ,
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?= torch,dev
PYTEST_ARGS ?= -m "not slow"

.PHONY: setup demo test lint clean

STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

setup: $(STAMP)

demo: setup
	$(BIN)/edgetl demo

test: setup
	$(BIN)/ruff check .
	$(BIN)/pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
