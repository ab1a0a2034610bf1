"""`lmtrain params`: exact counts on the meta device, the FLOPs formula, the memory estimate, the CLI."""

from __future__ import annotations

import pytest

from lmtrain.accounting import (
    COMPONENTS,
    activation_elements_per_token,
    count_parameters,
    flops_per_token,
    main,
    memory_estimate,
)
from lmtrain.config import ModelConfig
from lmtrain.errors import UserError
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


def test_memory_estimate_bytes_per_parameter():
    args = llama3_8b()
    mem = memory_estimate(args, 2048)
    n = 8_053_329_920
    assert mem["fp32"]["states"] == 16 * n
    assert mem["bf16"]["states"] == 8 * n
    assert mem["mixed"]["weights"] == 6 * n and mem["mixed"]["optimizer"] == 8 * n
    act = activation_elements_per_token(args)
    assert act == 32 * (7 * 4096 + 2 * 1024 + 4 * 14336) + 2 * 4096 + 3 * 131072
    assert mem["bf16"]["activations_per_sequence"] == 2 * act * 2048


def test_cli_prints_the_8b_table(capsys):
    assert main(["--preset", "llama3-8b", "--vocab-size", "131072", "--seq-len", "2048"]) == 0
    out = capsys.readouterr().out
    assert "8,053,329,920" in out and "7,516,459,008" in out
    assert "48.32 GFLOP" in out
    assert "mixed" in out and "AdamW" in out


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
