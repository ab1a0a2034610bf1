"""lmtrain: train decoder-only language models with PyTorch, from a laptop to a Slurm GPU cluster.

    python -m lmtrain --help

The core: data pipeline (`data/`), BPE tokenizer (`tokenizer/`), the model (`model.py`), the training
loop (`train.py`) with mixed precision, checkpoints, metrics and the run-time profiling hooks
(`nvtx.py`, `profiler.py`). It imports no other folder of the repository: `profiling/` and `tools/`
build on it (linked here as `lmtrain/profiling` and `lmtrain/tools`, installed as those subpackages),
`jobs/` and `bench/` build on all of them; `tests/test_layers.py` keeps it that way. A new component
gets its own module and a small dataclass config in `config.py`; a new command gets a line in
`cli.SUBCOMMANDS` (or, for an analysis tool, an entry in the `lmtrain.commands` group of
pyproject.toml).
"""

__version__ = "0.1.0"
