"""tools/compare_runs.py and tools/plot_loss.py on metrics.jsonl runs and course-style stdout logs."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from lmtrain.tools import compare_runs, plot_loss
from lmtrain.tools.common import run_tool
from lmtrain.tools.runlog import parse_course_line

COURSE_LOG = """\
2025-03-01 10:00:00,000 - root - INFO - Setting up DataLoaders...
2025-03-01 10:00:05,000 - root - INFO - Step: 5 | Loss: 11.93 | Tokens per second: 6674.39 | Training tokens per second (%): 98.10 | MFU (%): 32.60 | TFLOPs: 322.40
\x1b[32m2025-03-01 10:00:10,000 - root - INFO - Step: 10 | Loss: 11.50 | Tokens per second: 6,700.00 | Training tokens per second (%): 98.10 | MFU (%): 32.80 | TFLOPs: 324.00\x1b[0m
srun: Job step aborted | Step: x | oops
2025-03-01 10:00:15,000 - root - INFO - Step: 15 | Loss: 10.90 | Tokens per second: 6720.00 | Training tokens per second (%): 98.10 | MFU (%): 33.00 | TFLOPs: 326.00
"""


def write_run(path: Path, tokens: list[float], *, mfu: float = 0.02, val: float | None = None) -> Path:
    path.mkdir(parents=True)
    with open(path / "metrics.jsonl", "w") as fh:
        for i, tps in enumerate(tokens, 1):
            rec = dict(step=5 * i, loss=6.0 - 0.1 * i, lr=1e-3, tokens_per_s=tps, tflops_per_device=tps * 1e-4,
                       mfu=mfu, peak_memory_gib=1.0 + i)  # fmt: skip
            fh.write(json.dumps(rec) + "\n")
        if val is not None:
            fh.write(json.dumps({"step": 5 * len(tokens), "val_loss": val}) + "\n")
    return path


def test_course_line_parser():
    rec = parse_course_line(COURSE_LOG.splitlines()[1])
    assert rec == {"step": 5, "loss": 11.93, "tokens_per_s": 6674.39, "train_tokens_pct": 98.1, "mfu_pct": 32.6,
                   "tflops": 322.4}  # fmt: skip
    assert parse_course_line("Step: 7 | Loss: nan")["step"] == 7
    assert parse_course_line("2025 - INFO - Setting up DataLoaders...") is None
    assert parse_course_line("srun: Job step aborted | Step: x | oops") is None


def test_compare_jsonl_runs_and_course_log(tmp_path, capsys):
    base = write_run(tmp_path / "runs" / "base", [100.0, 200.0, 210.0, 190.0])
    write_run(tmp_path / "runs" / "fast", [100.0, 400.0, 420.0, 380.0], mfu=0.04, val=4.5)
    log = tmp_path / "course-123.out"
    log.write_text(COURSE_LOG)
    out = tmp_path / "cmp.json"
    rc = run_tool(compare_runs.main, [str(base), str(tmp_path / "runs" / "f*"), str(log), "--json", str(out),
                                      "--markdown", str(tmp_path / "cmp.md"), "--png", str(tmp_path / "cmp.png")])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    rows = {r["run"]: r for r in json.loads(out.read_text())}
    # warm-up (first logged record) skipped: means over the other three
    assert rows["base"]["tokens_per_s"] == pytest.approx(200.0)
    assert rows["base"]["tokens_per_s_std"] == pytest.approx(statistics.stdev([200.0, 210.0, 190.0]))
    assert rows["fast"]["speedup"] == pytest.approx(2.0)
    assert rows["fast"]["mfu_pct"] == pytest.approx(4.0) and rows["fast"]["final_val_loss"] == 4.5
    assert rows["base"]["peak_mem_gib"] == 5.0 and rows["base"]["final_loss"] == pytest.approx(5.6)
    course = rows["course-123"]
    assert course["tokens_per_s"] == pytest.approx((6700.0 + 6720.0) / 2)
    assert course["mfu_pct"] == pytest.approx(32.9) and course["tflops"] == pytest.approx(325.0)
    assert course["final_loss"] == 10.9 and course["last_step"] == 15
    assert "| fast |" in (tmp_path / "cmp.md").read_text()
    assert (tmp_path / "cmp.png").read_bytes()[:4] == b"\x89PNG"
    assert "speed-up" in capsys.readouterr().out


def test_plot_loss_many_runs(tmp_path, capsys):
    a = write_run(tmp_path / "a", [1.0, 2.0, 3.0], val=5.0)
    log = tmp_path / "course.log"
    log.write_text(COURSE_LOG)
    out = tmp_path / "loss.png"
    assert run_tool(plot_loss.main, [str(a), str(log), "--smooth", "2", "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert plot_loss.moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


@pytest.mark.parametrize(
    "setup, argv_tail, message",
    [
        (lambda p: None, ["missing-run"], "no such run directory"),
        (lambda p: (p / "empty").mkdir(), ["empty"], "no metrics.jsonl"),
        (lambda p: (p / "notes.txt").write_text("hello\n"), ["notes.txt"], "no training log lines"),
        (lambda p: None, ["nothing-*"], "matches no run"),
        (lambda p: ((p / "bad").mkdir(), (p / "bad" / "metrics.jsonl").write_text("{oops\n{}\n")), ["bad"],
         "bad/metrics.jsonl:1: not valid JSON"),
        (lambda p: ((p / "v").mkdir(), (p / "v" / "metrics.jsonl").write_text('{"step": 1, "val_loss": 2}\n')),
         ["v"], "no training records"),
    ],
)  # fmt: skip
def test_bad_inputs(tmp_path, capsys, monkeypatch, setup, argv_tail, message):
    monkeypatch.chdir(tmp_path)
    setup(tmp_path)
    for main in (compare_runs.main, plot_loss.main):
        assert run_tool(main, [*argv_tail, "--quiet"] if main is compare_runs.main else [*argv_tail]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_bad_flags(tmp_path, capsys):
    run = write_run(tmp_path / "r", [1.0, 2.0])
    assert run_tool(compare_runs.main, [str(run), "--warmup", "-1"]) == 2
    assert run_tool(plot_loss.main, [str(run), "--smooth", "0"]) == 2
    assert run_tool(plot_loss.main, [str(run), "--out", str(tmp_path / "loss.jpg")]) == 2
    assert "--out" in capsys.readouterr().err


def test_partial_last_line_is_ignored(tmp_path):
    run = write_run(tmp_path / "r", [1.0, 2.0, 3.0])
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 20, "loss": 1.')  # killed mid-write
    rows = compare_runs.compare(compare_runs.load_runs([str(run)]), warmup=1)
    assert rows[0]["last_step"] == 15
