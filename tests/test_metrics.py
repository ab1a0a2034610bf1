"""Peak table, measured peaks, MFU arithmetic, throughput windows, the loss plot."""

from __future__ import annotations

import json

import pytest
import torch

from lmtrain.metrics import (
    Throughput,
    measure_peak_tflops,
    mfu,
    resolve_peak,
    table_peak_tflops,
    write_loss_plot,
)


@pytest.mark.parametrize(
    "name, dtype, peak",
    [
        ("NVIDIA GH200 480GB", torch.bfloat16, 989.0),
        ("NVIDIA H200", torch.bfloat16, 989.0),
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.0),
        ("NVIDIA H100 PCIe", torch.bfloat16, 756.0),
        ("NVIDIA A100-SXM4-80GB", torch.float16, 312.0),
        ("NVIDIA A100-SXM4-80GB", torch.float32, 19.5),
        ("NVIDIA GH200 480GB", torch.float32, 67.0),
        ("NVIDIA GeForce RTX 3090", torch.bfloat16, None),
        ("NVIDIA H100 80GB HBM3", torch.int8, None),
    ],
)
def test_peak_table(name, dtype, peak):
    assert table_peak_tflops(name, dtype) == peak


def test_cpu_peak_is_measured_and_says_so():
    peak = resolve_peak(torch.device("cpu"), torch.float32, None)
    assert peak.source.startswith("measured peak: cpu")
    assert 0 < peak.tflops < 100  # two CPU cores, fp32


def test_configured_peak_wins():
    peak = resolve_peak(torch.device("cpu"), torch.float32, 123.0)
    assert (peak.tflops, peak.source) == (123.0, "logging.peak_tflops")


def test_measured_peak_scales_with_work():
    t = measure_peak_tflops(torch.device("cpu"), torch.float32, size=256, seconds=0.05)
    assert t > 0


def test_mfu_arithmetic():
    # 8B model at 2048: 48.3 GFLOP/token, 6674 tokens/s on a 989 TFLOP/s GPU -> about 32.6 %.
    assert mfu(48.3e9, 6674, 989.0) == pytest.approx(0.326, abs=0.001)


def test_throughput_window():
    tp = Throughput()
    tp.add(0.5, tokens=900, positions=1000)
    tp.add(1.5, tokens=1100, positions=1000)
    r = tp.rates()
    assert r == {"step_time": 1.0, "tokens_per_s": 1000.0, "positions_per_s": 1000.0}
    tp.reset()
    assert tp.steps == 0


def test_loss_plot(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "loss": 5.0 / s} for s in range(1, 6)] + [{"step": 5, "val_loss": 1.2}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"step": 6, "lo')  # last line cut short
    assert write_loss_plot(path, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert not write_loss_plot(empty, tmp_path / "none.png")
