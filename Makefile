# rlx: `make demo` trains the default recipe on the embedded tiny model; `make test` runs the suite.
# Both create .venv on first use. TORCH_SPEC picks the torch build (default: the CPU wheel).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rlx-installed

export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY ?= 1
export TRL_EXPERIMENTAL_SILENCE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-fast lint bench mutants clean

setup: $(STAMP)

# torch first, then everything else with torch held by a constraints file, so no resolver step can
# replace it with a multi-GB CUDA build.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m rlx.demo

test: $(STAMP)
	$(PY) -m pytest -q -ra

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow and not distributed"

lint: $(STAMP)
	$(PY) -m ruff check rlx analysis benchmarks tests
	$(PY) -m ruff format --check rlx analysis benchmarks tests

bench: $(STAMP)  ## benchmarks run with OMP_NUM_THREADS=1 unless set
	$(PY) -m benchmarks.run all

# Mutation testing of the math (docs/testing.md); not part of `make test`, and long (hours for everything on 2
# cores). MUTANTS narrows it by mutant name, e.g. make mutants MUTANTS='rlx.alignment.functional.*'; results persist
# in mutants/ and only changed code is re-checked. One OpenMP thread per worker: mutmut forks workers from a
# process that has imported torch, and a forked OpenMP thread pool can hang.
MUTANTS ?=
MUTANT_JOBS ?= 2
mutants: $(STAMP)
	-OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children $(MUTANT_JOBS) $(MUTANTS)
	$(PY) scripts/mutation_score.py

clean:
	rm -rf runs .rlx_cache mutants
