# lmtrain — every target sets itself up first, so a fresh clone needs only `make train` / `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# Reuse an active virtualenv (e.g. a cluster container's); otherwise create .venv here.
ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := $(CURDIR)/.venv
endif
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lmtrain-installed
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=

.PHONY: help setup test test-fast lint format train bench clean submit dry-run status logs cancel report ablation sweep resume bench-list

EXP ?= smoke
CLUSTER ?= clariden

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(PY):
	python3 -m venv $(VENV)

# torch comes first so that the `torch>=2.4` requirement is already met: a container's torch is kept
# (clusters), a machine with a GPU gets the PyPI build (CUDA), and one without (no nvidia-smi) the CPU
# build from PyTorch's CPU index instead of the multi-GB CUDA build. pip prints its progress (no -q):
# the first set-up downloads a few hundred MB.
$(STAMP): pyproject.toml | $(PY)
	@echo "== set-up 1/2: torch"
	@if $(PY) -c "import torch" 2>/dev/null; then \
	  echo "torch $$($(PY) -c 'import torch; print(torch.__version__)') is already installed; keeping it"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
	  echo "nvidia-smi found: the CUDA build of torch $(TORCH_VERSION) from PyPI"; \
	  $(PY) -m pip install --progress-bar off "torch==$(TORCH_VERSION)"; \
	else \
	  echo "no GPU (no nvidia-smi): the CPU build of torch $(TORCH_VERSION) from $(TORCH_CPU_INDEX)"; \
	  $(PY) -m pip install --progress-bar off --index-url $(TORCH_CPU_INDEX) "torch==$(TORCH_VERSION)"; \
	fi
	@echo "== set-up 2/2: lmtrain and its requirements (editable, with the test extras)"
	$(PY) -m pip install --progress-bar off -e ".[test]"
	@touch $(STAMP)
	@echo "== set-up done: run \`source $(VENV)/bin/activate\` to put lmtrain on PATH in this shell"

setup: $(STAMP)  ## create the virtualenv and install lmtrain with its test extras

test: setup  ## run the whole test suite (the CI command)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup  ## run the tests that are not marked slow
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: setup  ## ruff format check + lint
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .

format: setup  ## apply ruff formatting and safe fixes
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

train: setup  ## the main job (< 5 min on 2 cores): build the corpus, train the tiny preset on CPU, sample
	$(PY) -m lmtrain.main_job $(ARGS)

bench: setup  ## run every benchmark (each prints a ratio against a baseline from the same run)
	@for b in $$($(PY) -c "from lmtrain.bench import available; print(' '.join(available()))"); do \
	  echo "== lmtrain bench $$b"; $(PY) -m lmtrain bench $$b || exit 1; done

bench-list: setup  ## list the benchmarks (`lmtrain bench --help`)
	@$(PY) -m lmtrain bench --help

# The job targets run without echoing the command, so that lmtrain's own error line is the last line
# before make's "Error 2".
submit: setup  ## submit an experiment: make submit EXP=fused [CLUSTER=clariden] [ARGS="key=value ... --wait"]
	@$(PY) -m jobs.submit --exp $(EXP) --cluster $(CLUSTER) $(ARGS)

dry-run: setup  ## print the sbatch script, EDF and command of an experiment without submitting
	@$(PY) -m jobs.submit --exp $(EXP) --cluster $(CLUSTER) --dry-run $(ARGS)

resume: setup  ## continue a run in its own directory from its newest checkpoint: make resume RUN=<run dir>
	@$(PY) -m jobs.submit --resume "$(RUN)" $(ARGS)

status: setup  ## your queued and running jobs, recent submissions, and why a failed one failed
	@$(PY) -m jobs.status

logs: setup  ## a run's logs: make logs EXP=fused | RUN=<run dir> [RANK=1|all] [ERR=1 | BOTH=1]
	@$(PY) -m jobs.logs $(if $(RUN),--run "$(RUN)",--exp $(EXP)) $(if $(RANK),--rank $(RANK)) $(if $(ERR),--err) $(if $(BOTH),--both)

cancel: setup  ## cancel a job: make cancel JOB=12345
	@$(PY) -m jobs.cancel $(JOB)

report: setup  ## nsys export + GEMM report of the newest profiled run: make report EXP=profile
	@$(PY) -m jobs.report --exp $(EXP)

ablation: setup  ## the 7-run ablation study: make ablation [STEPS=300] [CLUSTER=local|clariden]
	$(PY) -m jobs.ablation $(if $(filter command line,$(origin CLUSTER)),--cluster $(CLUSTER)) $(if $(STEPS),--steps $(STEPS)) $(ARGS)

sweep: setup  ## a sweep: make sweep SWEEP=throughput [CLUSTER=...]; SWEEP=precision: the precision study
	$(PY) -m jobs.sweep --sweep $(or $(SWEEP),throughput) $(if $(filter command line,$(origin CLUSTER)),--cluster $(CLUSTER)) $(ARGS)

clean:  ## remove caches (keeps .venv, data/ and runs/)
	rm -rf .pytest_cache .ruff_cache build *.egg-info
