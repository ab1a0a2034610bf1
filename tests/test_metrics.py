"""Peak table, measured peaks, MFU arithmetic, throughput windows, the loss plot."""

from __future__ import annotations

import json

import pytest
import torch

from lmtrain import metrics
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


@pytest.fixture
def quick_cpu_peak(tmp_path, monkeypatch):
    """A private cache directory and a short benchmark (the real one runs 5 rounds of 1 s)."""
    monkeypatch.setenv("LMTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(metrics, "CPU_PEAK_ROUNDS", 2)
    monkeypatch.setattr(metrics, "CPU_PEAK_ROUND_SECONDS", 0.02)
    monkeypatch.setattr(metrics, "CPU_PEAK_SIZE", 128)
    return tmp_path / "cache" / "cpu-peak.json"


def test_cpu_peak_is_measured_once_then_read_from_the_cache(quick_cpu_peak):
    heard = []
    peak = resolve_peak(torch.device("cpu"), torch.float32, None, log=heard.append)
    assert peak.source == f"cached CPU peak: {metrics.cpu_model()} | {torch.get_num_threads()} threads | fp32"
    assert 0 < peak.tflops < 100  # two CPU cores, fp32
    assert len(heard) == 1 and "measuring the CPU matmul peak once" in heard[0]
    entry = json.loads(quick_cpu_peak.read_text())[metrics.cpu_peak_key(torch.float32)]
    assert entry["tflops"] == max(entry["rounds"]) == peak.tflops and len(entry["rounds"]) == 2
    again = resolve_peak(torch.device("cpu"), torch.float32, None, log=heard.append)
    assert again == peak and len(heard) == 1  # read back, not measured again


def test_cpu_peak_cache_is_keyed_by_threads_and_dtype(quick_cpu_peak):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = metrics.cpu_peak_key(torch.float32)
        metrics.cpu_peak(torch.float32)
        metrics.cpu_peak(torch.bfloat16)
        torch.set_num_threads(2)
        two = metrics.cpu_peak_key(torch.float32)
        metrics.cpu_peak(torch.float32)
    finally:
        torch.set_num_threads(before)
    assert "| 1 threads |" in one and "| 2 threads |" in two
    assert set(json.loads(quick_cpu_peak.read_text())) == {one, two, one.replace("fp32", "bf16")}


def test_a_corrupt_cpu_peak_cache_is_measured_again(quick_cpu_peak):
    quick_cpu_peak.parent.mkdir(parents=True)
    quick_cpu_peak.write_text('{"AMD')
    heard = []
    value, _ = metrics.cpu_peak(torch.float32, log=heard.append)
    assert value > 0 and len(heard) == 1
    assert json.loads(quick_cpu_peak.read_text())[metrics.cpu_peak_key(torch.float32)]["tflops"] == value


def test_peak_table_needs_no_torch_dtype():
    assert table_peak_tflops("NVIDIA GH200 480GB", "bf16") == table_peak_tflops(
        "NVIDIA GH200", torch.bfloat16
    )


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


def test_step_line_is_one_line_with_rounded_numbers_and_flags_mfu_above_100():
    from lmtrain.log import step_line

    metrics_ = {"loss": 4.708076477050781, "lr": 0.003, "grad_norm": 1.2345, "step_time": 0.08531,
                "tokens_per_s": 24012.4, "mfu": 0.1234}  # fmt: skip
    line = step_line(10, 300, metrics_)
    assert (
        line
        == "step 10/300 | loss 4.7081 | lr 3.00e-03 | grad norm 1.23 | 85.3 ms/step | 24,012 tok/s | MFU 12.34%"
    )
    assert "above 100%" in step_line(10, 300, {**metrics_, "mfu": 1.0282})


def test_line_progress_prints_start_paced_progress_and_end(capsys):
    from lmtrain.log import LineProgress

    with LineProgress("bpe merging", every=0.0) as progress:  # every 0 s: a line per update
        task = progress.add_task("merge", total=3)
        for _ in range(3):
            progress.advance(task)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "bpe merging: started" and lines[-1].startswith("bpe merging: done in ")
    assert [line.split(" (")[0] for line in lines[1:-1]] == [f"bpe merging: {n}/3" for n in (1, 2, 3)]
