"""Real Nsight Systems captures on CPU: NVTX ranges from the step hooks and the model, read back by the report."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from lmtrain.nvtx import parse_gemm_labels
from lmtrain.tools import nsys_gemm_report as report

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


def capture(tmp_path: Path, argv: list[str], trace: str = "nvtx,osrt") -> Path:
    """nsys profile --trace=TRACE the command, export SQLite; return the .sqlite path."""
    rep = tmp_path / "trace"
    profile = [
        "nsys",
        "profile",
        f"--trace={trace}",
        "--sample=none",
        # Context-switch tracing makes nsys 2022.4 hang after the application exits on a busy host.
        "--cpuctxsw=none",
        "--force-overwrite=true",
        "-o",
        str(rep),
        *argv,
    ]
    prof = run_nsys(profile, timeout=150)
    if prof.returncode != 0 and "Connection reset by peer" in prof.stderr:
        # nsys 2022.4 sometimes loses the connection to its freshly started agent before the
        # application runs; that is the profiler's start-up, not the capture: try once more.
        prof = run_nsys(profile, timeout=150)
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
    sqlite = capture(tmp_path, [sys.executable, "-m", "lmtrain.profiling.smoke", "--steps", "3", "--nvtx",
                                "--run-dir", str(tmp_path / "run")])  # fmt: skip
    by_name = check_ranges(sqlite, tmp_path, steps=3)
    # two layers, three steps: each FFN range once per layer per step
    assert by_name["FeedForward/w2"]["count"] == 2 * 3
    # The model's GEMM ranges describe themselves in the real capture (lmtrain.nvtx.gemm_label).
    with sqlite3.connect(sqlite) as conn:
        texts = [t for (t,) in conn.execute(
            "SELECT COALESCE(e.text, s.value) FROM NVTX_EVENTS AS e LEFT JOIN StringIds AS s ON s.id = e.textId")]  # fmt: skip
    parsed = [parse_gemm_labels(t) for t in texts if t and " [gemm " in t]
    shapes = {name: groups[0] for name, groups in parsed if len(groups) == 1}
    assert {"Attention/wq", "Attention/sdpa", "FeedForward/w1", "FeedForward/w2"} <= set(shapes), shapes
    # Backward (on this CPU: the main thread) opens each linear's range with its dgrad and wgrad shapes.
    backward = {name: groups for name, groups in parsed if len(groups) == 2}
    assert {"FeedForward/w1 (backward)", "Attention/wo (backward)"} <= set(backward), backward
    assert all(min(shape[:4]) >= 1 and shape[4] for shape in shapes.values())


def write_corpus(out: Path) -> Path:
    """A small real corpus: the start of some stdlib modules, as train/val parquet files."""
    import sysconfig

    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:24]
    texts = [f.read_text(errors="replace")[:2000] for f in files]
    pq.write_table(pa.table({"text": texts[:20]}), out / "train.parquet")
    pq.write_table(pa.table({"text": texts[20:]}), out / "val.parquet")
    return out


def train_args(corpus: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [
        "--dataset", str(corpus), "--data.tokenizer", "byte",
        "--model.preset", "tiny", "--model.dim", "32", "--model.n_layers", "2",
        "--model.n_heads", "2", "--model.n_kv_heads", "1", "--model.multiple_of", "32",
        "--sequence-length", "32", "--batch-size", "4", "--training-steps", str(steps),
        "--precision.model_dtype", "fp32", "--logging.frequency", "1", "--logging.peak_tflops", "1",
        "--logging.progress", "false", "--training.eval_batches", "1", "--checkpoint.interval", "0",
        "--training.output_dir", str(out), *extra,
    ]  # fmt: skip


@pytest.mark.nsys
@pytest.mark.slow
def test_trainer_under_nsys(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    argv = train_args(corpus, tmp_path / "run", 3, "--profiling.nvtx=true")
    sqlite = capture(tmp_path, [sys.executable, "-m", "lmtrain.train", *argv])
    by_name = check_ranges(sqlite, tmp_path, steps=3)
    # the model's ranges also appear in the final evaluation, outside any step
    assert by_name["layers.1"]["count"] >= 3 and by_name["optimizer"]["count"] == 3


@pytest.mark.slow
def test_trainer_torch_profile_window(tmp_path):
    from lmtrain.config import parse_args
    from lmtrain.train import train

    corpus = write_corpus(tmp_path / "corpus")
    run_dir = tmp_path / "run"
    cfg, _ = parse_args(train_args(corpus, run_dir, 4, "--profiling.torch_profile=true",
                                   "--profiling.profile_step_start=2", "--profiling.profile_step_end=3"))  # fmt: skip
    train(cfg)
    summary = (run_dir / "torch_profile.md").read_text()
    for phase in ("data-loader wait", "forward", "backward", "optimizer"):
        assert f"| {phase} | 2 |" in summary
    names = {e.get("name") for e in json.loads((run_dir / "torch_trace.json").read_text())["traceEvents"]}
    assert "lmtrain/backward" in names
