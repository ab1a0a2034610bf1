"""Dense bf16 peak throughput and HBM bandwidth of the GPUs lmtrain reports against.

    from lmtrain.profiling.peaks import device_peaks, peaks_for_device_name
    device_peaks("gh200")                          # DevicePeaks(key='gh200', tflops=989.0, ...)
    peaks_for_device_name("NVIDIA H100 80GB HBM3")  # -> the h100-sxm entry

Dense (not 2:4 sparse) bf16 peaks come from the trainer's MFU table (`lmtrain.metrics.PEAK_TFLOPS`); this
module adds the HBM bandwidths the roofline needs. A device that
is not in the table is never silently given some other device's peak: callers must ask the user.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lmtrain.errors import UserError


@dataclass(frozen=True)
class DevicePeaks:
    key: str
    label: str
    tflops: float
    """Dense bf16 peak, TFLOP/s."""
    bandwidth: float
    """HBM bandwidth, bytes/s."""


# key -> (label, the device name looked up in lmtrain.metrics.PEAK_TFLOPS, HBM bytes/s). The TFLOP/s come
# from the trainer's MFU table so that the report and the training log never disagree on a peak.
_DEVICES: dict[str, tuple[str, str, float]] = {
    "gh200": ("GH200 (96 GB HBM3)", "NVIDIA GH200", 4.0e12),
    "h100-sxm": ("H100 SXM", "NVIDIA H100 SXM", 3.35e12),
    "h100-pcie": ("H100 PCIe", "NVIDIA H100 PCIe", 2.0e12),
    "h200": ("H200", "NVIDIA H200", 4.8e12),
    "a100": ("A100 80 GB", "NVIDIA A100", 2.0e12),
}


def _build() -> dict[str, DevicePeaks]:
    from lmtrain.metrics import table_peak_tflops

    out = {}
    for key, (label, lookup, bandwidth) in _DEVICES.items():
        tflops = table_peak_tflops(lookup, "bf16")
        assert tflops is not None, f"lmtrain.metrics.PEAK_TFLOPS has no bf16 peak for {lookup}"
        out[key] = DevicePeaks(key, label, tflops, bandwidth)
    return out


PEAKS: dict[str, DevicePeaks] = _build()

DEFAULT_KEY = "gh200"
"""The reference machine (CSCS clariden): what reports compare against when the trace names no device."""

# Device-name patterns, most specific first.
_NAME_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"GH200", "gh200"),
    (r"H200", "h200"),
    (r"H100.*(PCIe|PCI-E)", "h100-pcie"),
    (r"H100", "h100-sxm"),
    (r"A100", "a100"),
)


def device_peaks(key: str) -> DevicePeaks:
    """The table entry for `key` (e.g. `gh200`); a UserError lists the valid keys."""
    try:
        return PEAKS[key.lower()]
    except KeyError:
        raise UserError(f"unknown GPU '{key}': expected one of {', '.join(PEAKS)}") from None


def peaks_for_device_name(name: str) -> DevicePeaks | None:
    """The entry matching a CUDA device name such as `NVIDIA H100 80GB HBM3`, or None when unknown."""
    for pattern, key in _NAME_PATTERNS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return PEAKS[key]
    return None
