"""Every command of the README's ```bash blocks, run from a fresh clone in a fresh shell after the
README's set-up line, with tiny inputs.

    python -m pytest tests/test_readme_commands.py -q

The clone reuses this test run's virtualenv instead of installing one: its `.venv` holds a `.pth` that
adds this environment's site-packages, an `lmtrain` launcher of the clone's code (as an editable install
has), and an up-to-date `make setup` stamp, so
`make setup && source .venv/bin/activate` does in the clone what it does after a real set-up. The shell
gets a PATH without this environment's bin/, so a command that works only because the test's own
Python is on PATH fails here as it would for a user.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SETUP = "make setup && source .venv/bin/activate"

# The main job's flags shrunk to seconds: a corpus of a few stdlib files, a byte tokenizer, a tiny model.
TINY_TRAIN = (
    "--dataset data/tiny --data.tokenizer byte --training.steps 4 --training.eval_batches 2 "
    "--model.dim 64 --model.n_layers 1 --model.n_heads 2 --model.n_kv_heads 1 --sequence-length 64 "
    "--batch-size 4 --data.interleave 1 --logging.peak_tflops 1 --training.output_dir runs/tiny"
)

# README line (comment stripped) -> the command the test runs: the same with tiny inputs, in the order
# run (later commands use what earlier ones wrote: runs/tiny, data/stdlib, tok/).
RUN = {
    SETUP: "true",
    "make train": f'make train ARGS="{TINY_TRAIN}"',
    "make test": 'make test PYTEST_ARGS="tests/test_layers.py -q"',
    "lmtrain prepare --source stdlib --out data/stdlib --tokenizer bpe:8192 --pretokenize":
        "lmtrain prepare --source stdlib --out data/stdlib --tokenizer bpe:300 --pretokenize --max-documents 30",
    "lmtrain data stats --dataset data/stdlib --sequence-length 4096 --batch-size 32":
        "lmtrain data stats --dataset data/stdlib --sequence-length 256 --batch-size 4 --batches 2",
    "lmtrain data show --dataset data/stdlib --index 0 --tokens 200":
        "lmtrain data show --dataset data/stdlib --index 0 --tokens 200",
    "lmtrain params --preset llama3-8b --vocab-size 131072": "lmtrain params --preset llama3-8b --vocab-size 131072",
    "lmtrain params --presets gpt2-small,gpt2-xl,llama3-8b --device gh200 --plot shares.png":
        "lmtrain params --presets gpt2-small,gpt2-xl,llama3-8b --device gh200 --plot shares.png",
    "lmtrain params --preset llama3-8b --strategy fsdp --gpus 4 --steps 1000 --device gh200 --mfu 0.35":
        "lmtrain params --preset llama3-8b --strategy fsdp --gpus 4 --steps 1000 --device gh200 --mfu 0.35",
    "lmtrain predict --preset llama3-8b --device gh200 --seq 2048 --fused --compile":
        "lmtrain predict --preset llama3-8b --device gh200 --seq 2048 --fused --compile",
    "lmtrain predict --course": "lmtrain predict --course",
    'lmtrain generate --run RUN_DIR --prompt "def main(" --temperature 0.8 --top-k 50':
        'lmtrain generate --run runs/tiny --prompt "def main(" --temperature 0.8 --top-k 50 --max-new-tokens 8',
    "lmtrain export-hf --run RUN_DIR --out hf/": "lmtrain export-hf --run runs/tiny --out hf/",
    "lmtrain tokenizer train --input corpus.txt --vocab-size 8192 --out tok/ --special-token '<|endoftext|>'":
        "lmtrain tokenizer train --input corpus.txt --vocab-size 300 --out tok/ --special-token '<|endoftext|>'",
    'lmtrain tokenizer encode --tokenizer tok/ --text "def f(x): return x"':
        'lmtrain tokenizer encode --tokenizer tok/ --text "def f(x): return x"',
    "lmtrain prepare --source stdlib --out data/stdlib-ours --tokenizer bpe:8192 --bpe-impl lmtrain":
        "lmtrain prepare --source stdlib --out data/stdlib-ours --tokenizer bpe:300 --bpe-impl lmtrain --max-documents 20",
    "lmtrain gemm-report trace.sqlite --run RUN_DIR --markdown r.md":
        "lmtrain gemm-report trace.sqlite --run runs/tiny --markdown r.md",
    "lmtrain compare-runs RUN_DIR RUN_DIR --markdown cmp.md --png cmp.png":
        "lmtrain compare-runs runs/tiny runs/tiny-again --markdown cmp.md --png cmp.png",
    "lmtrain plot-loss runs/* --smooth 10 --out loss.png": "lmtrain plot-loss runs/* --smooth 10 --out loss.png",
    "lmtrain bench --help": "lmtrain bench --help",
    "lmtrain bench data": "lmtrain bench data --max-documents 20 --sequence-length 256 --batches 2 --rounds 2",
}  # fmt: skip

# What each command must print (stdout and stderr together), beyond exiting with status 0.
EXPECT = {
    "make train": ["unigram entropy", "step 4/4 | loss", "mean of the last 4 steps", "sample (top-k 40"],
    "make test": ["passed"],
    "lmtrain data stats": ["packed", "padded"],
    "lmtrain params --preset llama3-8b --vocab-size 131072": ["8,053,329,920"],
    "lmtrain predict --course": ["32.6"],
    "lmtrain generate": ["def main("],
    "lmtrain export-hf": ["LlamaForCausalLM"],
    "lmtrain gemm-report": ["FeedForward"],
    "lmtrain bench --help": ["data", "nsys_report"],
    "lmtrain bench data": ["ratio"],
}


def readme_commands(text: str) -> list[str]:
    """The lines of the README's ```bash blocks, trailing `# comments` removed."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        for line in block.splitlines():
            line = re.sub(r"\s{2,}#.*$", "", line).strip()
            if line:
                lines.append(line)
    return lines


def test_the_test_knows_every_readme_command():
    commands = readme_commands((REPO / "README.md").read_text())
    assert commands[0] == SETUP, "the README's first command is its set-up line"
    assert set(commands) == set(RUN), (
        f"README commands without a tiny run here: {sorted(set(commands) - set(RUN))}; "
        f"runs here no longer in the README: {sorted(set(RUN) - set(commands))}"
    )


def make_clone(tmp_path: Path) -> Path:
    """`git clone` of this checkout (its committed HEAD) with a .venv that reuses this environment."""
    clone = tmp_path / "lmtrain"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    venv = clone / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    (purelib / "reuse_test_env.pth").write_text(
        f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n"
    )
    launcher = venv / "bin" / "lmtrain"
    launcher.write_text(  # what `pip install -e .` gives: the clone's lmtrain, wherever the shell is
        f"#!{venv}/bin/python\nimport sys\nsys.path.insert(0, {str(clone)!r})\n"
        "from lmtrain.cli import main\nsys.exit(main())\n"
    )
    launcher.chmod(0o755)
    (venv / ".lmtrain-installed").touch()  # newer than the clone's pyproject.toml: `make setup` is done
    return clone


def tiny_inputs(clone: Path) -> None:
    """The files the README's commands read: a tiny corpus, a text file, an nsys export."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmtrain.profiling.nsys_synth import write_export

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:24]
    texts = [f.read_text(errors="replace")[:3000] for f in files]
    (clone / "data" / "tiny").mkdir(parents=True)
    pq.write_table(pa.table({"text": texts[:20]}), clone / "data" / "tiny" / "train.parquet")
    pq.write_table(pa.table({"text": texts[20:]}), clone / "data" / "tiny" / "val.parquet")
    (clone / "corpus.txt").write_text("<|endoftext|>".join(texts[:8]))
    # The tiny run's FFN shapes: 4 x 64 tokens, dim 64, hidden 256 (multiple_of 256).
    write_export(
        clone / "trace.sqlite", steps=1, n_layers=1, tokens=256, dim=64, hidden=256, with_sizes=False
    )


def shell(clone: Path, command: str) -> subprocess.CompletedProcess:
    """`command` in a fresh login-less bash after the set-up line, without this environment on PATH."""
    env_bin = str(Path(sys.executable).parent)
    path = ":".join(p for p in subprocess.os.environ.get("PATH", "").split(":") if p and p != env_bin)
    env = {k: v for k, v in subprocess.os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = path or "/usr/bin:/bin"
    return subprocess.run(
        ["bash", "-c", f"{SETUP} && {command}"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_every_readme_command_runs_in_a_fresh_clone(tmp_path):
    if shutil.which("make") is None or shutil.which("git") is None:
        pytest.skip("needs make and git")
    clone = make_clone(tmp_path)
    tiny_inputs(clone)
    failures = []
    for readme_line, command in RUN.items():
        if readme_line == "lmtrain compare-runs RUN_DIR RUN_DIR --markdown cmp.md --png cmp.png":
            shutil.copytree(clone / "runs" / "tiny", clone / "runs" / "tiny-again")
        out = shell(clone, command)
        printed = out.stdout + out.stderr
        missing = [want for key, wants in EXPECT.items() if readme_line.startswith(key) for want in wants
                   if want not in printed]  # fmt: skip
        if out.returncode != 0 or missing:
            failures.append(f"$ {command}\nexit {out.returncode}, missing {missing}\n{printed[-3000:]}")
    assert not failures, "\n\n".join(failures)
    assert (clone / "hf" / "config.json").is_file() and (clone / "cmp.png").is_file()
    assert (clone / "loss.png").is_file() and (clone / "r.md").is_file()
