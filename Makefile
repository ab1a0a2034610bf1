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
PYTEST_ARGS ?=

.PHONY: help setup test test-fast lint format train bench clean submit dry-run status logs cancel report ablation sweep resume

EXP ?= smoke
CLUSTER ?= clariden

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(PY):
	python3 -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	@# A container that already ships torch keeps it; elsewhere install the pinned CPU-capable wheel first
	@# so that the `torch>=2.4` requirement does not pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

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

train: setup  ## the main job: build the embedded corpus, train the tiny preset on CPU, sample from it
	$(PY) -m lmtrain.main_job $(ARGS)

bench: setup  ## run every benchmark (each prints a ratio against a baseline from the same run)
	@for b in $$($(PY) -c "from lmtrain.bench import available; print(' '.join(available()))"); do \
	  echo "== lmtrain bench $$b"; $(PY) -m lmtrain bench $$b || exit 1; done

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
