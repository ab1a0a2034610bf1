"""The `lmtrain` entry point."""

import subprocess
import sys

import pytest

from lmtrain.cli import SUBCOMMANDS, main
from lmtrain.errors import UserError


def test_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out


def test_unknown_subcommand_suggests(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err and "'train'" in err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "lmtrain", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("lmtrain ")


# Every command and its subcommands, as a user asks for help.
HELP_COMMANDS = [
    ["train"], ["prepare"], ["data", "stats"], ["data", "show"], ["params"], ["generate"], ["export-hf"],
    ["tokenizer", "train"], ["tokenizer", "encode"], ["bench"], ["gemm-report"], ["compare-runs"],
    ["plot-loss"], ["ablation-report"],
]  # fmt: skip

HELP_PROBE = """
import json, sys
from lmtrain.cli import main
try:
    code = main(sys.argv[1:] + ["--help"])
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in ("torch", "transformers", "matplotlib") if m in sys.modules)
print(json.dumps({"code": code, "heavy": heavy}))
"""


def test_help_of_every_command_imports_no_heavy_module():
    """--help answers before torch, transformers or matplotlib (seconds of imports) is loaded."""
    import json

    for command in [[], *HELP_COMMANDS]:
        out = subprocess.run([sys.executable, "-c", HELP_PROBE, *command], capture_output=True, text=True)
        last = json.loads(out.stdout.strip().splitlines()[-1])
        assert last == {"code": 0, "heavy": []}, (command, last, out.stderr[-500:])
        assert "usage:" in out.stdout, command


def test_help_shows_defaults(capsys):
    for command, default in ((["data", "stats"], "(default: 32)"), (["generate"], "(default: 0.8)"),
                             (["params"], "(default: llama3-8b)"), (["train"], "default: 5]")):  # fmt: skip
        try:
            main([*command, "--help"])
        except SystemExit:
            pass
        assert default in " ".join(capsys.readouterr().out.split()), command


def test_benchmark_lists_agree(capsys):
    from lmtrain.bench import available
    from lmtrain.bench import main as bench_main

    names = available()
    assert "data" in names and "nsys_report" in names
    main(["--help"])
    assert f"`bench {'|'.join(names)}`" in capsys.readouterr().out
    bench_main(["--help"])
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert listed == names


def test_batching_benchmark_refuses_a_headline_k_it_does_not_run():
    from lmtrain.bench import main as bench_main

    with pytest.raises(UserError, match="--headline-k 7 is not among --ks 1,5"):
        bench_main(["batching", "--ks", "1,5", "--headline-k", "7", "--documents", "50"])


def test_batching_benchmark_refuses_more_batches_than_the_documents_fill():
    from lmtrain.bench import main as bench_main

    with pytest.raises(UserError, match="--batches x --batch-size at most --documents, got 5, 7, 8 and 50"):
        bench_main(["batching", "--rounds", "5", "--batches", "7", "--batch-size", "8", "--documents", "50"])


def test_generate_benchmark_runs_end_to_end_on_a_tiny_model(capsys):
    pytest.importorskip("transformers")
    from lmtrain.bench import main as bench_main

    args = ["generate", "--new-tokens", "8", "--prompt-tokens", "4", "--vocab-size", "64"]
    assert bench_main(args + ["--rounds", "2", "--recompute-rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert "greedy tokens identical across the four: yes" in out
    assert "kv-cache speedup:" in out and "2 rounds, order rotating" in out


def test_generate_benchmark_refuses_negative_thread_counts():
    from lmtrain.bench import main as bench_main

    with pytest.raises(UserError, match="--speedup-threads must be >= 0 .* got 0 and -2"):
        bench_main(["generate", "--speedup-threads", "-2", "--new-tokens", "4"])


def test_generate_benchmark_times_the_speedup_on_its_own_threads_and_restores_them(capsys):
    pytest.importorskip("transformers")
    import torch

    from lmtrain.bench import main as bench_main

    before = torch.get_num_threads()
    args = ["generate", "--new-tokens", "8", "--prompt-tokens", "4", "--vocab-size", "64", "--rounds", "1"]
    assert bench_main(args + ["--recompute-rounds", "1", "--speedup-threads", "1"]) == 0
    assert "cache against recompute, 8 new tokens, 1 thread(s), alternating token by token" in (
        capsys.readouterr().out
    )
    assert torch.get_num_threads() == before


def test_doctor_examples_benchmark_alternates_two_runs_step_by_step(capsys):
    from lmtrain.bench import main as bench_main

    assert bench_main(["doctor_examples", "--rounds", "1", "--steps", "2", "--examples", "vit"]) == 0
    out = capsys.readouterr().out
    assert "planted and fixed alternating step by step" in out and "1 rounds, order rotating" in out
    assert "fixed speed-up (planted/fixed step time, median): vit " in out


def test_doctor_examples_benchmark_bad_arguments_and_a_run_that_fails():
    from lmtrain.bench import main as bench_main

    with pytest.raises(UserError, match="--examples: unknown \\['gpt'\\]; valid: lm, vit"):
        bench_main(["doctor_examples", "--examples", "vit,gpt"])
    with pytest.raises(UserError, match="--rounds and --steps must be >= 1, got 1 and 0"):
        bench_main(["doctor_examples", "--rounds", "1", "--steps", "0"])
    import importlib

    module = importlib.import_module("lmtrain_bench_doctor_examples")  # loaded by bench_main above
    from pathlib import Path

    with pytest.raises(RuntimeError, match="ended \\(2\\) before 'lockstep ready'"):
        module.LockstepRun(Path("no_such_example.py"), fixed=False, steps=3)
    # A driver that stops early closes the run's stdin: the script, waiting at a gate, exits at once.
    run = module.LockstepRun(module.EXAMPLES / "tiny_vit.py", fixed=True, steps=3)
    assert run.step(last=False).units == 1
    run.close()
    assert run.proc.returncode == 1


def test_bpe_benchmark_trains_on_one_core_each_by_default(capsys, monkeypatch):
    pytest.importorskip("tokenizers")
    import os

    from lmtrain.bench import main as bench_main

    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    args = ["bpe", "--max-mb", "0.2", "--vocab-size", "300", "--encode-mb", "0.05", "--rounds", "1"]
    assert bench_main(args) == 0
    out = capsys.readouterr().out
    assert "training on one core each" in out and "lmtrain/hf bpe train time ratio: " in out
    assert "identical ids: yes" in out
    assert "TOKENIZERS_PARALLELISM" not in os.environ  # set for the training only, then removed
    with pytest.raises(UserError, match="--workers applies to --parallel-training only"):
        bench_main(["bpe", "--workers", "2"])
    with pytest.raises(UserError, match="--max-mb -1.0: expected a size in MB, or 0 for the whole corpus"):
        bench_main(["bpe", "--max-mb", "-1"])
