"""Slurm launchers (submitit), cluster profiles and experiment configs for lmtrain."""
