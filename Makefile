# alignx-jax developer commands. Everything installs into .venv; `make install` is idempotent.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export XLA_PYTHON_CLIENT_PREALLOCATE ?= false

.PHONY: install test test-fast demo demo-quick clean tokenizer bench

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: install
	$(PY) -m pytest -q tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

demo: install
	$(VENV)/bin/alignx demo --out runs/demo

demo-quick: install
	$(VENV)/bin/alignx demo --quick --out runs/demo-quick

tokenizer: install
	$(PY) scripts/build_tokenizer.py --out alignx_jax/assets/tokenizer

bench: install
	$(PY) benchmarks/dpo_step.py --json runs/bench/dpo_step.json

clean:
	rm -rf $(VENV) runs .pytest_cache
