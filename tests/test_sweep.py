"""jobs/sweep.py: the throughput sweep's CPU-sized plan, and explanations worked out from measurements.

.venv/bin/python -m pytest tests/test_sweep.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from jobs import sweep
from lmtrain.errors import UserError


def test_cpu_plan_keeps_each_switch_and_shrinks_the_size(tmp_path):
    runs = sweep.plan("throughput", tmp_path, "cpu", 12, "data/stdlib", [])
    assert [r.experiment for r in runs] == [
        "baseline",
        "fused",
        "compile",
        "seq4096",
        "fused-compile-seq4096",
    ]
    cfgs = {r.experiment: sweep.resolved_config(r) for r in runs}
    for name, cfg in cfgs.items():
        assert cfg.model.preset == "tiny" and cfg.precision.model_dtype == "fp32"
        assert (cfg.model.dim, cfg.model.n_layers) == (128, 2)
        assert cfg.training.steps == 12 and cfg.training.device == "cpu"
        assert cfg.training.output_dir == str(tmp_path / name)
        assert cfg.data.pipeline == "padded"  # the course's pipeline, as in the experiments
    switches = {n: (c.optim.fused, c.training.compile, c.data.sequence_length) for n, c in cfgs.items()}
    assert switches == {
        "baseline": (False, False, 128),
        "fused": (True, False, 128),
        "compile": (False, True, 128),
        "seq4096": (False, False, 256),
        "fused-compile-seq4096": (True, True, 256),
    }


def test_full_size_plan_runs_the_experiments_as_written(tmp_path):
    runs = sweep.plan("throughput", tmp_path, "full", None, "data/stdlib", [])
    cfg = sweep.resolved_config(runs[3])
    assert cfg.model.preset == "llama3-8b" and cfg.data.sequence_length == 4096


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sweep", "latency"], "unknown sweep 'latency'"),
        (["--sweep", "throughput", "--steps", "1"], "--steps must be >= 2"),
        (["--sweep", "throughput", "--dataset", "/nonexistent"], "--dataset /nonexistent does not exist"),
        (["--sweep", "throughput", "optim.lrr=1"], "optim.lrr"),
    ],
)
def test_bad_input(tmp_path, argv, message):
    with pytest.raises(UserError, match=message):
        sweep.main([*argv, "--out", str(tmp_path / "o")])


def write_run(root: Path, name: str, tps: float, pps: float, mfu: float, windows: list[float], **cfg) -> Path:
    """A finished run directory in the trainer's format (summary.json, config.yaml, metrics.jsonl)."""
    run = root / name
    run.mkdir(parents=True)
    config = {
        "optim": {"fused": cfg.get("fused", False)},
        "training": {"compile": cfg.get("compile", False)},
        "data": {"sequence_length": cfg.get("seq", 128)},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    summary = {"tokens_per_s": tps, "positions_per_s": pps, "mfu": mfu, "peak_tflops": 0.1, "world_size": 1}
    (run / "summary.json").write_text(json.dumps({"exit_reason": "completed", **summary}))
    with open(run / "metrics.jsonl", "w") as fh:
        for i, rate in enumerate(windows):
            fh.write(json.dumps({"step": i + 1, "loss": 5.0, "tokens_per_s": rate}) + "\n")
    return run


def test_explanations_follow_the_numbers(tmp_path):
    steady = [1.0, 1000.0, 1001.0, 999.0, 1000.0]  # first window (warm-up) is ignored
    base = sweep.measure(write_run(tmp_path, "baseline", 1000, 1000, 0.010, steady))
    fused = sweep.measure(write_run(tmp_path, "fused", 1002, 1002, 0.010, steady, fused=True))
    comp = sweep.measure(write_run(tmp_path, "compile", 1500, 1500, 0.015, steady, compile=True))
    # seq 256: 1.2x the FLOPs per position (mfu * peak / positions_per_s), 20% padding
    seq = sweep.measure(write_run(tmp_path, "seq4096", 800, 1000, 0.012, steady, seq=256))
    assert base.flops_per_position == pytest.approx(1e6)
    assert seq.flops_per_position == pytest.approx(1.2e6) and seq.padding == pytest.approx(0.2)
    singles = {"optim.fused": 1.002, "training.compile": 1.5, "data.sequence_length": 0.8}

    text = sweep.explain(fused, base, singles)
    assert text.startswith("1.00× the baseline's tokens/s: within the measurement noise")
    assert "Fused AdamW" in text and "torch.compile" not in text

    text = sweep.explain(comp, base, singles)
    assert text.startswith("1.50× the baseline's tokens/s: faster") and "torch.compile" in text

    text = sweep.explain(seq, base, singles)
    assert "slower" in text and "Sequence length 128 → 256" in text
    assert "1.20× the FLOPs per position" in text and "would be 0.83×" in text
    assert "0.0% → 20.0% of the positions are padding" in text
    assert "Measured 0.80× instead: the hardware was used less well" in text  # 0.83× predicted by FLOPs

    both = sweep.measure(
        write_run(tmp_path, "all", 1300, 1625, 0.02, steady, fused=True, compile=True, seq=256)
    )
    text = sweep.explain(both, base, singles)
    assert "1.00 × 1.50 × 0.80 = 1.20×; combined 1.30×" in text
    assert "Measured" not in text  # a mixed ratio is not blamed on the sequence length


def test_noise_band_comes_from_the_logged_windows(tmp_path):
    noisy = [1.0, 600.0, 1400.0, 700.0, 1300.0]
    base = sweep.measure(write_run(tmp_path, "baseline", 1000, 1000, 0.01, noisy))
    other = sweep.measure(write_run(tmp_path, "fused", 1150, 1150, 0.01, noisy, fused=True))
    assert base.noise > 0.1
    assert "within the measurement noise" in sweep.explain(other, base, {})


def test_report_has_the_comparison_table_chart_and_one_explanation_per_run(tmp_path):
    steady = [1.0, 1000.0, 1010.0, 990.0, 1000.0]
    specs = {
        "baseline": dict(tps=1000, pps=1000, mfu=0.01, windows=steady),
        "fused": dict(tps=1000, pps=1000, mfu=0.01, windows=steady, fused=True),
        "compile": dict(
            tps=1500, pps=1500, mfu=0.015, windows=[1.0] + [w * 1.5 for w in steady[1:]], compile=True
        ),
        "seq4096": dict(tps=800, pps=1000, mfu=0.012, windows=[1.0] + [w * 0.8 for w in steady[1:]], seq=256),
    }
    runs = []
    for name, spec in specs.items():
        write_run(
            tmp_path, name, spec.pop("tps"), spec.pop("pps"), spec.pop("mfu"), spec.pop("windows"), **spec
        )
        runs.append(sweep.SweepRun(name, tmp_path / name, []))
    report = sweep.write_report(runs, tmp_path, "cpu", log=lambda msg: None)
    text = report.read_text()
    assert "| run | steps | tokens/s |" in text  # tools/compare_runs.py's table
    assert text.count("\n| ") == 1 + len(specs) and "| compile | 5 | 1,500.0 |" in text
    assert (tmp_path / "throughput.png").read_bytes()[:4] == b"\x89PNG"
    why = text.split("## Why")[1]
    assert why.count("\n- **") == 3  # one per run besides the baseline
    assert "**compile**: 1.50× the baseline's tokens/s: faster" in why
    assert "**fused**: 1.00× the baseline's tokens/s: within the measurement noise" in why
    assert "**seq4096**: 0.80× the baseline's tokens/s: slower" in why
    assert "CPU-sized runs" in text
