"""The GPUs lmtrain plans and reports against: dense peak FLOP/s per data type, memory bandwidth and
memory size, plus the precision and strategy names the memory planner accepts.

    python -c "from lmtrain.hardware import device_peaks; print(device_peaks('gh200').tflops('bf16'))"

Every figure is a vendor datasheet's dense peak (2:4 sparse figures halved), in TFLOP/s, for GEMMs of
that input type: `fp64` on FP64 tensor cores where the GPU has them, `tf32` and `bf16`/`fp16`/`fp8` on
tensor cores with fp32 accumulation (what cuBLAS uses for PyTorch; GeForce cards run that at half their
fp16-accumulate rate), `fp32` on the CUDA cores (an `sgemm` without TF32). None where the GPU has no such
unit or the datasheet gives no figure. Bandwidth is device memory (HBM/GDDR), bytes/s.

The bf16/fp32 figures of the devices also in the trainer's MFU table (`lmtrain.metrics.PEAK_TFLOPS`)
are the same numbers (a test checks it). Free of torch, so that `--help`, reports and the jobs layer's
plan start at once. A device that is not in the table is never silently given another device's peak:
callers ask the user.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lmtrain.errors import UserError

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


DTYPES = ("fp64", "tf32", "fp32", "bf16", "fp16", "fp8")


@dataclass(frozen=True)
class DevicePeaks:
    key: str
    """Short name for `--gpu`, e.g. `h100-sxm`."""
    label: str
    """Human-readable name, e.g. `H100 SXM (80 GB HBM3)`."""
    peaks: dict[str, float | None]
    """Dense TFLOP/s per GEMM input type (keys of DTYPES); None when the GPU has no such unit."""
    bandwidth: float
    """Device memory bandwidth, bytes/s."""

    def tflops(self, dtype: str = "bf16") -> float | None:
        return self.peaks.get(dtype)


def _p(fp64, tf32, fp32, bf16, fp16, fp8) -> dict[str, float | None]:
    return dict(zip(DTYPES, (fp64, tf32, fp32, bf16, fp16, fp8)))


# key -> (label, peaks, bandwidth bytes/s)
_TABLE: dict[str, tuple[str, dict[str, float | None], float]] = {
    # NVIDIA V100 datasheet (2020): SXM2 7.8 fp64, 15.7 fp32, 125 tensor (fp16); PCIe 7/14/112; 900 GB/s.
    "v100-sxm2": ("V100 SXM2", _p(7.8, None, 15.7, None, 125.0, None), 900e9),
    "v100-pcie": ("V100 PCIe", _p(7.0, None, 14.0, None, 112.0, None), 900e9),
    # NVIDIA A100 datasheet (2021): fp64 tensor 19.5, tf32 156, bf16/fp16 312, fp32 19.5;
    # 40 GB HBM2 1555 GB/s, 80 GB SXM HBM2e 2039 GB/s, 80 GB PCIe 1935 GB/s.
    "a100-sxm-40gb": ("A100 SXM 40 GB", _p(19.5, 156.0, 19.5, 312.0, 312.0, None), 1555e9),
    "a100-sxm-80gb": ("A100 SXM 80 GB", _p(19.5, 156.0, 19.5, 312.0, 312.0, None), 2039e9),
    "a100-pcie-40gb": ("A100 PCIe 40 GB", _p(19.5, 156.0, 19.5, 312.0, 312.0, None), 1555e9),
    "a100-pcie-80gb": ("A100 PCIe 80 GB", _p(19.5, 156.0, 19.5, 312.0, 312.0, None), 1935e9),
    # NVIDIA A40 datasheet: fp32 37.4, tf32 74.8, bf16/fp16 149.7 (sparse halved), 696 GB/s; no fp64 figure.
    "a40": ("A40", _p(None, 74.8, 37.4, 149.7, 149.7, None), 696e9),
    # NVIDIA L40S datasheet: fp32 91.6, tf32 183, bf16/fp16 362.05, fp8 733 (sparse halved), 864 GB/s.
    "l40s": ("L40S", _p(None, 183.0, 91.6, 362.05, 362.05, 733.0), 864e9),
    # NVIDIA H100 datasheet: SXM fp64 tensor 67, tf32 494.5, bf16/fp16 989.5, fp8 1979, fp32 67, 3.35 TB/s;
    # PCIe 51 / 378 / 756 / 1513 / 51, 2.0 TB/s; NVL 60 / 417.5 / 835.5 / 1670.5 / 60, 3.9 TB/s.
    "h100-sxm": ("H100 SXM (80 GB HBM3)", _p(67.0, 494.5, 67.0, 989.0, 989.0, 1979.0), 3.35e12),
    "h100-pcie": ("H100 PCIe", _p(51.0, 378.0, 51.0, 756.0, 756.0, 1513.0), 2.0e12),
    "h100-nvl": ("H100 NVL", _p(60.0, 417.5, 60.0, 835.5, 835.5, 1670.5), 3.9e12),
    # NVIDIA H200 datasheet: the H100 SXM compute with 141 GB HBM3e at 4.8 TB/s.
    "h200": ("H200 (141 GB HBM3e)", _p(67.0, 494.5, 67.0, 989.0, 989.0, 1979.0), 4.8e12),
    # NVIDIA GH200 datasheet: the H100 SXM compute; 96 GB HBM3 at 4 TB/s or 144 GB HBM3e at 4.9 TB/s.
    "gh200": ("GH200 (96 GB HBM3)", _p(67.0, 494.5, 67.0, 989.0, 989.0, 1979.0), 4.0e12),
    "gh200-144gb": ("GH200 (144 GB HBM3e)", _p(67.0, 494.5, 67.0, 989.0, 989.0, 1979.0), 4.9e12),
    # NVIDIA HGX B200 datasheet, per GPU: fp64 40, tf32 1125, bf16/fp16 2250, fp8 4500 (sparse halved),
    # fp32 80, 8 TB/s HBM3e.
    "b200": ("B200", _p(40.0, 1125.0, 80.0, 2250.0, 2250.0, 4500.0), 8.0e12),
    # Ampere GA102 whitepaper (RTX 3090): fp32 35.6, tf32 17.8, bf16/fp16 with fp32 accumulate 35.6,
    # fp64 0.56, 936 GB/s.
    "rtx3090": ("GeForce RTX 3090", _p(0.56, 17.8, 35.6, 35.6, 35.6, None), 936e9),
    # Ada AD102 whitepaper (RTX 4090): fp32 82.6, tf32 82.6, bf16/fp16 with fp32 accumulate 165.2,
    # fp8 with fp32 accumulate 330.3, fp64 1.29, 1008 GB/s.
    "rtx4090": ("GeForce RTX 4090", _p(1.29, 82.6, 82.6, 165.2, 165.2, 330.3), 1008e9),
    # NVIDIA RTX A5000 datasheet: fp32 27.8, tensor 222.2 sparse (fp16/bf16 dense 111.1, tf32 55.6),
    # 768 GB/s; fp64 1/32 of fp32.
    "rtxa5000": ("RTX A5000", _p(0.87, 55.6, 27.8, 111.1, 111.1, None), 768e9),
}

PEAKS: dict[str, DevicePeaks] = {k: DevicePeaks(k, label, p, bw) for k, (label, p, bw) in _TABLE.items()}

DEFAULT_KEY = "gh200"
"""The reference machine (CSCS clariden), for callers that need a reference without a trace."""

# CUDA device-name patterns (torch.cuda.get_device_name, TARGET_INFO_GPU.name), most specific first.
_NAME_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"GH200.*144", "gh200-144gb"),
    (r"GH200", "gh200"),
    (r"H200", "h200"),
    (r"H100.*NVL", "h100-nvl"),
    (r"H100.*(PCIe|PCI-E)", "h100-pcie"),
    (r"H100", "h100-sxm"),
    (r"A100.*(PCIe|PCI-E).*80|A100.*80.*(PCIe|PCI-E)", "a100-pcie-80gb"),
    (r"A100.*(PCIe|PCI-E)", "a100-pcie-40gb"),
    (r"A100.*80", "a100-sxm-80gb"),
    (r"A100", "a100-sxm-40gb"),
    (r"V100.*(PCIe|PCI-E)", "v100-pcie"),
    (r"V100", "v100-sxm2"),
    (r"L40S", "l40s"),
    (r"\bA40\b", "a40"),
    (r"B200", "b200"),
    (r"RTX 3090", "rtx3090"),
    (r"RTX 4090", "rtx4090"),
    (r"RTX A5000", "rtxa5000"),
)


# Short names that other commands accept (`lmtrain params --device`, `lmtrain predict --device`).
ALIASES = {"h100": "h100-sxm", "a100": "a100-sxm-80gb", "a100-40": "a100-sxm-40gb"}


def device_peaks(key: str) -> DevicePeaks:
    """The table entry for `key` (e.g. `gh200`, or an alias such as `a100`); a UserError lists the keys."""
    key = ALIASES.get(key.lower(), key.lower())
    try:
        return PEAKS[key]
    except KeyError:
        raise UserError(f"unknown GPU '{key}': expected one of {', '.join(PEAKS)}") from None


def peaks_for_device_name(name: str) -> DevicePeaks | None:
    """The entry matching a CUDA device name such as `NVIDIA H100 80GB HBM3`, or None when unknown."""
    for pattern, key in _NAME_PATTERNS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return PEAKS[key]
    return None
