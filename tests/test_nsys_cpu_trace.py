"""Real Nsight Systems captures on CPU: NVTX ranges from the step hooks and the model, read back by the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tools import nsys_gemm_report as report

REPO = Path(__file__).resolve().parents[1]


def run_nsys(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run an nsys command with a time limit (nsys 2022.4 hangs when started in a new session: keep ours)."""
    proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(argv[:4])} ... timed out after {timeout} s: {out[-1000:]} {err[-1000:]}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def capture(tmp_path: Path, argv: list[str]) -> Path:
    """nsys profile --trace=nvtx,osrt the command, export SQLite; return the .sqlite path."""
    rep = tmp_path / "trace"
    prof = run_nsys(
        [
            "nsys",
            "profile",
            "--trace=nvtx,osrt",
            "--sample=none",
            "--force-overwrite=true",
            "-o",
            str(rep),
            *argv,
        ],
        timeout=240,
    )
    assert prof.returncode == 0, prof.stdout[-2000:] + prof.stderr[-2000:]
    sqlite = tmp_path / "trace.sqlite"
    exp = run_nsys(
        [
            "nsys",
            "export",
            "--type",
            "sqlite",
            "--force-overwrite=true",
            "--output",
            str(sqlite),
            str(rep) + ".nsys-rep",
        ],
        timeout=120,
    )
    assert exp.returncode == 0, exp.stdout[-2000:] + exp.stderr[-2000:]
    return sqlite


def check_ranges(sqlite: Path, tmp_path: Path, steps: int) -> dict[str, dict]:
    out = tmp_path / "nvtx.json"
    assert report.run_tool(report.main, [str(sqlite), "--json", str(out), "--quiet"]) == 0
    rows = json.loads(out.read_text())["ranges"]
    by_name = {r["name"]: r for r in rows}
    order = [r["name"] for r in rows]  # by first start
    expected = ["step", "forward", "layers.0", "Attention/wq", "FeedForward/w1", "FeedForward/w3",
                "FeedForward/w2", "backward", "optimizer"]  # fmt: skip
    missing = [n for n in expected if n not in by_name]
    assert not missing, f"ranges missing from the trace: {missing}; found {order}"
    positions = [order.index(n) for n in expected]
    assert positions == sorted(positions), order
    assert by_name["step"]["count"] == steps
    assert by_name["forward"]["parent"] == "step" and by_name["backward"]["parent"] == "step"
    assert by_name["layers.0"]["parent"] == "forward"
    assert by_name["FeedForward/w1"]["parent"] == "layers.0"
    return by_name


@pytest.mark.nsys
@pytest.mark.slow
def test_profiling_hooks_under_nsys(tmp_path):
    sqlite = capture(tmp_path, [sys.executable, "-m", "profiling.smoke", "--steps", "3", "--nvtx",
                                "--run-dir", str(tmp_path / "run")])  # fmt: skip
    by_name = check_ranges(sqlite, tmp_path, steps=3)
    # two layers, three steps: each FFN range once per layer per step
    assert by_name["FeedForward/w2"]["count"] == 2 * 3
