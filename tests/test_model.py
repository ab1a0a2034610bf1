"""The Llama-3 model: shapes, presets, validation, masking, RoPE convention, ablation switches."""

from __future__ import annotations

import math

import pytest
import torch

from lmtrain.config import ModelConfig
from lmtrain.errors import UserError
from lmtrain.model import (
    PRESETS,
    FeedForward,
    RMSNorm,
    Transformer,
    TransformerModelArgs,
    TwoLayerFeedForward,
    apply_rotary_emb,
    clean_state_dict_keys,
    model_args_from_config,
)
from lmtrain.nvtx import parse_gemm_label


def tiny_args(**overrides) -> TransformerModelArgs:
    kwargs = dict(PRESETS["tiny"], vocab_size=97, seq_len=32, dim=64, n_layers=2)
    kwargs.update(overrides)
    return TransformerModelArgs(**kwargs)


def build(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny_args(**overrides)).eval()


def test_llama3_8b_on_meta_has_meta_parameter_count():
    args = model_args_from_config(ModelConfig(preset="llama3-8b"), vocab_size=131072, seq_len=2048)
    assert args.ffn_hidden_dim == 14336  # Meta's 8B hidden size
    with torch.device("meta"):
        model = Transformer(args)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 8_053_329_920


def test_forward_shape_and_state_dict_layout():
    model = build()
    tokens = torch.randint(0, 97, (3, 17))
    assert model(tokens).shape == (3, 17, 97)
    keys = set(model.state_dict())
    for key in (
        "tok_embeddings.weight",
        "layers.1.attention.wq.weight",
        "layers.1.attention.wk.weight",
        "layers.1.attention.wv.weight",
        "layers.1.attention.wo.weight",
        "layers.1.feed_forward.w1.weight",
        "layers.1.feed_forward.w2.weight",
        "layers.1.feed_forward.w3.weight",
        "layers.1.attention_norm.weight",
        "layers.1.ffn_norm.weight",
        "norm.weight",
        "output.weight",
    ):
        assert key in keys
    assert not any("freqs" in k for k in keys), "RoPE tables are derived, not checkpointed"
    # GQA: wk/wv project to n_kv_heads heads only.
    assert model.layers[0].attention.wk.weight.shape == (2 * 16, 64)


def test_config_overrides_win_over_preset_and_given_sizes():
    cfg = ModelConfig(preset="tiny", n_layers=3, vocab_size=1000, seq_len=64, norm="layernorm")
    args = model_args_from_config(cfg, vocab_size=50, seq_len=8)
    assert (args.n_layers, args.vocab_size, args.seq_len, args.norm) == (3, 1000, 64, "layernorm")
    assert args.dim == PRESETS["tiny"]["dim"]
    args = model_args_from_config(ModelConfig(preset="tiny"), vocab_size=50, seq_len=8)
    assert (args.vocab_size, args.seq_len) == (50, 8)


def test_every_preset_builds():
    for name in PRESETS:
        args = model_args_from_config(ModelConfig(preset=name), vocab_size=256, seq_len=128)
        with torch.device("meta"):
            Transformer(args)


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(UserError) as err:
        model_args_from_config(ModelConfig(preset="llama9"), vocab_size=10, seq_len=8)
    for name in PRESETS:
        assert name in str(err.value)


def test_dim_not_divisible_by_heads():
    with pytest.raises(UserError, match="model.dim=100 is not divisible by model.n_heads=3"):
        tiny_args(dim=100, n_heads=3, n_kv_heads=3)


def test_heads_not_multiple_of_kv_heads():
    with pytest.raises(UserError, match="model.n_heads=4 is not a multiple of model.n_kv_heads=3"):
        tiny_args(n_heads=4, n_kv_heads=3)


def test_unknown_switch_value():
    with pytest.raises(UserError, match="model.norm must be one of rmsnorm, layernorm"):
        tiny_args(norm="batchnorm")


def test_sequence_longer_than_learned_positions():
    model = build(pos="learned")
    with pytest.raises(UserError, match="model.seq_len=32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def _param_names(model: Transformer) -> set[str]:
    return {name for name, _ in model.named_parameters()}


def test_norm_switch_changes_only_the_norms():
    base, other = build(), build(norm="layernorm")
    assert isinstance(base.norm, RMSNorm) and isinstance(other.norm, torch.nn.LayerNorm)
    assert all(isinstance(layer.ffn_norm, torch.nn.LayerNorm) for layer in other.layers)
    added = _param_names(other) - _param_names(base)
    assert added == {"norm.bias"} | {
        f"layers.{i}.{n}.bias" for i in range(2) for n in ("attention_norm", "ffn_norm")
    }
    assert _param_names(base) - _param_names(other) == set()


def test_mlp_switch_changes_only_the_feed_forward():
    base, other = build(), build(mlp="gelu")
    assert isinstance(base.layers[0].feed_forward, FeedForward)
    assert isinstance(other.layers[0].feed_forward, TwoLayerFeedForward)
    assert _param_names(base) - _param_names(other) == {
        f"layers.{i}.feed_forward.w3.weight" for i in range(2)
    }
    assert _param_names(other) - _param_names(base) == set()
    assert other.layers[0].feed_forward.w1.weight.shape == (4 * 64, 64)


def test_pos_switch_changes_only_positions():
    base, other = build(), build(pos="learned")
    assert _param_names(other) - _param_names(base) == {"pos_embeddings.weight"}
    assert _param_names(base) - _param_names(other) == set()
    assert other.pos_embeddings.weight.shape == (32, 64)
    assert other.freqs_cos.numel() == 0 and base.freqs_cos.shape == (32, 8)
    tokens = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        before = other(tokens)
        other.pos_embeddings.weight.zero_()
        assert not torch.allclose(before, other(tokens))  # the learned table feeds the forward pass


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"norm": "layernorm", "mlp": "gelu", "pos": "learned"},
        {"norm": "none", "pos": "none", "mlp": "silu"},
        {"norm_position": "post", "mlp": "gelu_exact"},
        {"parallel_block": True, "dropout": 0.3, "d_ff": 40},
    ],
)
def test_future_tokens_cannot_change_past_logits(overrides):
    model = build(**overrides)
    tokens = torch.randint(0, 97, (2, 20))
    changed = tokens.clone()
    changed[:, 12] = (changed[:, 12] + 1) % 97
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_other_documents_cannot_change_logits():
    model = build()
    tokens = torch.randint(0, 97, (1, 24))
    doc_ids = torch.tensor([[0] * 10 + [1] * 14])
    changed = tokens.clone()
    changed[0, 3] = (changed[0, 3] + 1) % 97  # a token of document 0
    with torch.no_grad():
        a, b = model(tokens, doc_ids), model(changed, doc_ids)
        plain_a, plain_b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, 10:], b[:, 10:], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 3:10], b[:, 3:10])  # its own document does see it
    assert not torch.allclose(plain_a[:, 10:], plain_b[:, 10:])  # without doc_ids it leaks, as it should


def test_packed_document_equals_document_alone_with_rope():
    """RoPE attention depends only on relative positions, so a document packed after another one,
    with document masking, gives the logits it gives alone."""
    model = build()
    first, second = torch.randint(0, 97, (1, 9)), torch.randint(0, 97, (1, 15))
    packed = torch.cat([first, second], dim=1)
    doc_ids = torch.tensor([[0] * 9 + [1] * 15])
    with torch.no_grad():
        torch.testing.assert_close(model(packed, doc_ids)[:, 9:], model(second), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(packed, doc_ids)[:, :9], model(first), rtol=1e-4, atol=1e-4)


def test_doc_ids_shape_mismatch():
    model = build()
    with pytest.raises(UserError, match="doc_ids has shape"):
        model(torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 7, dtype=torch.long))


def test_rotary_matches_metas_complex_formulation():
    torch.manual_seed(0)
    B, T, H, hd, theta = 2, 7, 3, 16, 500000.0
    x = torch.randn(B, T, H, hd)
    # Meta's reference: freqs_cis = polar(1, outer(t, freqs)); x as complex numbers of consecutive pairs.
    freqs = 1.0 / (theta ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    freqs_cis = torch.polar(torch.ones(T, hd // 2), torch.outer(torch.arange(T).float(), freqs))
    x_complex = torch.view_as_complex(x.reshape(B, T, H, hd // 2, 2))
    expected = torch.view_as_real(x_complex * freqs_cis[None, :, None, :]).flatten(3)
    model = Transformer(
        TransformerModelArgs(dim=H * hd, n_heads=H, n_kv_heads=H, n_layers=1, vocab_size=5, seq_len=T)
    )
    got = apply_rotary_emb(x, model.freqs_cos, model.freqs_sin)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_meta_device_build_then_materialise():
    args = tiny_args()
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    reference = Transformer(args)
    torch.testing.assert_close(model.freqs_cos, reference.freqs_cos)
    torch.testing.assert_close(model.freqs_sin, reference.freqs_sin)
    assert torch.isfinite(model(torch.randint(0, 97, (1, 8)))).all()


def test_weight_init_scales_residual_projections():
    torch.manual_seed(0)
    model = Transformer(tiny_args(dim=256, n_layers=8, vocab_size=2000))
    residual = 0.02 / math.sqrt(16)
    assert model.layers[3].attention.wo.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert model.layers[3].feed_forward.w2.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert model.layers[3].attention.wq.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.tok_embeddings.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(model.norm.weight, torch.ones(256))


def test_clean_state_dict_keys():
    model = build()
    wrapped = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    cleaned = clean_state_dict_keys(wrapped)
    assert list(cleaned) == list(model.state_dict())
    build(seed=1).load_state_dict(cleaned)


def record_nvtx(monkeypatch) -> list[str]:
    """Enable lmtrain.nvtx with a backend that records the names of the ranges it opens."""
    import lmtrain.nvtx as nvtx

    opened: list[str] = []
    monkeypatch.setattr(nvtx, "_enabled", True)
    monkeypatch.setattr(nvtx, "_push", opened.append)
    monkeypatch.setattr(nvtx, "_pop", lambda: None)
    return opened


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_nvtx_ranges_name_every_matmul(monkeypatch, mlp):
    model = build(mlp=mlp)
    opened = record_nvtx(monkeypatch)
    model(torch.randint(0, 97, (1, 8)))
    ffn = (
        ["FeedForward/w1", "FeedForward/w3", "FeedForward/w2"]
        if mlp == "swiglu"
        else ["FeedForward/w1", "FeedForward/w2"]
    )
    per_layer = ["Attention/wq", "Attention/wk", "Attention/wv", "Attention/sdpa", "Attention/wo", *ffn]
    labels = [parse_gemm_label(t) or (t, None) for t in opened]
    assert [name for name, _ in labels] == ["layers.0", *per_layer, "layers.1", *per_layer]
    # Each GEMM range carries its shape: the linears have M = 1 x 8 tokens and dtype fp32 here.
    shapes = {name: shape for name, shape in labels if shape is not None}
    assert set(shapes) == set(per_layer)
    assert shapes["FeedForward/w1"][:2] == (1, 8) and shapes["FeedForward/w1"][4] == "fp32"
    assert shapes["Attention/sdpa"][1:3] == (8, 8)  # T x S


@pytest.mark.slow
def test_torch_compile_fullgraph_forward_backward_tiny(monkeypatch):
    """fullgraph=True: no graph break, also with NVTX ranges enabled (they are skipped while compiling)."""
    opened = record_nvtx(monkeypatch)
    args = model_args_from_config(ModelConfig(preset="tiny"), vocab_size=128, seq_len=32)
    torch.manual_seed(0)
    model = Transformer(args)
    tokens = torch.randint(0, 128, (2, 32))
    eager = model(tokens)
    assert opened, "eager forward opens ranges"
    opened.clear()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(tokens)
    assert opened == []
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert set(clean_state_dict_keys(compiled.state_dict())) == set(model.state_dict())


def test_last_only_returns_the_last_positions_logits():
    model = build()
    tokens = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, last_only=True), model(tokens)[:, -1:])


# --------------------------------------------------------------------------------------------------
# The later ablation switches: each changes one thing, checked against its formula
# --------------------------------------------------------------------------------------------------


def reference_logits(model: Transformer, tokens: torch.Tensor, block) -> torch.Tensor:
    """The model's forward written out, with `block(layer, h, attend)` as the formula of one block;
    attend(x) is the layer's attention of x (with RoPE, causal)."""
    T = tokens.shape[1]
    rope = (model.freqs_cos[:T], model.freqs_sin[:T])
    h = model.tok_embeddings(tokens)
    for layer in model.layers:
        h = block(layer, h, lambda x, layer=layer: layer.attention(x, rope, None))
    return model.output(model.norm(h))


def test_args_without_the_later_switches_build_todays_model():
    """A checkpoint written before these switches stores model_args without them: same model."""
    old = tiny_args().to_dict()
    for key in ("norm_position", "parallel_block", "dropout", "d_ff"):
        del old[key]
    args = TransformerModelArgs(**old)
    assert args == tiny_args()
    assert (args.norm_position, args.parallel_block, args.dropout, args.d_ff) == ("pre", False, 0.0, None)
    build(seed=3).load_state_dict(Transformer(args).state_dict())  # same keys and shapes


def test_no_norm_removes_every_norm_and_follows_the_unnormalised_formula():
    base, model = build(), build(norm="none")
    assert _param_names(base) - _param_names(model) == {"norm.weight"} | {
        f"layers.{i}.{n}.weight" for i in range(2) for n in ("attention_norm", "ffn_norm")
    }
    assert _param_names(model) - _param_names(base) == set()
    tokens = torch.randint(0, 97, (2, 12))

    def block(layer, x, attend):
        h = x + attend(x)
        return h + layer.feed_forward(h)

    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference_logits(model, tokens, block), rtol=0, atol=1e-6)


def test_post_norm_normalises_after_each_residual_add():
    base, model = build(), build(norm_position="post")
    assert _param_names(model) == _param_names(base)
    model.load_state_dict(base.state_dict())
    tokens = torch.randint(0, 97, (2, 12))

    def block(layer, x, attend):
        h = layer.attention_norm(x + attend(x))
        return layer.ffn_norm(h + layer.feed_forward(h))

    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference_logits(model, tokens, block), rtol=0, atol=1e-6)
        assert not torch.allclose(model(tokens), base(tokens), atol=1e-3)
        # RMSNorm weights start at 1, so every post-norm block hands on a stream of unit RMS per token.
        rope = (model.freqs_cos[:12], model.freqs_sin[:12])
        out = model.layers[0](model.tok_embeddings(tokens), rope, None)
        torch.testing.assert_close(out.pow(2).mean(-1), torch.ones(2, 12), rtol=1e-4, atol=1e-4)


def test_parallel_block_feeds_both_branches_the_input():
    base, model = build(), build(parallel_block=True)
    assert _param_names(model) == _param_names(base)
    model.load_state_dict(base.state_dict())
    tokens = torch.randint(0, 97, (2, 12))

    def block(layer, x, attend):
        return x + attend(layer.attention_norm(x)) + layer.feed_forward(layer.ffn_norm(x))

    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference_logits(model, tokens, block), rtol=0, atol=1e-6)
        assert not torch.allclose(model(tokens), base(tokens), atol=1e-4)


def test_parallel_block_with_post_norm_is_refused():
    with pytest.raises(UserError, match="parallel_block=true with model.norm_position=post"):
        tiny_args(parallel_block=True, norm_position="post")


def test_nope_has_no_position_information():
    """One NoPE layer: the last position attends to a set of tokens whose keys and values carry no
    position, so permuting the earlier tokens leaves its logits unchanged; RoPE's change."""
    nope, rope = build(pos="none", n_layers=1), build(n_layers=1)
    assert _param_names(nope) == _param_names(rope)
    assert nope.pos_embeddings is None and nope.freqs_cos.numel() == 0
    tokens = torch.randint(0, 97, (1, 10))
    permuted = torch.cat([tokens[:, :9].flip(1), tokens[:, 9:]], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(nope(tokens)[:, -1], nope(permuted)[:, -1], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(rope(tokens)[:, -1], rope(permuted)[:, -1], atol=1e-4)


def test_silu_mlp_is_non_gated_and_parameter_matched_to_swiglu():
    # dim 96: SwiGLU's exact hidden int(8 * 96 / 3) = 256 gives 3 * 96 * 256 = 2 * 96 * (4 * 96) weights.
    swiglu, silu = build(dim=96, multiple_of=1), build(dim=96, multiple_of=1, mlp="silu")
    count = lambda m: sum(p.numel() for p in m.layers[0].feed_forward.parameters())  # noqa: E731
    assert count(swiglu) == count(silu) == 2 * 96 * 384
    ffn = silu.layers[0].feed_forward
    assert isinstance(ffn, TwoLayerFeedForward) and not hasattr(ffn, "w3")
    assert ffn.w1.weight.shape == (4 * 96, 96)
    x = torch.randn(2, 5, 96)
    h = x @ ffn.w1.weight.T
    with torch.no_grad():
        torch.testing.assert_close(ffn(x), (h * torch.sigmoid(h)) @ ffn.w2.weight.T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mlp", ["gelu", "gelu_exact"])
def test_gelu_variants_match_their_formulas(mlp):
    ffn = build(mlp=mlp).layers[0].feed_forward
    x = torch.randn(3, 4, 64) * 3
    h = (x @ ffn.w1.weight.T).double()
    exact = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    tanh = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    expected = (exact if mlp == "gelu_exact" else tanh).float() @ ffn.w2.weight.T
    other = (tanh if mlp == "gelu_exact" else exact).float() @ ffn.w2.weight.T
    with torch.no_grad():
        got = ffn(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (got - other).abs().max() > 1e-6  # the two GELUs differ, so the test tells them apart


@pytest.mark.parametrize("mlp", ["swiglu", "gelu", "silu"])
def test_explicit_d_ff_overrides_the_rounding_rule(mlp):
    args = tiny_args(mlp=mlp, d_ff=100)
    assert args.ffn_hidden_dim == 100
    model = Transformer(args)
    ffn = model.layers[0].feed_forward
    assert ffn.w1.weight.shape == (100, 64) and ffn.w2.weight.shape == (64, 100)
    assert model(torch.randint(0, 97, (1, 6))).shape == (1, 6, 97)
    # Without it, the rules: 4 * dim, or int(8 * 64 / 3) = 170 rounded up to multiple_of = 256.
    assert tiny_args(mlp=mlp).ffn_hidden_dim == 256
    llama = ModelConfig(preset="llama3-8b", d_ff=8192)
    assert model_args_from_config(llama, vocab_size=8, seq_len=8).ffn_hidden_dim == 8192  # not 14336


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("d_ff", 0, "model.d_ff must be a positive integer"),
        ("dropout", 1.0, r"model.dropout must be in \[0, 1\)"),
        ("norm_position", "middle", "model.norm_position must be one of pre, post"),
        ("pos", "alibi", "model.pos must be one of rope, learned, none"),
    ],
)
def test_bad_switch_values_are_user_errors(field, value, message):
    with pytest.raises(UserError, match=message):
        tiny_args(**{field: value})


def test_dropout_off_is_deterministic_in_training_mode():
    model = build()
    tokens = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        evaluated = model(tokens)
        model.train()
        torch.testing.assert_close(model(tokens), evaluated, rtol=0, atol=0)
        torch.testing.assert_close(model(tokens), evaluated, rtol=0, atol=0)


def test_dropout_acts_in_training_on_attention_weights_and_residual_branches():
    base, model = build(), build(dropout=0.5)
    assert _param_names(model) == _param_names(base)
    model.load_state_dict(base.state_dict())
    tokens = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), base(tokens), rtol=0, atol=0)  # eval: off
        model.train()
        a, b = model(tokens), model(tokens)
        assert not torch.allclose(a, b)
        # The attention branch alone: dropping attention weights changes it between two calls.
        attention = model.layers[0].attention
        x = torch.randn(2, 12, 64)
        rope = (model.freqs_cos[:12], model.freqs_sin[:12])
        assert not torch.allclose(attention(x, rope, None), attention(x, rope, None))
        attention.eval()
        torch.testing.assert_close(attention(x, rope, None), attention(x, rope, None), rtol=0, atol=0)
        # A residual branch: about half of its elements dropped, the rest scaled by 1 / (1 - p).
        branch = model.layers[0].resid_dropout(torch.ones(4000))
        assert set(branch.unique().tolist()) == {0.0, 2.0}
        assert 0.45 < (branch == 0).float().mean().item() < 0.55


@pytest.mark.parametrize(
    "switch",
    [
        {"norm": "none"},
        {"norm_position": "post"},
        {"pos": "none"},
        {"mlp": "silu"},
        {"mlp": "gelu_exact"},
        {"parallel_block": True},
        {"dropout": 0.1},
        {"d_ff": 100},
    ],
)
def test_parameter_accounting_matches_the_model_for_every_switch(switch):
    from lmtrain.accounting import count_parameters, flops_per_token

    args = tiny_args(**switch)
    model = Transformer(args)
    counts = count_parameters(args)
    assert counts == count_parameters(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    ffn_weights = (3 if args.mlp == "swiglu" else 2) * args.dim * args.ffn_hidden_dim * args.n_layers
    assert counts["feed_forward"] == ffn_weights
    if args.norm == "none":
        assert counts["norms"] == 0
    expected_flops = 6 * counts["non_embedding"] + 12 * args.n_layers * args.dim * 128
    assert flops_per_token(args, 128) == expected_flops


def test_params_command_takes_every_switch(capsys):
    from lmtrain.accounting import main

    argv = ["--preset", "tiny", "--vocab-size", "256", "--norm", "none", "--pos", "none", "--mlp", "silu"]
    argv += ["--norm-position", "post", "--dropout", "0.1", "--d-ff", "300", "--n-layers", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "feed-forward (silu, hidden 300)" in out and "norms (none)" in out
    assert main(["--preset", "tiny", "--vocab-size", "256", "--parallel-block", "true"]) == 0
    with pytest.raises(SystemExit):
        main(["--preset", "tiny", "--parallel-block", "maybe"])


def test_model_config_checks_the_new_fields():
    from lmtrain.config import ConfigError, config_from_dict, parse_args

    cfg = config_from_dict({"model": {"parallel_block": "true", "dropout": "0.1", "d_ff": "96"}})
    assert (cfg.model.parallel_block, cfg.model.dropout, cfg.model.d_ff) == (True, 0.1, 96)
    # `none` is a choice of norm and pos, not the null that means "from the preset"
    cfg, _ = parse_args(["--model.norm=none", "--model.pos=none", "--model.mlp=null"])
    assert (cfg.model.norm, cfg.model.pos, cfg.model.mlp) == ("none", "none", None)
    with pytest.raises(ConfigError, match="model.d_ff must be >= 1"):
        config_from_dict({"model": {"d_ff": 0}})
    with pytest.raises(ConfigError, match=r"model.dropout must be in \[0, 1\)"):
        config_from_dict({"model": {"dropout": 1.5}})
    with pytest.raises(ConfigError, match=r"norm_position = 'sandwich' is not a valid pre \| post"):
        config_from_dict({"model": {"norm_position": "sandwich"}})
