"""bench/gpu_check.sh: argument handling, the immediate exit without a GPU, and the dry run on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"


def run(*args: str, out: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "OUT": str(out), "HOME": str(out)}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible: the check would run")
def test_without_a_gpu_it_exits_at_once_saying_so(tmp_path):
    t0 = time.perf_counter()
    result = run(out=tmp_path / "out")
    assert result.returncode == 3, result.stderr
    assert "no CUDA GPU visible" in result.stderr and "--dry-run" in result.stderr
    assert time.perf_counter() - t0 < 60  # no corpus, no model: only the import of torch
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--configs", "baseline,fp8"], "--configs: unknown or empty ['fp8']"),
        (["--configs", ","], "--configs: unknown or empty"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--warmup", "-1"], "--warmup >= 0"),
        (["--budget-s", "soon"], "invalid float value"),
    ],
)
def test_bad_arguments_exit_2_naming_the_flag(args, message, tmp_path):
    result = run(*args, out=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr


def test_help_lists_the_configurations_and_defaults(tmp_path):
    result = run("--help", out=tmp_path)
    assert result.returncode == 0
    assert "baseline,fused,compile,seq4096" in result.stdout and "--dry-run" in result.stdout
    assert "default: 6" in result.stdout


@pytest.mark.slow
def test_dry_run_measures_profiles_and_writes_the_report_under_out(tmp_path):
    out = tmp_path / "out"
    result = run("--dry-run", "--configs", "baseline,compile", "--steps", "1", "--warmup", "1", out=out)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] is True and report["device"] == "CPU"
    baseline, compiled = report["results"]
    assert compiled == {"config": "compile", "error": "not run: torch.compile is skipped in the dry run"}
    assert baseline["config"] == "baseline" and baseline["seq"] == 2048 // 16 and baseline["preset"] == "tiny"
    assert baseline["tokens_per_s"] > 0 and 0 < baseline["mfu"] < 1 and baseline["published_mfu"] == 0.326
    assert 0.3 < baseline["gh200_bound_mfu"] < 0.6  # lmtrain predict's bound for the 8B baseline
    assert baseline["estimate_gib"] > 0
    assert any(k["name"] == "aten::mm" for k in baseline["top_kernels"])
    ffn = baseline["ffn_gemms"]  # w1, w3, w2: forward and two backward GEMMs each, 4 layers, 2 steps
    assert ffn["calls"] == 3 * 3 * 4 * 2 and ffn["tflops"] > 0
    text = (out / "gpu_check.md").read_text()
    assert "students' MFU" in text and "| baseline | 128 |" in text and "FFN GEMMs:" in text
