# The two commands of the README's "Run it": `make demo` and `make test` (and `make docs`).
# Each builds its own virtual environment (.venv) with only Python 3.10+ and pip.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

# The declared minimum versions (pyproject's jax>=0.6.0, optax>=0.2.5), installed exactly in their
# own environment: `make test` runs the drop-in, reference and eager tests there too.
MIN_VENV ?= .venv-min
MIN_PINS := jax==0.6.0 jaxlib==0.6.0 optax==0.2.5
MIN_TESTS := tests/test_optax_dropin.py tests/test_reference.py tests/test_eager.py

.PHONY: demo test test-min lint docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.examples: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[examples]"
	touch $@

$(VENV)/.docs: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[docs]"
	touch $@

$(VENV)/.test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@ $(VENV)/.examples $(VENV)/.docs

demo: $(VENV)/.examples
	$(BIN)/python -m rmsprop_jax.demo $(ARGS)

lint: $(VENV)/.test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/mypy
	$(BIN)/python -m pytest -n 2 --doctest-modules --nbmake src/rmsprop_jax tests notebooks $(ARGS)
	$(MAKE) test-min

$(MIN_VENV)/.min: pyproject.toml
	rm -rf $(MIN_VENV)
	$(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install -q --upgrade pip
	$(MIN_VENV)/bin/python -m pip install -q $(MIN_PINS) "pytest>=8" "pytest-xdist>=3.5" "hypothesis>=6.100"
	$(MIN_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $@

test-min: $(MIN_VENV)/.min
	$(MIN_VENV)/bin/python -c "import jax, optax; assert (jax.__version__, optax.__version__) == ('0.6.0', '0.2.5')"
	$(MIN_VENV)/bin/python -m pytest -n 2 -p no:cacheprovider $(MIN_TESTS)

# The API reference site, from the docstrings; warnings (a broken reference too) are errors.
docs: $(VENV)/.docs
	$(BIN)/python -m sphinx -W --keep-going -b html docs docs/_build/html
	@echo "open docs/_build/html/index.html"

clean:
	rm -rf $(VENV) $(MIN_VENV) .pytest_cache docs/_build dist
