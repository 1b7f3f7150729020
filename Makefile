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

# The CPU build of jax; on an accelerator, `pip install -e ".[cuda13]"` (or cuda12, tpu).
$(STAMP_RUN): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[cpu]"
	touch $@

$(STAMP_TEST): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[cpu,test]"
	touch $@ $(STAMP_RUN)

demo: $(STAMP_RUN)
	$(BIN)/insightv demo --preset tiny

lint: $(STAMP_TEST)
	$(BIN)/ruff check insightv_jax tests
	$(BIN)/ruff format --check insightv_jax tests

# mimalloc preloaded as `insightv` does (insightv_jax/allocator.py): fewer page faults per XLA step.
# Two pytest workers (one per core of CI's machine), a test file's tests on one worker (their
# module fixtures are built once), files in collection order: the longest first
# (tests/conftest.py); PYTEST_WORKERS=0 runs in one process.
PYTEST_WORKERS ?= 2
pytest: $(STAMP_TEST)
	LD_PRELOAD="$$($(BIN)/python -m insightv_jax.allocator) $$LD_PRELOAD" \
		$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder \
		--durations=15 $(PYTEST_ARGS)

test: lint pytest

clean:
	rm -rf $(VENV) .pytest_cache

# The peer of `insightv bench rl`: Google's Tunix GRPO learner in a virtualenv of its
# own (it pins other transformers/tokenizers/safetensors than ours), run by the bench
# as `.venv-tunix/bin/python launch/peers/tunix_grpo_round.py` (launch/peers/README.md).
# tunix leaves jax and flax open: pinned to the versions the peer script was checked with.
TUNIX_VENV := .venv-tunix
TUNIX_PINS := google-tunix==0.1.7 jax==0.10.2 jaxlib==0.10.2 flax==0.12.8

.PHONY: tunix-peer
tunix-peer: $(TUNIX_VENV)/.installed

$(TUNIX_VENV)/.installed:
	$(PY) -m venv $(TUNIX_VENV) && $(TUNIX_VENV)/bin/pip install --quiet $(TUNIX_PINS)
	touch $@
