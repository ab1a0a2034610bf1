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
    GeluFeedForward,
    RMSNorm,
    Transformer,
    TransformerModelArgs,
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
    assert isinstance(other.layers[0].feed_forward, GeluFeedForward)
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


@pytest.mark.parametrize("overrides", [{}, {"norm": "layernorm", "mlp": "gelu", "pos": "learned"}])
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
