"""The roofline prediction of a training step: FLOPs against the 6N + 12LHQT count, memory traffic of
the optimizer and compiled chains, bounds, the device table, the `lmtrain predict` command."""

from __future__ import annotations

import pytest

from lmtrain.accounting import count_parameters, flops_per_token
from lmtrain.cli import main as cli_main
from lmtrain.config import ModelConfig
from lmtrain.errors import UserError
from lmtrain.model import model_args_from_config
from lmtrain.roofline import COURSE_VOCAB, device, predict


def llama8b(seq: int = 4096):
    return model_args_from_config(ModelConfig(preset="llama3-8b"), vocab_size=COURSE_VOCAB, seq_len=seq)


def test_gemm_flops_are_six_n_per_token_and_attention_the_causal_share():
    args, seq = llama8b(), 2048
    pred = predict(args, device("gh200"), seq, batch=2)
    tokens = 2 * seq
    gemm = sum(op.count * op.flops for op in pred.ops if op.cls == "gemm")
    params = count_parameters(args)
    norms = (2 * args.n_layers + 1) * args.dim  # the only non-embedding parameters outside GEMMs
    assert gemm == pytest.approx(6 * (params["non_embedding"] - norms) * tokens, rel=1e-9)
    attention = sum(op.count * op.flops for op in pred.ops if op.cls == "attention")
    full = 12 * args.n_layers * args.n_heads * args.head_dim * seq * tokens  # fwd + bwd, not causal
    # causal halves it; flash backward recomputes the scores: 3.5 forward products instead of 3
    assert attention == pytest.approx(full / 2 * 3.5 / 3, rel=1e-9)
    assert pred.model_flops_per_token == flops_per_token(args, seq) == pytest.approx(48.3e9, rel=2e-3)


def test_bound_is_consistent_and_below_the_peak():
    pred = predict(llama8b(), device("gh200"), 2048)
    assert pred.tokens_per_s * pred.step_seconds == pytest.approx(2048)
    assert 0 < pred.mfu < 1
    gemm_seconds = sum(r["seconds"] for g, r in pred.by_group().items() if g.startswith("gemm"))
    assert gemm_seconds == pytest.approx(
        sum(op.count * op.flops for op in pred.ops if op.cls == "gemm") / 989e12
    )  # the 8B's GEMMs are compute-bound on a GH200
    assert pred.by_group()["optimizer"]["flops"] == 0 and pred.by_group()["optimizer"]["bytes"] > 0


def test_fused_optimizer_compile_and_longer_sequences_raise_the_bound_in_the_course_order():
    args, gh200 = llama8b(), device("gh200")
    baseline = predict(args, gh200, 2048)
    fused = predict(args, gh200, 2048, fused=True)
    compiled = predict(args, gh200, 2048, fused=True, compiled=True)
    long = predict(args, gh200, 4096, fused=True)
    assert baseline.mfu < fused.mfu < compiled.mfu
    assert fused.mfu < long.mfu  # the optimizer's fixed cost spreads over twice the tokens
    # the fused AdamW moves 14 of foreach's 38 bytes per parameter
    opt = lambda p: p.by_group()["optimizer"]["bytes"]  # noqa: E731
    n = count_parameters(args)["total"]
    assert opt(baseline) - opt(fused) == pytest.approx((38 - 14) * n)
    # compile shrinks the norms' traffic and touches no GEMM
    assert compiled.by_group()["norm"]["bytes"] < fused.by_group()["norm"]["bytes"] / 5
    gemms = lambda p: {g: r for g, r in p.by_group().items() if g.startswith("gemm")}  # noqa: E731
    assert gemms(compiled) == gemms(fused)


def test_gemm_efficiency_slows_only_compute():
    args, gh200 = llama8b(), device("gh200")
    full, half = predict(args, gh200, 2048), predict(args, gh200, 2048, gemm_efficiency=0.5)
    assert half.by_group()["optimizer"] == full.by_group()["optimizer"]
    assert half.by_group()["attention"]["seconds"] == pytest.approx(
        2 * full.by_group()["attention"]["seconds"]
    )


def test_device_peaks_come_from_the_trainer_table_with_the_datasheet_bandwidths():
    from lmtrain.metrics import PEAK_TFLOPS

    trainer_bf16 = {needles: peaks["bf16"] for needles, peaks in PEAK_TFLOPS}
    assert device("GH200").tflops == trainer_bf16[("GH200",)] == 989.0
    assert device("h100-pcie").tflops == trainer_bf16[("H100", "PCIE")] == 756.0
    bandwidths = {"gh200": 4.0e12, "h100-sxm": 3.35e12, "h200": 4.8e12, "a100": 2.039e12}  # datasheets
    assert {key: device(key).bandwidth for key in bandwidths} == bandwidths


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--device", "tpu-v5"], "--device 'tpu-v5': unknown GPU; expected one of v100-sxm2"),
        (["--preset", "llama3-70b"], "--preset 'llama3-70b': unknown; valid presets: llama3-8b"),
        (["--seq", "0"], "--seq and --batch must be >= 1"),
        (["--gemm-efficiency", "1.5"], "--gemm-efficiency must be in (0, 1]"),
        (["--vocab-size", "0"], "--vocab-size must be >= 1"),
    ],
)
def test_bad_arguments_are_user_errors(argv, message, capsys):
    assert cli_main(["predict", *argv]) == 2
    assert message in capsys.readouterr().err
    with pytest.raises(UserError):
        from lmtrain.roofline import main

        main(argv)


def test_cli_prints_gemm_shapes_classes_and_the_bound(capsys):
    assert (
        cli_main(["predict", "--preset", "llama3-8b", "--device", "gh200", "--seq", "2048", "--fused"]) == 0
    )
    out = capsys.readouterr().out
    assert "gemm 2048x4096 @ 4096x14336 (w1, w3)" in out and "optimizer" in out and "norm" in out
    assert "fused AdamW, eager" in out and "MFU" in out and "48.3 GFLOP/token" in out


def test_cli_course_table_compares_with_the_published_figures(capsys):
    assert cli_main(["predict", "--course"]) == 0
    out = capsys.readouterr().out
    for text in ("baseline", "fused + compile", "seq 4096", "32.6%", "41.6%", "43.5%", "6,674", "8,356"):
        assert text in out


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["predict", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--gemm-efficiency" in out and "default: 131072" in out and "gh200" in out
