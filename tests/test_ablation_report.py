"""tools/ablation_report.py on run directories written in the trainer's documented format.

.venv/bin/python -m pytest tests/test_ablation_report.py
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lmtrain.errors import UserError
from lmtrain.tools import ablation_report as rep

REPO = Path(__file__).resolve().parents[1]

BASE_SWITCHES = {"norm": "layernorm", "mlp": "gelu", "pos": "learned"}
VARIANTS = {
    "baseline": {},
    "swiglu": {"model": {"mlp": "swiglu"}},
    "rope": {"model": {"pos": "rope"}},
    "warmup": {"schedule": {"warmup_steps": 3}},
    "cosine": {"schedule": {"name": "cosine"}},
    "rmsnorm": {"model": {"norm": "rmsnorm"}},
    "all": {
        "model": {"mlp": "swiglu", "pos": "rope", "norm": "rmsnorm"},
        "schedule": {"name": "cosine", "warmup_steps": 3},
    },
}


def write_run(
    root: Path, variant: str, seed: int, final_val: float, steps: int = 30, params: int | None = 1000
) -> Path:
    """A run directory as `lmtrain train` documents it: config.yaml, metrics.jsonl, summary.json."""
    run = root / f"{variant}-seed{seed}"
    run.mkdir(parents=True)
    cfg = {
        "training": {"steps": steps, "seed": seed, "name": f"s-{variant}", "output_dir": str(run)},
        "model": {"preset": "ablation-small", **BASE_SWITCHES},
        "schedule": {"name": "constant", "warmup_steps": 0},
    }
    for section, values in VARIANTS[variant].items():
        cfg[section].update(values)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    with open(run / "metrics.jsonl", "w") as fh:
        for step in range(5, steps + 1, 5):
            loss = final_val + 2.0 * (steps - step) / steps
            fh.write(
                json.dumps({"step": step, "loss": loss, "lr": 1e-3, "tokens_per_s": 1000.0 + seed}) + "\n"
            )
            if step % 10 == 0:
                fh.write(json.dumps({"step": step, "val_loss": loss + 0.05}) + "\n")
    summary = {"final_train_loss": final_val - 0.05, "final_val_loss": final_val, "tokens_per_s": 1234.0}
    if params is not None:
        summary["parameters"] = params
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def study(root: Path, vals: dict[str, list[float]]) -> list[Path]:
    return [
        write_run(root, v, seed, val) for v, per_seed in vals.items() for seed, val in enumerate(per_seed)
    ]


def test_one_seed_report_has_seven_rows_plot_and_unmeasured_spread(tmp_path):
    vals = {v: [3.0 - 0.01 * i] for i, v in enumerate(VARIANTS)}
    dirs = study(tmp_path / "s", vals)
    plan = {"runs": [{"name": d.name} for d in dirs]}  # the runner's record of the study order
    (tmp_path / "s" / "plan.json").write_text(json.dumps(plan))
    assert rep.main([str(tmp_path / "s"), "--no-generations"]) == 0
    text = (tmp_path / "s" / "report.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| run")]
    assert [line.split("|")[1].strip() for line in table] == list(VARIANTS)
    # switches come from the configs: exactly one for a single-switch variant, five for `all`
    row = {line.split("|")[1].strip(): line.split("|") for line in table}
    assert row["swiglu"][2].strip() == "model.mlp=swiglu"
    assert row["baseline"][2].strip() == "—"
    assert len(row["all"][2].split(",")) == 5
    # perplexity is exp(val NLL), the delta is against the baseline
    assert row["rope"][6].strip() == f"{math.exp(vals['rope'][0]):.2f}"
    assert row["rope"][7].strip() == f"{vals['rope'][0] - vals['baseline'][0]:+.4f}"
    assert "spread is unmeasured" in text and "unreplicated" in text
    png = tmp_path / "s" / "nll.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_two_seeds_conclude_only_beyond_the_spread(tmp_path):
    vals = {
        "baseline": [3.00, 3.02],  # range 0.02
        "swiglu": [2.80, 2.81],  # -0.205: beyond the spread
        "rope": [3.01, 3.00],  # -0.005: within
        "warmup": [3.20, 3.21],  # +0.195: worse
        "cosine": [2.99, 3.03],  # range 0.04 -> the study's spread
        "rmsnorm": [3.00, 3.04],  # +0.01: within
        "all": [2.70, 2.74],
    }
    study(tmp_path, vals)
    out = tmp_path / "report"
    rep.main([str(p) for p in sorted(tmp_path.glob("*-seed*"))] + ["--out", str(out), "--no-generations"])
    text = (out / "report.md").read_text()
    assert (
        "spread (the largest range of final validation NLL over 2 seeds of any one variant): 0.0400" in text
    )
    conclusions = text.split("## Conclusions")[1].split("## Runs")[0]
    assert "`swiglu` lowers validation NLL by 0.2050" in conclusions
    assert "`all` lowers" in conclusions
    assert "`warmup` raises validation NLL by 0.1950" in conclusions
    within = [line for line in conclusions.splitlines() if "not distinguishable" in line][0]
    assert "`rope`" in within and "`rmsnorm`" in within and "`cosine`" in within
    assert "`rope` lowers" not in conclusions
    # the per-run table lists all 14 runs
    assert text.count("-seed0 |") == 7 and text.count("-seed1 |") == 7


def test_falls_back_to_metrics_when_summary_lacks_keys(tmp_path):
    run = write_run(tmp_path, "baseline", 0, 3.0, params=None)
    (run / "summary.json").write_text(json.dumps({"steps": 30}))
    r = rep.read_run(run)
    assert r.final_train == pytest.approx(3.0)  # the last logged training loss
    assert r.final_val == pytest.approx(3.05)  # the last validation record
    assert r.tokens_per_s == pytest.approx(1000.0)


def test_torn_last_metrics_line_is_ignored_but_earlier_corruption_is_an_error(tmp_path):
    run = write_run(tmp_path, "baseline", 0, 3.0)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 31, "lo')
    assert rep.read_run(run).train_curve()[0][-1] == 30
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(["garbage", *lines]) + "\n")
    with pytest.raises(UserError, match=r"metrics.jsonl:1: not a JSON record"):
        rep.read_run(run)


@pytest.mark.parametrize(
    "setup, args, message",
    [
        (lambda d: None, ["missing"], "not a directory"),
        (lambda d: (d / "empty").mkdir(), ["empty"], "neither a run directory"),
        (lambda d: write_run(d, "swiglu", 0, 3.0), ["."], "no run of variant 'baseline'"),
        (
            lambda d: (write_run(d, "baseline", 0, 3.0) / "config.yaml").unlink(),
            ["."],
            "no config.yaml",
        ),
        (
            lambda d: (write_run(d, "baseline", 0, 3.0) / "summary.json").write_text("{"),
            ["."],
            "summary.json: not valid JSON",
        ),
        (lambda d: write_run(d, "baseline", 0, 3.0), [".", "--max-new-tokens", "0"], "--max-new-tokens"),
    ],
)
def test_bad_input_is_a_user_error(tmp_path, monkeypatch, setup, args, message):
    setup(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=message):
        rep.main([*args, "--no-generations"])


def test_runs_as_a_command_and_reports_errors_without_traceback(tmp_path):
    study(tmp_path, {"baseline": [3.0], "swiglu": [2.9]})
    command = [sys.executable, "-m", "lmtrain", "ablation-report"]  # `lmtrain ablation-report`
    ok = subprocess.run(
        [*command, str(tmp_path), "--no-generations"], capture_output=True, text=True, cwd=REPO
    )
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "report.md").is_file()
    bad = subprocess.run([*command, str(tmp_path / "nope")], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "error: RUN_DIR" in bad.stderr and "Traceback" not in bad.stderr
