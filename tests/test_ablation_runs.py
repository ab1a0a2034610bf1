"""The ablation study end to end with real training runs: locally (resumable) and as a Slurm job array.

.venv/bin/python -m pytest tests/test_ablation_runs.py
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from jobs import ablation

# A model and batch small enough that one run takes seconds; the corpus is a slice of the embedded one.
TINY = [
    "--model.dim=32",
    "--model.n_layers=1",
    "--model.n_heads=2",
    "--model.n_kv_heads=2",
    "--data.batch_size=2",
    "--data.sequence_length=32",
    "--training.eval_interval=2",
    "--training.eval_batches=1",
    "--logging.frequency=1",
    "--logging.peak_tflops=1",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus") / "stdlib"
    cmd = [sys.executable, "-m", "lmtrain", "prepare", "--source", "stdlib", "--out", str(out)]
    cmd += ["--tokenizer", "byte", "--max-documents", "40"]
    subprocess.run(cmd, check=True, capture_output=True)
    return out


def report_rows(path):
    lines = path.read_text().split("## Conclusions")[0].splitlines()
    return [
        line.split("|")[1].strip() for line in lines if line.startswith("| ") and not line.startswith("| run")
    ]


@pytest.mark.slow
def test_local_study_trains_reports_and_resumes(tmp_path, corpus):
    out = tmp_path / "study"
    argv = ["--steps", "4", "--variants", "baseline,all", "--parallel", "2", "--out", str(out)]
    argv.append(f"--data.dataset={corpus}")
    assert ablation.main([*argv, *TINY, "--max-new-tokens=8"]) == 0
    for name in ("baseline-seed0", "all-seed0"):
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["exit_reason"] == "completed" and summary["steps"] == 4
    assert report_rows(out / "report.md") == ["baseline", "all"]
    assert (out / "nll.png").stat().st_size > 5000
    text = (out / "report.md").read_text()
    assert "model.mlp=swiglu, model.norm=rmsnorm" in text and "spread is unmeasured" in text
    # generations from each variant's checkpoint: greedy and sampled for each of the same prompts
    generations = text.split("## Generations")[1]
    assert generations.count("greedy, prompt 'def '") == 2 and generations.count("sampled, prompt") == 6
    # The same command again redoes nothing: every run is finished.
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")}
    logs = []
    runs = ablation.plan(
        ablation.load_study(ablation.DEFAULT_STUDY),
        out,
        4,
        1,
        ["baseline", "all"],
        ablation.parse_overrides([f"--data.dataset={corpus}", *TINY]),
    )
    ablation.check_existing(runs)
    ablation.run_local(runs, out / "logs", log=logs.append)
    assert logs == [f"[skip] {r.name}: finished (summary.json present)" for r in runs]
    assert before == {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")}


@pytest.mark.slow
@pytest.mark.slurm
def test_study_as_a_job_array_on_local_slurm(tmp_path, corpus):
    out = tmp_path / "study"
    argv = ["--cluster", "local", "--wait", "--steps", "2", "--out", str(out), f"--data.dataset={corpus}"]
    assert ablation.main([*argv, *TINY, "--no-generations"]) == 0
    jobs = json.loads((out / "jobs.json").read_text())["jobs"]
    assert len(jobs) == 7
    array_ids = {j["job_id"].split("_")[0] for j in jobs}
    assert len(array_ids) == 1 and all("_" in j["job_id"] for j in jobs), jobs  # one array, seven tasks
    for run in ablation.plan(ablation.load_study(ablation.DEFAULT_STUDY), out, 2):
        assert json.loads((run.run_dir / "summary.json").read_text())["exit_reason"] == "completed"
        assert (run.run_dir / "task.json").is_file()  # written by the jobs launcher
    assert report_rows(out / "report.md") == [
        "baseline",
        "swiglu",
        "rope",
        "warmup",
        "cosine",
        "rmsnorm",
        "all",
    ]


@pytest.mark.slow
def test_study_on_your_own_jsonl_from_the_command_line(tmp_path):
    """No study YAML of one's own: a JSONL of {"text": ...} lines, the byte tokenizer and one new
    variant given as flags; the architecture study's baseline and that variant train and report."""
    import inspect

    data = tmp_path / "mine.jsonl"
    modules = [json, subprocess, pytest, inspect]  # their sources as the documents
    data.write_text("".join(json.dumps({"text": inspect.getsource(m)[:4000]}) + "\n" for m in modules))
    out = tmp_path / "study"
    argv = ["--study", "architecture", "--steps", "3", "--out", str(out), "--no-generations"]
    argv += ["--dataset", str(data), "--tokenizer", "byte", "--variant", "model.norm_position=post"]
    assert ablation.main([*argv, *TINY, "--training.eval_interval=0"]) == 0
    for name in ("baseline-seed0", "norm_position_post-seed0"):
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["exit_reason"] == "completed" and summary["steps"] == 3
    config = (out / "norm_position_post-seed0" / "config.yaml").read_text()
    assert "norm_position: post" in config and f"dataset: {data}" in config
    assert report_rows(out / "report.md") == ["baseline", "norm_position_post"]
    assert "model.norm_position=post" in (out / "report.md").read_text()
