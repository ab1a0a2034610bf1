"""Slurm launchers (submitit), cluster profiles (`clusters/*.yaml`) and experiments (`experiments/*.yaml`).

    python -m jobs.submit --exp smoke --cluster local --dry-run     # what `make dry-run EXP=smoke` runs

Checkout-only: run from the repository root (the Makefile's submit/dry-run/status/logs targets); the
wheel does not install it, since experiments point at the checkout's `toml_envs/` and data. May import
everything below it (`lmtrain`, `lmtrain.profiling`, `lmtrain.tools`). A new experiment is a YAML file
in `experiments/`; a new cluster a profile in `clusters/` (and its container files in `toml_envs/`).
"""
