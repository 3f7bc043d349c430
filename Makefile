# The two commands a fresh machine needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test lint typecheck unit

$(STAMP): pyproject.toml backend/training/requirements_training.txt requirements-service.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r backend/training/requirements_training.txt -r requirements-service.txt -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/safetrain up --demo-model

lint: setup
	$(BIN)/ruff check backend tests benchmarks
	$(BIN)/lint-imports

typecheck: setup
	$(BIN)/mypy backend

unit: setup
	$(BIN)/pytest -q -p no:cacheprovider

test: lint typecheck unit
