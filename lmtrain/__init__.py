"""lmtrain: train decoder-only language models with PyTorch, from a laptop to a Slurm GPU cluster."""

__version__ = "0.1.0"
