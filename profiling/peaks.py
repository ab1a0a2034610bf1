"""The device table of the GEMM report: dense peaks per data type and memory bandwidth.

    from lmtrain.profiling.peaks import device_peaks, peaks_for_device_name
    device_peaks("gh200").tflops("bf16")                       # 989.0
    peaks_for_device_name("NVIDIA A100-SXM4-80GB").bandwidth   # 2.039e12

The table itself lives in the core (`lmtrain.hardware`), where the roofline prediction and the memory
planner read it too; this module is the name the analysis layer imports it by.
"""

from lmtrain.hardware import (  # noqa: F401
    ALIASES,
    DEFAULT_KEY,
    DTYPES,
    PEAKS,
    DevicePeaks,
    device_peaks,
    peaks_for_device_name,
)
