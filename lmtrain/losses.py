"""Next-token cross-entropy, plain or fused with the output projection.

    loss = lm_loss_sum(h, model.output.weight, labels, chunk_size=512)  # h (N, C), labels (N,)

The plain path materialises the logits (N, V) in fp32 and, for backward, their log-softmax and its
gradient, each as large again: at 8192 tokens and Llama-3's 128256-token vocabulary that is 4.2 GB per
copy. The fused path works through the rows in chunks: each chunk computes its logits, its loss and
d loss / d logits = softmax - one_hot at once, turns that into the chunk's input gradient and its share
of the weight gradient, and drops the logits. The backward pass only scales the stored gradients by the
incoming gradient. The FLOPs are the same (three GEMMs: logits, dX, dW); memory is O(chunk x V), and
on CPU the head runs about 15% faster because the logits are touched while still in cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmtrain import nvtx
from lmtrain.config import TrainingConfig

IGNORE_INDEX = -100
DEFAULT_CHUNK = TrainingConfig.loss_chunk  # tokens per chunk; the config field documents it


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast is active with on `device_type`, or None when it is off."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _head_range(name: str, shapes: list[tuple[int, int, int]], dtype: torch.dtype):
    """The NVTX range of the output projection's GEMMs in a chunk (`lmtrain.nvtx`: the same
    `output [gemm ...]` text as a linear layer's), so that a trace attributes them to the head; none
    under torch.compile, where a push/pop would break the graph."""
    if not nvtx.eager_enabled():
        return nvtx.NO_RANGE
    return nvtx.gemms_range(name, shapes, dtype)


class _LinearCrossEntropySum(torch.autograd.Function):
    """Sum over the non-ignored rows of cross_entropy(h @ weight.T, labels), gradients computed in forward."""

    @staticmethod
    def forward(ctx, h, weight, labels, chunk_size: int, compute_dtype: torch.dtype):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        with torch.autocast(h.device.type, enabled=False):  # dtypes are chosen here, explicitly
            w = weight.to(compute_dtype)  # (V, C)
            for start in range(0, h.shape[0], chunk_size):
                hc = h[start : start + chunk_size].to(compute_dtype)  # (c, C)
                yc = labels[start : start + chunk_size]  # (c,)
                valid = yc != IGNORE_INDEX
                target = yc.clamp(min=0)
                c, (V, C) = hc.shape[0], w.shape
                with _head_range("output", [(c, V, C)], compute_dtype):
                    logits = (hc @ w.t()).float()  # (c, V)
                picked = logits.gather(1, target[:, None])  # (c, 1)
                # log-sum-exp by hand, in place, so that exp() runs once and serves the softmax too.
                peak = logits.amax(dim=-1, keepdim=True)  # (c, 1)
                expd = logits.sub_(peak).exp_()  # (c, V), the logits are gone from here on
                total = expd.sum(dim=-1, keepdim=True)  # (c, 1)
                lse = total.log() + peak  # (c, 1)
                loss += torch.where(valid, (lse - picked).squeeze(1), 0.0).sum()
                if want_h or want_w:
                    keep = valid[:, None].to(expd.dtype)  # ignored rows: no gradient
                    dlogits = expd.mul_(keep / total)  # softmax
                    dlogits[torch.arange(len(yc), device=yc.device), target] -= keep.squeeze(1)  # - one_hot
                    dlogits = dlogits.to(compute_dtype)
                    gemms = [(c, C, V)] * want_h + [(V, C, c)] * want_w  # dX, then dW
                    with _head_range("output (backward)", gemms, compute_dtype):
                        if want_h:
                            grad_h[start : start + chunk_size] = dlogits @ w  # (c, C)
                        if want_w and compute_dtype == torch.float32:
                            grad_w.addmm_(dlogits.t(), hc)  # (V, C): in place, no (V, C) temporary
                        elif want_w:
                            grad_w += (dlogits.t() @ hc).float()  # (V, C), accumulated in fp32
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * grad_loss).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None, None


def lm_loss_sum(
    h: torch.Tensor,  # (N, C): final hidden states
    weight: torch.Tensor,  # (V, C): the output projection
    labels: torch.Tensor,  # (N,): next tokens, IGNORE_INDEX where no loss is wanted
    chunk_size: int = DEFAULT_CHUNK,  # rows per chunk of the fused path; 0 takes the plain path
) -> torch.Tensor:
    """Sum of the next-token cross-entropy (fp32 scalar) over the rows whose label is not ignored.

    The fused path uses the matmul dtype autocast would use (or the promoted input dtype); under fp16
    autocast it falls back to the plain path, because its softmax gradient would go into fp16 GEMMs
    unscaled, past the loss scaler.
    """
    amp = autocast_dtype(h.device.type)
    if chunk_size <= 0 or amp == torch.float16:
        logits = F.linear(h, weight)  # (N, V)
        return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    compute_dtype = amp or torch.promote_types(h.dtype, weight.dtype)
    return _LinearCrossEntropySum.apply(h, weight, labels, chunk_size, compute_dtype)
