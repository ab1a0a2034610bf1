"""`lmtrain doctor`: real torch.profiler traces of training loops (the examples, a user's own loop written
with export_chrome_trace or tensorboard_trace_handler, lmtrain's own torch_trace.json) and bad input."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import torch

from lmtrain.tools.common import run_tool
from lmtrain.tools.diagnose import diagnose, main, to_markdown

REPO = Path(__file__).resolve().parents[1]
PLANTED = {
    "lm": {"data-loader", "host-sync", "fp32-matmul", "tiny-ops", "repeated-work", "recompile"},
    "vit": {"data-loader", "host-sync", "fp32-matmul", "tiny-ops", "repeated-work", "memory-growth"},
}


def checks(report: dict) -> set[str]:
    return {f["check"] for f in report["findings"]}


# ----------------------------------------------------------------------------- a user's own loop


def user_loop(path: Path, *, steps: int = 4, item_every_step: bool = False, mark_steps: bool = True,
              record_shapes: bool = True, handler_dir: Path | None = None, gzip_it: bool = False,
              width: int = 64, batch: int = 8, autocast: bool = False) -> Path:  # fmt: skip
    """A small training loop profiled the way the torch.profiler docs show; returns the trace path."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                                torch.nn.ReLU(), torch.nn.Linear(width, 4))  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(512, 32), torch.randint(4, (512,))),
                                       batch_size=batch)  # fmt: skip
    on_ready = (
        torch.profiler.tensorboard_trace_handler(str(handler_dir), use_gzip=gzip_it) if handler_dir else None
    )
    # without prof.step() calls a schedule never leaves its warm-up: profile everything then
    schedule = torch.profiler.schedule(wait=0, warmup=1, active=steps, repeat=1) if mark_steps else None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=record_shapes,
                                profile_memory=True, schedule=schedule, on_trace_ready=on_ready) as prof:  # fmt: skip
        for i, (x, y) in enumerate(data):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if item_every_step:
                loss.item()
            if mark_steps:
                prof.step()
            if i == steps:
                break
    if handler_dir:
        return handler_dir
    prof.export_chrome_trace(str(path))
    return path


def test_a_clean_user_loop_gets_no_sync_finding_and_a_sync_every_step_does(tmp_path):
    clean = diagnose(user_loop(tmp_path / "clean.json"))
    synced = diagnose(user_loop(tmp_path / "synced.json", item_every_step=True))
    assert clean["steps"] == 4 and clean["step_source"] == "ProfilerStep#N spans"
    assert "host-sync" not in checks(clean)
    sync = next(f for f in synced["findings"] if f["check"] == "host-sync")
    assert "item x1 per step" in sync["evidence"] and "CUDA trace" in sync["measured"]
    assert sync["ms_per_step"] > 0


def test_fp32_matmuls_without_autocast_and_none_with_it(tmp_path):
    fp32 = diagnose(user_loop(tmp_path / "t.json", width=512, batch=64))
    finding = next(f for f in fp32["findings"] if f["check"] == "fp32-matmul")
    assert "of 8 matmuls/step in fp32" in finding["evidence"] and finding["share"] >= 0.05
    bf16 = diagnose(user_loop(tmp_path / "b.json", width=512, batch=64, autocast=True))
    assert "fp32-matmul" not in checks(bf16)
    no_shapes = diagnose(user_loop(tmp_path / "n.json", record_shapes=False))
    assert "fp32-matmul" not in checks(no_shapes)
    assert any("record_shapes=True" in n for n in no_shapes["notes"])


def test_cpu_trace_says_what_needs_a_gpu(tmp_path):
    report = diagnose(user_loop(tmp_path / "t.json"))
    assert report["device"] == "cpu"
    assert any(n.startswith("pageable-copy:") and "GPU" in n for n in report["notes"])
    assert any("ProfilerActivity.CUDA" in n for n in report["notes"])


def test_peak_memory_by_category(tmp_path):
    report = diagnose(user_loop(tmp_path / "t.json"))
    mem = report["memory"]
    assert mem["device"] == "cpu" and mem["peak_bytes"] > 0
    assert "activations (forward)" in mem["categories"]
    assert sum(mem["categories"].values()) == pytest.approx(mem["peak_bytes"], rel=0.01)


def test_trace_without_step_markers_is_one_window(tmp_path):
    report = diagnose(user_loop(tmp_path / "t.json", mark_steps=False))
    assert report["steps"] == 1 and "no step markers" in report["step_source"]


@pytest.mark.parametrize("gzip_it", [False, True])
def test_tensorboard_trace_handler_directory(tmp_path, gzip_it):
    run_dir = user_loop(tmp_path, handler_dir=tmp_path / "tb", gzip_it=gzip_it)
    (trace,) = list(run_dir.iterdir())
    assert trace.name.endswith(".pt.trace.json.gz" if gzip_it else ".pt.trace.json")
    report = diagnose(run_dir)
    assert report["trace"] == str(trace) and report["steps"] == 4


@pytest.mark.slow
def test_lmtrain_torch_trace_steps_from_its_labels(tmp_path):
    from lmtrain.profiling.smoke import run

    run(5, tmp_path, torch_profile=True, window=(2, 4))
    report = diagnose(tmp_path)  # the run directory
    assert report["trace"].endswith("torch_trace.json")
    assert report["steps"] == 3 and report["step_source"] == "lmtrain/data_wait step starts"


# ----------------------------------------------------------------------------- output forms


def test_json_markdown_and_plain_output(tmp_path, capsys):
    trace = user_loop(tmp_path / "t.json", item_every_step=True)
    assert main([str(trace), "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md")]) == 0
    plain = capsys.readouterr().out  # not a terminal: plain lines
    assert plain.splitlines()[0].startswith(f"{trace}: 4 steps")
    assert "host-device syncs inside the step" in plain and "fix: keep metrics on the device" in plain
    report = json.loads((tmp_path / "r.json").read_text())
    assert "host-sync" in checks(report)
    md = (tmp_path / "r.md").read_text()
    assert md == to_markdown(report) and "| # | problem | cost/step | evidence | fix |" in md
    assert "## Peak memory by category" in md
    assert main([str(trace), "--json"]) == 0  # no PATH: the JSON on stdout, nothing else
    assert json.loads(capsys.readouterr().out)["steps"] == 4


def test_rich_tables_on_a_terminal(tmp_path, capsys, monkeypatch):
    trace = user_loop(tmp_path / "t.json", item_every_step=True)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main([str(trace)]) == 0
    out = capsys.readouterr().out
    assert "host-device syncs inside the step" in out and "peak memory by category" in out
    assert "│" in out or "┃" in out  # drawn as a table, not plain lines
    assert main([str(trace), "--plain"]) == 0
    assert capsys.readouterr().out.startswith(f"{trace}: 4 steps")


def test_doctor_is_an_lmtrain_subcommand():
    entry = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"][
        "lmtrain.commands"
    ]
    assert entry["doctor"] == "lmtrain.tools.diagnose:main"
    out = subprocess.run([sys.executable, str(REPO / "tools" / "diagnose.py"), "--help"], capture_output=True,
                         text=True, cwd=REPO)  # fmt: skip
    assert out.returncode == 0 and "--markdown" in out.stdout and "profile_memory=True" in out.stdout


# ----------------------------------------------------------------------------- bad input


def _error(argv: list[str], capsys) -> str:
    assert run_tool(main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one clear line, no traceback
    return err


def test_truncated_trace(tmp_path, capsys):
    full = user_loop(tmp_path / "t.json").read_text()
    cut = tmp_path / "cut.json"
    cut.write_text(full[: len(full) // 2])
    err = _error([str(cut)], capsys)
    assert str(cut) in err and "not valid JSON" in err and "ends early" in err


@pytest.mark.parametrize("cut_after", ["}", "]", '"'])
def test_trace_cut_just_after_a_closing_character_still_ends_early(tmp_path, capsys, cut_after):
    full = user_loop(tmp_path / "t.json").read_text()
    cut = tmp_path / "cut.json"
    cut.write_text(full[: full.index(cut_after, len(full) // 2) + 1])
    err = _error([str(cut)], capsys)
    assert "not valid JSON" in err and "ends early" in err


def test_trace_with_a_syntax_error_in_the_middle_does_not_claim_it_ends_early(tmp_path, capsys):
    full = user_loop(tmp_path / "t.json").read_text()
    broken = tmp_path / "broken.json"
    middle = full.index("}", len(full) // 2)
    broken.write_text(full[:middle] + "}}" + full[middle + 1 :])  # one brace too many, file complete
    err = _error([str(broken)], capsys)
    assert "not valid JSON" in err and "ends early" not in err


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00", "not a JSON text file"),
        (b"step,loss\n1,2.3\n", "not valid JSON"),
        (b'{"loss": 2.3}', "not a Chrome trace (no traceEvents list)"),
        (
            b'{"traceEvents": [{"ph": "X", "cat": "kernel", "name": "k", "ts": 1, "dur": 2}]}',
            "without PyTorch operator",
        ),
    ],
)
def test_not_a_trace(tmp_path, capsys, content, expected):
    path = tmp_path / "x.json"
    path.write_bytes(content)
    assert expected in _error([str(path)], capsys)


def test_bad_gzip(tmp_path, capsys):
    path = tmp_path / "x.pt.trace.json.gz"
    path.write_bytes(gzip.compress(b'{"traceEvents": [')[:-6])
    assert "gzip" in _error([str(path)], capsys)


def test_directory_without_trace_and_missing_path(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    assert "no torch.profiler trace in this directory" in _error([str(tmp_path)], capsys)
    assert "no such file or directory" in _error([str(tmp_path / "nope.json")], capsys)


# ----------------------------------------------------------------------------- the examples


def example_trace(tmp_path_factory, name: str, fixed: bool) -> dict:
    out = tmp_path_factory.mktemp(f"{name}{'_fixed' if fixed else ''}") / "trace.json"
    cmd = [sys.executable, str(REPO / "examples" / f"tiny_{name}.py"), "--steps", "5", "--profile-out", str(out),
           "--device", "cpu"] + (["--fixed"] if fixed else [])  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "mean step time:" in run.stdout
    return diagnose(out)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lm", "vit"])
def test_doctor_names_the_six_planted_problems_and_few_in_the_fixed_version(tmp_path_factory, name):
    planted = example_trace(tmp_path_factory, name, fixed=False)
    fixed = example_trace(tmp_path_factory, name, fixed=True)
    assert PLANTED[name] <= checks(planted), to_markdown(planted)
    assert not checks(fixed) & PLANTED[name], to_markdown(fixed)
    for finding in planted["findings"]:
        assert finding["fix"] and finding["evidence"]


# ----------------------------------------------------------------------------- CUDA events (no GPU here)


def test_cuda_paths_on_a_cpu_trace_with_injected_cuda_events_mock(tmp_path):
    """No GPU here: a real CPU trace gets the CUDA events torch.profiler writes on a GPU (cuda_runtime
    calls inside the ops, kernels and copies linked by `correlation`), in their documented form."""
    doc = json.loads(user_loop(tmp_path / "t.json", item_every_step=True, width=512, batch=64).read_text())
    events, extra, corr = doc["traceEvents"], [], 0

    def launch(op: dict, cat: str, name: str, dur: float, args: dict | None = None) -> None:
        nonlocal corr
        corr += 1
        runtime = "cudaMemcpyAsync" if cat == "gpu_memcpy" else "cudaLaunchKernel"
        extra.append({"ph": "X", "cat": "cuda_runtime", "name": runtime, "pid": op["pid"], "tid": op["tid"],
                      "ts": op["ts"], "dur": min(op["dur"], 1.0), "args": {"correlation": corr}})  # fmt: skip
        extra.append({"ph": "X", "cat": cat, "name": name, "pid": 0, "tid": 7, "ts": op["ts"] + 5, "dur": dur,
                      "args": {"correlation": corr, "device": 0, "stream": 7, **(args or {})}})  # fmt: skip

    steps = [e for e in events if e.get("name", "").startswith("ProfilerStep#")]
    for e in [e for e in events if e.get("cat") == "cpu_op"]:
        if e["name"] in ("aten::mm", "aten::addmm"):
            launch(e, "kernel", "ampere_sgemm_128x64_tn", 1000.0)
        elif e["name"] == "aten::_local_scalar_dense":
            launch(e, "gpu_memcpy", "Memcpy DtoH (Device -> Pageable)", 2.0, {"bytes": 4})
            extra.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "pid": e["pid"],
                          "tid": e["tid"], "ts": e["ts"] + e["dur"] / 2, "dur": e["dur"] / 4, "args": {}})  # fmt: skip
    for step in steps:
        launch(step, "gpu_memcpy", "Memcpy HtoD (Pageable -> Device)", 300.0, {"bytes": 2**20})
    for e in events:
        if e.get("name") == "[memory]":
            e["args"]["Device Type"], e["args"]["Device Id"] = 1, 0
    doc["traceEvents"] = events + extra
    path = tmp_path / "cuda.json"
    path.write_text(json.dumps(doc))

    report = diagnose(path)
    found = {f["check"]: f for f in report["findings"]}
    assert report["device"] == "cuda" and report["memory"]["device"] == "cuda"
    assert not any(n.startswith("pageable-copy:") for n in report["notes"])
    copy = found["pageable-copy"]
    assert "1 HtoD copies/step, 1.0 MiB/step" in copy["evidence"] and copy["ms_per_step"] == pytest.approx(
        0.3
    )
    sync = found["host-sync"]
    assert "cudaStreamSynchronize x1" in sync["evidence"] and "blocked in CUDA" in sync["measured"]
    fp32 = found["fp32-matmul"]
    assert fp32["measured"] == "GPU kernel time of fp32 matmuls"
    assert fp32["ms_per_step"] == pytest.approx(8.0)  # 8 matmuls/step (3 forward, 5 backward) x 1 ms
