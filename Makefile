# Two entry points on a fresh machine: `make demo` and `make test`.
# Each creates .venv (once) and installs what it needs into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP_RUN := $(VENV)/.installed-run
STAMP_TEST := $(VENV)/.installed-test

.PHONY: demo test lint pytest clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP_RUN): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(STAMP_TEST): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@ $(STAMP_RUN)

demo: $(STAMP_RUN)
	$(BIN)/insightv demo --preset tiny

lint: $(STAMP_TEST)
	$(BIN)/ruff check insightv_jax tests
	$(BIN)/ruff format --check insightv_jax tests

# mimalloc preloaded as `insightv` does (insightv_jax/allocator.py): fewer page faults per XLA step
pytest: $(STAMP_TEST)
	LD_PRELOAD="$$($(BIN)/python -m insightv_jax.allocator) $$LD_PRELOAD" \
		$(BIN)/python -m pytest --durations=15 $(PYTEST_ARGS)

test: lint pytest

clean:
	rm -rf $(VENV) .pytest_cache
