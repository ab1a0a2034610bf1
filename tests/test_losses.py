"""The fused output projection + cross-entropy against the plain logits path: values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmtrain.losses import IGNORE_INDEX, lm_loss_sum
from lmtrain.model import Transformer, TransformerModelArgs


def inputs(n=37, c=16, v=50, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, c, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(v, c, generator=g) * 0.3).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = IGNORE_INDEX
    return h, w, labels


def plain(h, w, labels):
    return F.cross_entropy(F.linear(h, w).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def grads(fn, h, w, labels, scale=1.0):
    h.grad = w.grad = None
    loss = fn(h, w, labels)
    (loss * scale).backward()
    return loss.detach(), h.grad.clone(), w.grad.clone()


@pytest.mark.parametrize("chunk", [1, 8, 37, 512])
def test_fused_matches_plain_in_fp32(chunk):
    h, w, labels = inputs()
    ref = grads(plain, h, w, labels, scale=0.25)
    got = grads(lambda *a: lm_loss_sum(*a, chunk_size=chunk), h, w, labels, scale=0.25)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_ignored_rows_get_no_gradient_and_no_loss():
    h, w, labels = inputs()
    labels[:] = IGNORE_INDEX
    loss, dh, dw = grads(lambda *a: lm_loss_sum(*a, chunk_size=8), h, w, labels)
    assert loss.item() == 0.0 and not dh.any() and not dw.any()


def test_bf16_autocast_and_bf16_weights_stay_close_to_plain():
    h, w, labels = inputs(n=64, c=32, v=96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = grads(plain, h, w, labels)
        got = grads(lambda *a: lm_loss_sum(*a, chunk_size=16), h, w, labels)
    for a, b in zip(ref, got):
        assert b.dtype == a.dtype
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2)
    hb, wb, labels = inputs(n=64, c=32, v=96, dtype=torch.bfloat16)
    ref = grads(plain, hb, wb, labels)
    got = grads(lambda *a: lm_loss_sum(*a, chunk_size=16), hb, wb, labels)
    for a, b in zip(ref, got):
        assert b.dtype == a.dtype
        torch.testing.assert_close(b.float(), a.float(), rtol=2e-2, atol=2e-2)


def test_fp16_autocast_takes_the_plain_path_and_no_grad_computes_no_gradient():
    h, w, labels = inputs()
    with torch.autocast("cpu", dtype=torch.float16):
        assert lm_loss_sum(h, w, labels, chunk_size=8).grad_fn.name() == plain(h, w, labels).grad_fn.name()
    with torch.no_grad():
        fused = lm_loss_sum(h, w, labels, chunk_size=8)
        assert fused.grad_fn is None
        torch.testing.assert_close(fused, plain(h, w, labels))


def test_model_forward_with_labels_matches_logits_then_cross_entropy():
    args = TransformerModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=32,
                                ffn_dim_multiplier=None, seq_len=16)  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(args)
    tokens = torch.randint(0, 97, (3, 16))
    labels = torch.randint(0, 97, (3, 16))
    labels[:, 0] = IGNORE_INDEX
    ref = F.cross_entropy(
        model(tokens).flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    fused = model(tokens, labels=labels, loss_chunk=10)
    fused.backward()
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_head_gemms_get_nvtx_ranges_with_their_shapes(monkeypatch):
    """The fused head + loss names its GEMMs like a linear layer: `output`, then `output (backward)`
    with dX and dW, per chunk, so a trace attributes the head's kernels and FLOPs."""
    import lmtrain.nvtx as nvtx
    from lmtrain.nvtx import parse_gemm_labels

    opened: list[str] = []
    monkeypatch.setattr(nvtx, "_enabled", True)
    monkeypatch.setattr(nvtx, "_push", opened.append)
    monkeypatch.setattr(nvtx, "_pop", lambda: None)
    h = torch.randn(10, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    lm_loss_sum(h, weight, torch.randint(0, 40, (10,)), chunk_size=4).backward()
    parsed = [parse_gemm_labels(text) for text in opened]
    assert [name for name, _ in parsed] == ["output", "output (backward)"] * 3  # chunks of 4, 4, 2 rows
    assert parsed[0][1] == [(1, 4, 40, 16, "fp32")]  # logits: (c, C) @ (C, V)
    assert parsed[5][1] == [(1, 2, 16, 40, "fp32"), (1, 40, 16, 2, "fp32")]  # dX (c, C), dW (V, C)
