"""`lmtrain params`: exact counts on the meta device, FLOPs per matmul summing to the 6N + 12LHQT formula,\nAdamW FLOPs, wall-clock, the memory tables and the largest batch, and each bad flag."""

from __future__ import annotations

import json

import pytest

from lmtrain.accounting import (
    COMPONENTS,
    adamw_flops_per_step,
    count_parameters,
    flops_breakdown,
    flops_by_part,
    flops_per_token,
    main,
    training_seconds,
)
from lmtrain.config import ModelConfig
from lmtrain.errors import UserError
from lmtrain.memory import device_memory_bytes, estimate_training_memory
from lmtrain.model import Transformer, TransformerModelArgs, model_args_from_config


def llama3_8b(seq_len: int = 2048) -> TransformerModelArgs:
    return model_args_from_config(ModelConfig(preset="llama3-8b"), vocab_size=131072, seq_len=seq_len)


def test_llama3_8b_components_sum_to_total():
    counts = count_parameters(llama3_8b())
    assert counts["total"] == 8_053_329_920
    assert counts["non_embedding"] == 7_516_459_008
    assert sum(counts[c] for c in COMPONENTS) == counts["total"]
    # Hand count: 32 blocks of (q, o: 4096^2; k, v: 4096 x 1024; 3 x 4096 x 14336; 2 norms).
    assert counts["embedding"] == counts["head"] == 131072 * 4096
    assert counts["attention"] == 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024)
    assert counts["feed_forward"] == 32 * 3 * 4096 * 14336
    assert counts["norms"] == 32 * 2 * 4096 + 4096
    assert counts["positions"] == 0


def test_count_of_a_model_equals_count_of_its_args():
    args = TransformerModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, seq_len=16,
                                norm="layernorm", mlp="gelu", pos="learned")  # fmt: skip
    model = Transformer(args)
    counts = count_parameters(model)
    assert counts == count_parameters(args)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["positions"] == 16 * 64
    assert counts["non_embedding"] == counts["total"] - 50 * 64 - 16 * 64
    assert counts["norms"] == (2 * 2 + 1) * 2 * 64  # LayerNorm: weight and bias


def test_flops_per_token_against_hand_count():
    n = 7_516_459_008
    assert flops_per_token(llama3_8b(), 2048) == 6 * n + 12 * 32 * 32 * 128 * 2048
    assert flops_per_token(llama3_8b(), 2048) / 1e9 == pytest.approx(48.3, abs=0.05)
    assert flops_per_token(llama3_8b(), 4096) / 1e9 == pytest.approx(51.5, abs=0.05)


def test_flops_breakdown_sums_to_flops_per_token_and_matches_hand_formulas():
    args = llama3_8b()
    parts = flops_breakdown(args, 2048)
    assert sum(parts.values()) == pytest.approx(flops_per_token(args, 2048), rel=1e-12)
    L, C, F, V, T = 32, 4096, 14336, 131072, 2048
    assert parts["wq"] == parts["wo"] == 6 * L * C * C
    assert parts["wk"] == parts["wv"] == 6 * L * C * 1024  # 8 key/value heads of 128
    assert parts["w1"] == parts["w2"] == parts["w3"] == 6 * L * C * F
    assert parts["scores (QK^T)"] + parts["values (AV)"] == 12 * L * 32 * 128 * T
    assert parts["head"] == 6 * C * V
    assert parts["norms"] == 6 * (2 * L + 1) * C
    # Matmuls alone: 6 x (non-embedding parameters - norm weights) + attention.
    matmul_total = sum(v for k, v in parts.items() if k != "norms")
    assert matmul_total == 6 * (7_516_459_008 - (2 * L + 1) * C) + 12 * L * 32 * 128 * T


def test_flops_by_part_for_gelu_and_longer_context():
    gpt2 = model_args_from_config(ModelConfig(preset="gpt2-xl"), vocab_size=50257, seq_len=1024)
    parts = flops_breakdown(gpt2, 1024)
    assert parts["w3"] == 0 and parts["w1"] == parts["w2"] == 6 * 48 * 1600 * 6400
    by_part = flops_by_part(gpt2, 1024)
    assert sum(by_part.values()) == pytest.approx(flops_per_token(gpt2, 1024), rel=1e-12)
    # The quadratic part of attention grows with T; the feed-forward share shrinks.
    short, long = flops_by_part(llama3_8b(), 2048), flops_by_part(llama3_8b(16384), 16384)
    assert long["attention"] / sum(long.values()) > short["attention"] / sum(short.values())
    assert long["feed_forward"] == short["feed_forward"]


def test_adamw_flops_and_training_time():
    args = llama3_8b()
    assert adamw_flops_per_step(args) == 17 * 8_053_329_920
    # 400K steps of 1024 x 1024 tokens on one 989 TFLOP/s GPU at 50% MFU.
    tokens = 400_000 * 1024 * 1024
    seconds = training_seconds(tokens, 1e9, gpus=1, peak_tflops=989.0, mfu=0.5)
    assert seconds == pytest.approx(tokens * 1e9 / (989e12 * 0.5))
    assert training_seconds(tokens, 1e9, gpus=4, peak_tflops=989.0, mfu=0.5) == pytest.approx(seconds / 4)


def test_gpt2_presets_match_gpt2_sizes():
    # GPT-2's published sizes count a tied head and biases; lmtrain's blocks have neither, so the
    # non-embedding, non-head part is what matches: 12 * L * d^2 (+ norms).
    for preset, layers, dim in (("gpt2-small", 12, 768), ("gpt2-medium", 24, 1024), ("gpt2-large", 36, 1280),
                                ("gpt2-xl", 48, 1600)):  # fmt: skip
        counts = count_parameters(model_args_from_config(ModelConfig(preset=preset), vocab_size=50257,
                                                         seq_len=1024))  # fmt: skip
        assert counts["attention"] + counts["feed_forward"] == 12 * layers * dim * dim, preset
        assert counts["positions"] == 1024 * dim


def test_cli_prints_the_8b_table(capsys):
    assert main(["--preset", "llama3-8b", "--vocab-size", "131072", "--seq-len", "2048"]) == 0
    out = capsys.readouterr().out
    assert "8,053,329,920" in out and "7,516,459,008" in out
    assert "48.320" in out  # GFLOP per token, the total row of the breakdown
    for row in (
        "wq",
        "scores (QK^T)",
        "values (AV)",
        "w3",
        "head",
        "AdamW moments",
        "activations: feed_forward",
    ):
        assert row in out
    assert "peak per GPU" in out and "AdamW step" in out


def test_cli_json_is_consistent_with_the_functions(capsys):
    argv = ["--preset", "llama3-8b", "--vocab-size", "131072", "--seq-len", "2048", "--device", "gh200",
            "--steps", "100", "--mfu", "0.33"]  # fmt: skip
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    args = llama3_8b()
    assert report["parameters"]["total"] == 8_053_329_920
    assert report["flops_per_token"]["total"] == flops_per_token(args, 2048)
    assert sum(report["flops_per_token"]["matmuls"].values()) == pytest.approx(flops_per_token(args, 2048))
    est = estimate_training_memory(args, batch_size=1, seq_len=2048, precision="bf16")
    assert report["memory"]["total_bytes"] == est.total
    best = report["largest_batch"]
    assert estimate_training_memory(args, batch_size=best, seq_len=2048).total <= device_memory_bytes("gh200")
    assert estimate_training_memory(args, batch_size=best + 1, seq_len=2048).total > device_memory_bytes(
        "gh200"
    )
    assert report["time"]["tokens"] == 100 * 2048
    assert report["time"]["seconds"] == pytest.approx(
        100 * 2048 * flops_per_token(args, 2048) / (989e12 * 0.33)
    )


def test_cli_tables_across_presets_and_context_lengths(capsys):
    presets = "gpt2-small,gpt2-medium,gpt2-large,gpt2-xl,llama3-8b"
    assert main(["--presets", presets, "--seq-len", "2048", "--markdown", "--device", "gh200"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| gpt2") or line.startswith("| llama3")]
    assert [r.split("|")[1].strip() for r in rows] == presets.split(",")
    assert "largest batch" in out and "of which T^2" in out
    assert main(["--preset", "gpt2-small", "--sweep-seq", "1024,4096,16384", "--json"]) == 0
    sweep = json.loads(capsys.readouterr().out)
    assert list(sweep) == ["T=1024", "T=4096", "T=16384"]
    shares = [
        r["flops_per_token"]["parts"]["attention"] / r["flops_per_token"]["total"] for r in sweep.values()
    ]
    assert shares == sorted(shares)  # attention's share grows with the context


def test_cli_memory_of_fsdp_on_four_gpus(capsys):
    assert main(["--preset", "llama3-8b", "--strategy", "fsdp", "--gpus", "4", "--json"]) == 0
    terms = json.loads(capsys.readouterr().out)["memory"]["terms"]
    n = count_parameters(model_args_from_config(ModelConfig(preset="llama3-8b"), vocab_size=128256,
                                                seq_len=2048))["total"]  # fmt: skip
    assert n == 8_030_261_248  # Meta's Llama-3 8B with its own 128256-token vocabulary
    assert terms["weights"] == 2 * n // 4 and terms["AdamW moments"] == 4 * n // 4
    assert terms["FSDP unsharded params"] > 0 and "DDP buckets" not in terms


def test_cli_overrides_and_list(capsys):
    assert main(["--preset", "tiny", "--vocab-size", "256", "--mlp", "gelu", "--n-layers", "2"]) == 0
    out = capsys.readouterr().out
    assert "gelu, hidden 1024" in out
    args = model_args_from_config(
        ModelConfig(preset="tiny", mlp="gelu", n_layers=2), vocab_size=256, seq_len=2048
    )
    assert f"{count_parameters(args)['total']:,}" in out
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "ablation-small" in out and "gpt2-small" in out


def test_cli_unknown_preset():
    with pytest.raises(UserError, match="valid presets: llama3-8b, tiny"):
        main(["--preset", "llama4"])


def test_cli_bad_vocab_size():
    with pytest.raises(UserError, match="--vocab-size must be a positive integer"):
        main(["--preset", "tiny", "--vocab-size", "0"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--mfu", "50"], "--mfu is a fraction"),
        (["--gpus", "2"], "--gpus 2 needs --strategy ddp or fsdp"),
        (["--device", "tpu-v5"], "unknown device 'tpu-v5'"),
        (["--tokens", "1e9"], "needs a peak: give --device"),
        (["--tokens", "1e9", "--steps", "10", "--device", "h100"], "either --tokens or --steps"),
        (["--presets", "gpt2-small,gpt5"], "unknown model.preset 'gpt5'"),
        (["--batch-size", "0"], "--batch-size must be a positive integer"),
        (["--loss-chunk", "-1"], "--loss-chunk must be >= 0"),
        (["--memory-gib", "0"], "--memory-gib must be > 0"),
        (["--presets", "tiny", "--sweep-seq", "128"], "either --presets or --sweep-seq"),
    ],
)
def test_cli_bad_flags(argv, message):
    with pytest.raises(UserError, match=message):
        main(argv)


def test_cli_bad_list_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--sweep-seq", "1024,four"])
    assert exit_info.value.code == 2
    assert "comma-separated list" in capsys.readouterr().err


def test_cli_calibrate_measures_and_prints_the_table(capsys, monkeypatch):
    import lmtrain.accounting as accounting
    from lmtrain.memory import CalibrationCase

    small = TransformerModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64, multiple_of=32,
                                 ffn_dim_multiplier=None, seq_len=32)  # fmt: skip
    monkeypatch.setattr(accounting, "calibration_cases", lambda: [CalibrationCase(small, 2, 32, "fp32")])
    assert main(["--calibrate", "--json"]) == 0
    captured = capsys.readouterr()
    (row,) = json.loads(captured.out)
    assert row["measured"] > 0 and abs(row["error"]) <= 0.15
    assert "measuring 1/1" in captured.err


def test_cli_sweep_with_a_time_column(capsys):
    assert (
        main(["--presets", "gpt2-small,gpt2-medium", "--tokens", "1e9", "--device", "h100", "--mfu", "0.5"])
        == 0
    )
    out = capsys.readouterr().out
    assert "time (1 GPU, 50% MFU)" in out and "largest batch" in out
