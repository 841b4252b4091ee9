# The README's two quick-start commands: `make demo` and `make test`.
# Each works on a fresh machine with only Python 3: it makes .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck bench clean polars-matrix

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/healthimaging-df demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q -n 2  # both cores: the suite takes about 5 minutes, not 10

# The Polars source against every supported Polars version (the serialised expression format
# changes between them): a venv each under .venvs/, PyPI only, the project from this checkout.
POLARS_VERSIONS ?= 1.26.0 1.33.0 1.39.3 1.44.2 2.1.0
POLARS_DEPS := cloudpickle pandas pyarrow numpy orjson python-dateutil tqdm boto3 werkzeug \
	pytest hypothesis dicomweb-client pydicom requests
polars-matrix:
	@set -e; for v in $(POLARS_VERSIONS); do \
	  venv=.venvs/polars-$$v; \
	  test -x $$venv/bin/python || $(PYTHON) -m venv $$venv; \
	  $$venv/bin/python -m pip install --quiet --disable-pip-version-check "polars==$$v" $(POLARS_DEPS); \
	  echo "polars $$v:"; \
	  AHI_POLARS_EXAMPLES=6 PYTHONPATH=$(CURDIR) $$venv/bin/python -m pytest -q -p no:cacheprovider \
	    tests/polars/test_translate.py tests/polars/test_scan.py; \
	done

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .venvs .pytest_cache .mypy_cache .ruff_cache .hypothesis
