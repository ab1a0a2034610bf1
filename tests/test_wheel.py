"""The installed product: a wheel in a fresh virtualenv, used from a directory outside the checkout.

The wheel is built from this checkout, installed without dependencies into a new venv that reuses the
test environment's packages (a `.pth` line, so nothing is downloaded), and its `lmtrain` command runs
training with `--profile` on CPU, `params`, `generate`, `export-hf`, the nsys GEMM report and the
run comparison from a temporary directory, where the checkout is not importable.
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("wheel")
    dist = root / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
          str(REPO)], cwd=root, env=dict(os.environ))  # fmt: skip
    (wheel,) = dist.glob("lmtrain-*.whl")
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    purelib = Path(
        subprocess.check_output(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    # The test environment's packages, without processing its .pth files: the checkout's editable
    # install must not be visible to the wheel's venv.
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()] or [sysconfig.get_paths()["purelib"]]
    (purelib / "test_env_packages.pth").write_text("\n".join(deps) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q", str(wheel)],
         cwd=root, env=dict(os.environ))  # fmt: skip
    work = root / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{env_dir / 'bin'}:{env['PATH']}"
    env["OMP_NUM_THREADS"] = "1"
    return {"wheel": wheel, "py": py, "purelib": purelib, "bin": env_dir / "bin", "cwd": work, "env": env}


def test_wheel_installs_only_lmtrain_at_the_top_level(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"lmtrain"}, top
    for module in ("lmtrain/profiling/nsys_sqlite.py", "lmtrain/tools/nsys_gemm_report.py", "lmtrain/nvtx.py",
                   "lmtrain/configs/tiny-cpu.yaml"):  # fmt: skip
        assert module in names
    assert not any(n.startswith(("jobs/", "profiling/", "tools/")) for n in names)


def test_installed_commands_run_outside_the_checkout(installed, stdlib_corpus):
    cwd, env, lm = installed["cwd"], installed["env"], str(installed["bin"] / "lmtrain")
    where = _run(
        [str(installed["py"]), "-c", "import lmtrain, lmtrain.tools; print(lmtrain.__file__)"], cwd, env
    )
    assert Path(where.stdout.strip()).is_relative_to(installed["purelib"]), where.stdout

    params = _run([lm, "params", "--preset", "llama3-8b", "--vocab-size", "131072"], cwd, env)
    assert "8,053,329,920" in params.stdout

    run = cwd / "run"
    _run([lm, "train", "--dataset", str(stdlib_corpus), "--data.tokenizer", "byte", "--model.preset", "tiny",
          "--model.dim", "32", "--model.n_layers", "1", "--model.n_heads", "2", "--model.n_kv_heads", "1",
          "--model.multiple_of", "32", "--sequence-length", "32", "--batch-size", "2", "--training-steps", "4",
          "--precision.model_dtype", "fp32", "--logging.progress", "false", "--logging.peak_tflops", "1",
          "--training.eval_batches", "1", "--profile", "--profile-step-start", "2", "--profile-step-end", "3",
          "--profiling.nvtx", "false", "--training.output_dir", str(run)], cwd, env)  # fmt: skip
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["exit_reason"] == "completed"
    assert (run / "torch_profile.md").is_file() and (run / "torch_trace.json").is_file()
    assert list((run / "checkpoints").glob("step-*.pt"))

    gen = _run([lm, "generate", "--run", str(run), "--prompt", "def ", "--max-new-tokens", "8",
                "--temperature", "0"], cwd, env)  # fmt: skip
    assert gen.stdout.strip()
    _run([lm, "export-hf", "--run", str(run), "--out", str(cwd / "hf")], cwd, env)
    assert (cwd / "hf" / "config.json").is_file()

    trace = cwd / "synth.sqlite"
    _run([str(installed["py"]), "-c", f"from lmtrain.profiling.nsys_synth import write_export; write_export({str(trace)!r}, steps=1)"],
         cwd, env)  # fmt: skip
    report = _run(
        [lm, "gemm-report", str(trace), "--gpu", "gh200", "--markdown", str(cwd / "gemm.md")], cwd, env
    )
    assert "GEMM" in report.stdout and (cwd / "gemm.md").is_file()

    cmp = _run([lm, "compare-runs", str(run), "--markdown", str(cwd / "cmp.md")], cwd, env)
    assert (cwd / "cmp.md").is_file(), cmp.stdout


def test_checkout_only_parts_fail_with_one_line_from_an_installed_copy(installed):
    proc = subprocess.run([str(installed["bin"] / "lmtrain"), "bench", "train"], cwd=installed["cwd"],
                          env=installed["env"], capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "checkout" in lines[0], proc.stderr
