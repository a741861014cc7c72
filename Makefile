# Two commands a student needs: `make tutorial` and `make test`. Both create the environment
# (.venv, Python 3.11) first when it is missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PRESET ?= tiny

.PHONY: tutorial test lint env lab clean-outputs

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "$(PYTHON) not found; install Python 3.11 or run: make PYTHON=python3 ..."; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (llava-lite)" >/dev/null
	@touch $(STAMP)

env: $(STAMP)

## Run every notebook headless with the offline tiny preset; executed copies land in outputs/notebooks/
tutorial: $(STAMP)
	$(BIN)/llava-lite tutorial --preset $(PRESET)

## The test suite: lint and format check, package unit tests, every notebook at smoke size, nbval on the executed copies
test: lint
	$(BIN)/python -m pytest

## ruff: lint and format check of the whole tree (notebooks included); `ruff format .` fixes the format
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

## Open the notebooks in JupyterLab
lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

clean-outputs:
	rm -rf outputs/
