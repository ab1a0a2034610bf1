"""jobs/precision_study.py: seven precision modes on the same batches, the underflow probe, the report.

.venv/bin/python -m pytest tests/test_precision_study.py
"""

from __future__ import annotations

import inspect
import json
import subprocess

import pytest
import torch

from jobs import precision_study as study
from jobs import sweep
from lmtrain.errors import UserError
from lmtrain.model import Transformer

TINY = ["--dim", "32", "--n-layers", "1", "--n-heads", "4", "--sequence-length", "32", "--batch-size", "4"]


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    """A user's corpus as they have it: one {"text": ...} object per line."""
    path = tmp_path_factory.mktemp("data") / "texts.jsonl"
    lines = []
    for module in (json, subprocess, inspect, pytest):
        source = inspect.getsource(module)
        lines += [json.dumps({"text": source[i : i + 2000]}) for i in range(0, len(source), 2000)]
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_model_and_batch(weight_scale: float = 1.0):
    size = study.StudySize(dim=32, n_layers=1, n_heads=4, sequence_length=32, batch_size=4, steps=2, lr=1e-3)
    torch.manual_seed(0)
    model = Transformer(study.build_args(size, vocab_size=64))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(weight_scale)
    tokens = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}


def test_underflow_probe_counts_gradients_that_fp16_zeroes():
    cpu = torch.device("cpu")
    model, batch = tiny_model_and_batch()
    normal = study.underflow_probe(model, batch, cpu, static_scale=2.0**16)
    # Weights 100x smaller give gradients 100x-10^4x smaller: most fall below fp16's 2^-24.
    small = study.underflow_probe(*tiny_model_and_batch(weight_scale=0.01), cpu, static_scale=2.0**16)
    # Every gradient value is non-zero in fp32 except the embedding rows of tokens the batch lacks.
    assert normal["nonzero_fp32"] == small["nonzero_fp32"] > 0.9 * sum(p.numel() for p in model.parameters())
    assert normal["underflow"] < 0.01 and small["underflow"] > 0.3
    # Scaling by 2^16 rescues most of what a cast would lose; it never loses more.
    assert small["cast_underflow_scaled"] < small["cast_underflow"] / 2
    assert normal["cast_underflow_scaled"] <= normal["cast_underflow"]
    assert small["smallest_nonzero"] < study.FP16_TINY < normal["smallest_nonzero"] * 1e3
    assert all(p.grad is None for p in model.parameters())  # the probe leaves no gradients behind


def test_arithmetic_labels_follow_the_hardware():
    cpu = torch.device("cpu")
    assert study.arithmetic("fp32", cpu, set()) == "native"
    assert study.arithmetic("fp16", cpu, {"avx2"}) == "emulated"
    assert study.arithmetic("fp16", cpu, {"amx_fp16"}) == "native (amx_fp16)"
    assert study.arithmetic("bf16", cpu, {"avx512_bf16", "amx_bf16"}) == "native (avx512_bf16, amx_bf16)"


def test_scale_history_lists_the_changes():
    mode = next(m for m in study.MODES if m.name == "fp16-dynamic")
    result = study.ModeResult(mode, "emulated", scales=[8.0, 8.0, 4.0, 4.0, 8.0])
    assert study.scale_history(result) == "8 → 4 (step 3) → 8 (step 5)"
    unscaled = study.ModeResult(study.MODES[0], "native", scales=[1.0, 1.0])
    assert study.scale_history(unscaled) == "-"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--modes", "fp32,fp8"], r"--modes: unknown \['fp8'\]"),
        (["--steps", "1"], "--steps must be >= 2"),
        (["--dim", "0"], "--dim must be > 0"),
        (["--probe-every", "0"], "--probe-every and --growth-interval must be >= 1"),
    ],
)
def test_bad_command_line(tmp_path, jsonl, argv, message):
    with pytest.raises(UserError, match=message):
        study.main(["--dataset", str(jsonl), "--tokenizer", "byte", "--out", str(tmp_path), *argv])


def test_missing_dataset_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="nothing.jsonl"):
        study.main(["--dataset", str(tmp_path / "nothing.jsonl"), "--tokenizer", "byte", *TINY])


@pytest.mark.slow
def test_make_sweep_precision_runs_the_seven_modes_and_reports(tmp_path, jsonl):
    out = tmp_path / "precision"
    argv = ["--sweep", "precision", "--dataset", str(jsonl), "--tokenizer", "byte", "--out", str(out)]
    argv += [*TINY, "--steps", "4", "--probe-every", "2", "--growth-interval", "2"]
    assert sweep.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    modes = {m["mode"]["name"]: m for m in results["modes"]}
    assert list(modes) == list(study.MODE_NAMES)
    assert all(len(m["losses"]) == 4 and len(m["scales"]) == 4 for m in modes.values())
    # Same initial weights, same first batch: every mode's first loss is fp32's up to rounding.
    first = modes["fp32"]["losses"][0]
    assert all(abs(m["losses"][0] - first) < 2e-2 for m in modes.values())
    assert modes["bf16-pure"]["losses"] != modes["fp32"]["losses"]  # bf16 numerics do differ
    # lmtrain's dynamic scaler and torch's GradScaler follow one policy: the scale doubles after 2 clean
    # steps and halves on a step with inf/NaN gradients, which both then skip.
    dynamic, torch_scaler = modes["fp16-dynamic"], modes["fp16-gradscaler"]
    assert dynamic["scales"] == torch_scaler["scales"] and dynamic["skipped"] == torch_scaler["skipped"]
    assert dynamic["scales"][:3] == [65536.0, 65536.0, 131072.0]
    assert dynamic["scales"][3] == (65536.0 if dynamic["skipped"][2] else 131072.0)
    assert modes["fp16-static"]["scales"] == [65536.0] * 4 and modes["fp32"]["scales"] == [1.0] * 4
    assert [p["step"] for p in modes["fp16-unscaled"]["underflow"]] == [1, 2, 4]
    assert all(0 <= p["underflow"] <= 1 for p in modes["fp16-unscaled"]["underflow"])
    has_fp16 = bool(study.cpu_flags() & {"avx512_fp16", "amx_fp16"})
    for name, m in modes.items():
        expected_emulated = m["mode"]["amp"] == "fp16" and not has_fp16
        assert (m["arithmetic"] == "emulated") == expected_emulated, name
        assert m["tokens_per_s"] > 0
    report = (out / "report.md").read_text()
    table_rows = [line for line in report.splitlines() if line.startswith("| fp") or line.startswith("| bf")]
    assert [row.split("|")[1].strip() for row in table_rows[:7]] == list(study.MODE_NAMES)
    assert "131072 (step 3)" in report and "Gradient underflow in fp16 without loss scaling" in report
    if not has_fp16:
        assert "**Emulated rows: fp16-unscaled, fp16-static, fp16-dynamic, fp16-gradscaler.**" in report
    assert (out / "precision.png").stat().st_size > 10_000
    assert not list(out.glob("*.tmp"))


def test_the_launcher_job_runs_the_same_study(tmp_path, jsonl):
    """--cluster hands the job this command's study arguments (absolute paths), without its own."""
    argv = ["--dataset", str(jsonl), "--tokenizer", "byte", "--modes", "fp32,fp16-dynamic", *TINY]
    argv += ["--steps", "3", "--growth-interval", "5", "--cluster", "local", "--account", "x", "--wait"]
    args = study.build_parser().parse_args(argv)
    job_argv = study.job_arguments(args, "cpu", tmp_path / "out")
    again = vars(study.build_parser().parse_args(job_argv))
    expected = {**vars(args), "cluster": None, "account": None, "wait": False, "size": "cpu"}
    assert again == {**expected, "out": str(tmp_path / "out")}


@pytest.mark.slow
@pytest.mark.slurm
def test_study_as_a_launcher_job_on_local_slurm(tmp_path, jsonl):
    out = tmp_path / "precision"
    argv = ["--cluster", "local", "--wait", "--dataset", str(jsonl), "--tokenizer", "byte", "--out", str(out)]
    assert study.main([*argv, *TINY, "--steps", "3", "--modes", "fp32,fp16-unscaled"]) == 0
    task = json.loads((out / "task.json").read_text())
    assert task["command"][task["command"].index("-m") + 1] == "jobs.precision_study"
    assert "jobs.precision_study" in (out / "job.sbatch").read_text()
    results = json.loads((out / "results.json").read_text())
    assert [m["mode"]["name"] for m in results["modes"]] == ["fp32", "fp16-unscaled"]
    assert (out / "report.md").is_file() and (out / "precision.png").is_file()
