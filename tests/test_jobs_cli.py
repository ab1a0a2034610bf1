"""The small job commands: report (nsys export + GEMM report), logs, and their errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from jobs import report
from jobs.logs import main as logs_main
from jobs.runs import newest_run, record
from lmtrain.errors import UserError
from lmtrain.profiling.nsys_synth import write_export

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def jobs_index(tmp_path, monkeypatch):
    monkeypatch.setenv("LMTRAIN_JOBS_INDEX", str(tmp_path / "jobs.jsonl"))


def profiled_run(tmp_path):
    run = tmp_path / "runs" / "profile" / "20260101-000000"
    run.mkdir(parents=True)
    trace = run / "trace.nsys-rep"
    trace.write_bytes(b"placeholder: the export beside it is newer, so it is not exported again")
    old = time.time() - 60
    os.utime(trace, (old, old))
    # A synthetic export with FeedForward NVTX ranges, and the run's config that gives their shapes.
    write_export(
        run / "trace.sqlite", steps=1, n_layers=2, tokens=2048, dim=256, hidden=768, with_sizes=False
    )
    cfg = {"model": {"preset": "tiny", "dim": 256, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 256},
           "data": {"sequence_length": 1024, "batch_size": 2}}  # fmt: skip
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    record({"job_id": "1", "experiment": "profile", "cluster": "local", "run_dir": str(run)})
    return run


def test_report_runs_the_gemm_report_on_the_newest_profiled_run(tmp_path):
    run = profiled_run(tmp_path)
    env = {**os.environ, "LMTRAIN_JOBS_INDEX": str(tmp_path / "jobs.jsonl")}
    out = subprocess.run(
        [sys.executable, "-m", "jobs.report", "--exp", "profile"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert f"exported {run / 'trace.sqlite'}" in out.stdout
    assert "FeedForward" in out.stdout  # the NVTX ranges of the fixture, from tools/nsys_gemm_report.py


def test_report_exports_again_when_the_trace_is_newer_and_needs_nsys(tmp_path, monkeypatch):
    run = profiled_run(tmp_path)
    os.utime(run / "trace.nsys-rep")  # now newer than the export
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(UserError, match="nsys is not on PATH"):
        report.export_sqlite(report.find_trace(run))


def test_report_without_a_trace_says_what_to_do(tmp_path):
    (tmp_path / "r").mkdir()
    with pytest.raises(UserError, match=r"no Nsight Systems trace.*job.nsys=true"):
        report.main(["--run", str(tmp_path / "r")])


def test_no_submitted_run_of_an_experiment(tmp_path):
    record({"job_id": "1", "experiment": "fused", "cluster": "local", "run_dir": str(tmp_path)})
    with pytest.raises(
        UserError, match=r"no submitted run of experiment 'smoke'.*submitted experiments: fused"
    ):
        newest_run("smoke")


def test_logs_prints_the_newest_run_of_an_experiment(tmp_path, capsys):
    for i, text in enumerate(["old run\n", "new run\nline 2\n"]):
        run = tmp_path / f"run{i}"
        (run / "submitit").mkdir(parents=True)
        (run / "submitit" / f"{10 + i}_0_log.out").write_text(text)
        record({"job_id": str(10 + i), "experiment": "smoke", "cluster": "local", "run_dir": str(run)})
    assert logs_main(["--exp", "smoke", "--tail", "1"]) == 0
    out = capsys.readouterr().out
    assert "11_0_log.out" in out and "line 2" in out and "new run" not in out and "old run" not in out
    with pytest.raises(UserError, match="no logs of rank 3"):
        logs_main(["--exp", "smoke", "--rank", "3"])


def test_index_lines_are_json(tmp_path):
    record({"job_id": "7", "experiment": "x", "cluster": "local", "run_dir": "/r"})
    lines = (tmp_path / "jobs.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["job_id"] == "7"
