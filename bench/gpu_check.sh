#!/usr/bin/env bash
# PYTHONPATH=. bench/gpu_check.sh [--dry-run] [--steps 6] [--configs baseline,fused,compile,seq4096]
#
# The course's 8B experiments on one GPU (baseline, fused AdamW, fused + torch.compile, sequence 4096)
# in bf16: tokens/s, TFLOP/s, MFU, peak memory against lmtrain's estimate, the roofline bound, the top
# kernels and the FFN GEMMs' TFLOP/s. Needs only python3 with torch (transformers, pyarrow, pyyaml and
# rich for lmtrain itself); downloads nothing. Results go to $OUT when set, else runs/gpu-check.
# Exits with code 3 at once when no CUDA GPU is visible; --dry-run runs the pipeline on CPU (tiny model).
# About 5 minutes on one H100/H200 (8 at most: --budget-s stops starting new configurations).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$repo"
exec "${PYTHON:-python3}" "$repo/bench/_gpu_check.py" "$@"
