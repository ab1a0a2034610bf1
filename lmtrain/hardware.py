"""Device memory sizes and the precision and strategy names the memory planner accepts.

    python -c "from lmtrain.hardware import DEVICE_MEMORY_MIB; print(DEVICE_MEMORY_MIB['gh200'])"

Kept free of torch so that `lmtrain params --help` and the jobs layer's plan print at once.
"""

from __future__ import annotations

PRECISIONS = ("fp32", "bf16", "fp16", "amp-bf16", "amp-fp16")
STRATEGIES = ("single", "ddp", "fsdp")

# Total memory per device as `nvidia-smi` reports it (MiB), by the short names `--device` accepts.
DEVICE_MEMORY_MIB: dict[str, int] = {
    "gh200": 97_871,  # GH200 with 96 GB HBM3 (clariden)
    "h100": 81_559,  # H100 SXM 80 GB
    "h200": 143_771,  # H200 141 GB HBM3e
    "a100": 81_920,  # A100 80 GB
    "a100-40": 40_960,
}
