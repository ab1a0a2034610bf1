"""A Llama-3 decoder-only transformer, laid out like Meta's reference, with ablation switches.

    from lmtrain.model import Transformer, model_args_from_config
    model = Transformer(model_args_from_config(cfg.model, vocab_size=tok_vocab, seq_len=4096))
    logits = model(tokens)                    # (B, T) -> (B, T, vocab)
    logits = model(tokens, doc_ids=doc_ids)   # attention stays inside each packed document

Read top to bottom: arguments and presets, the two norms, rotary embeddings, attention (with its
key/value cache), the two feed-forward types, the block, the model. State-dict keys follow Meta's
checkpoints (`tok_embeddings`, `layers.N.attention.wq`, ..., `norm`, `output`), so the weights map
one-to-one onto Meta's layout and, after a RoPE permutation, onto Hugging Face's (`lmtrain.export_hf`).

Ablation switches, each changing exactly one thing (the first value is Llama's):
  norm:           "rmsnorm" | "layernorm" (GPT-2; weight and bias) | "none" (identity, no parameters)
  norm_position:  "pre" (x + f(norm(x))) | "post" (norm(x + f(x)), the original Transformer's)
  mlp:            "swiglu" (w1, w2, w3) | "gelu" (GPT-2's tanh approximation; w1, w2, hidden 4 * dim)
                  | "gelu_exact" (erf GELU) | "silu" (non-gated: w2(silu(w1 x)), hidden 4 * dim)
  pos:            "rope" (no parameters) | "learned" (GPT-2; `pos_embeddings`) | "none" (NoPE)
  parallel_block: False | True (x + attn(norm(x)) + ffn(norm'(x)), GPT-J/PaLM; both norms kept)
  dropout:        0.0 | p (on the attention weights and on both residual branches, training only)
  d_ff:           None (the feed-forward type's rule) | an explicit hidden size
Linear layers never have biases, in either setting, so that a switch isolates its own effect. The
two-matrix MLPs at 4 * dim hold as many parameters as SwiGLU at int(8 * dim / 3) with multiple_of=1.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmtrain.errors import UserError
from lmtrain.losses import DEFAULT_CHUNK, lm_loss_sum
from lmtrain.nvtx import NO_RANGE, attention_range, eager_enabled, linear_range, nvtx_range


def _range(name: str, x=None, linear=None, keys=None):
    """An NVTX range (see `lmtrain.nvtx`; free unless enabled) around eager code. Inside torch.compile
    there is none: a push/pop is a Python side effect that would break the graph fullgraph=True needs,
    and the compiled kernels no longer map onto these modules anyway. Given a `linear` layer and its input
    `x`, or attention's queries `x` and `keys`, the range text carries the GEMM's shape (only computed
    while ranges are enabled)."""
    if not eager_enabled():
        return NO_RANGE  # a decode step opens ~60 of these per token
    if linear is not None:
        return linear_range(name, x, linear)
    if keys is not None:
        return attention_range(name, x, keys)
    return nvtx_range(name)


# --------------------------------------------------------------------------------------------------
# Arguments and presets
# --------------------------------------------------------------------------------------------------


@dataclass
class TransformerModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = 8  # None: as many as n_heads (plain multi-head attention)
    vocab_size: int = 128256
    multiple_of: int = 1024  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = 1.3
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    seq_len: int = 2048  # longest sequence: size of the RoPE tables / learned position table
    norm: Literal["rmsnorm", "layernorm", "none"] = "rmsnorm"
    mlp: Literal["swiglu", "gelu", "gelu_exact", "silu"] = "swiglu"
    pos: Literal["rope", "learned", "none"] = "rope"
    # The fields below postdate the first checkpoints; their defaults are the architecture those hold.
    norm_position: Literal["pre", "post"] = "pre"
    parallel_block: bool = False  # attention and feed-forward both read the block's input
    dropout: float = 0.0  # attention weights and residual branches, in training mode only
    d_ff: Optional[int] = None  # feed-forward hidden size; None: 4 * dim, or Llama's rule for SwiGLU

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"model.{name} must be a positive integer, got {value!r}")
        for name, valid in (
            ("norm", NORMS),
            ("mlp", MLPS),
            ("pos", POSITIONS),
            ("norm_position", NORM_POSITIONS),
        ):
            if getattr(self, name) not in valid:
                raise UserError(
                    f"model.{name} must be one of {', '.join(valid)}, got {getattr(self, name)!r}"
                )
        if self.dim % self.n_heads:
            raise UserError(
                f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}: every head gets "
                f"dim / n_heads channels; pick n_heads among the divisors of {self.dim}"
            )
        if self.n_heads % self.n_kv_heads:
            raise UserError(
                f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={self.n_kv_heads}: "
                "grouped-query attention shares each key/value head among n_heads / n_kv_heads query "
                "heads; pick n_kv_heads among the divisors of n_heads"
            )
        if self.pos == "rope" and self.head_dim % 2:
            raise UserError(
                f"rotary embeddings rotate pairs of channels, so dim / n_heads must be even "
                f"(got {self.dim} / {self.n_heads} = {self.head_dim}); change model.dim or model.n_heads"
            )
        if self.ffn_dim_multiplier is not None and not self.ffn_dim_multiplier > 0:
            raise UserError(f"model.ffn_dim_multiplier must be > 0, got {self.ffn_dim_multiplier}")
        if not self.norm_eps > 0 or not self.rope_theta > 0:
            raise UserError("model.norm_eps and model.rope_theta must be > 0")
        if self.d_ff is not None and (not isinstance(self.d_ff, int) or self.d_ff < 1):
            raise UserError(f"model.d_ff must be a positive integer or null, got {self.d_ff!r}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.parallel_block and self.norm_position == "post":
            raise UserError(
                "model.parallel_block=true with model.norm_position=post: a parallel block adds both "
                "branches to its input, and there is no single post-norm of one branch; use "
                "norm_position=pre with parallel blocks"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.mlp != "swiglu":
            return 4 * self.dim  # GPT-2
        # Meta's rule: 2/3 of 4*dim keeps SwiGLU's three matrices at the cost of a 4*dim two-matrix MLP,
        # then the multiplier, then round up so the matmuls tile well.
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


NORMS = ("rmsnorm", "layernorm", "none")
MLPS = ("swiglu", "gelu", "gelu_exact", "silu")
POSITIONS = ("rope", "learned", "none")
NORM_POSITIONS = ("pre", "post")

# GPT-2's block, shared by its sizes.
_GPT2_BLOCK = dict(multiple_of=256, ffn_dim_multiplier=None, norm_eps=1e-5, rope_theta=10000.0, norm="layernorm",
                   mlp="gelu", pos="learned")  # fmt: skip

# Every preset names every architecture field up to `pos` except vocab_size and seq_len, which come
# from the tokenizer and the data (or from explicit overrides); the later switches keep their defaults.
PRESETS: dict[str, dict[str, Any]] = {
    # Meta Llama-3 8B: 8.03B parameters with a 128K vocabulary.
    "llama3-8b": dict(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024, ffn_dim_multiplier=1.3,
        norm_eps=1e-5, rope_theta=500000.0, norm="rmsnorm", mlp="swiglu", pos="rope",
    ),
    # A few million parameters: trains on a laptop CPU in minutes; used by tests and the smoke job.
    "tiny": dict(
        dim=256, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=256, ffn_dim_multiplier=None,
        norm_eps=1e-5, rope_theta=10000.0, norm="rmsnorm", mlp="swiglu", pos="rope",
    ),
    # Llama-style ablation base, small enough for a CPU run of a few hundred steps in a few minutes.
    # Plain multi-head attention so that flipping norm/mlp/pos lands exactly on gpt2-style blocks.
    "ablation-small": dict(
        dim=256, n_layers=6, n_heads=8, n_kv_heads=8, multiple_of=256, ffn_dim_multiplier=None,
        norm_eps=1e-5, rope_theta=10000.0, norm="rmsnorm", mlp="swiglu", pos="rope",
    ),
    # GPT-2 small (124M with its 50257 vocabulary, biases aside): the baseline of the ablation study.
    "gpt2-small": dict(
        dim=768, n_layers=12, n_heads=12, n_kv_heads=12, multiple_of=256, ffn_dim_multiplier=None,
        norm_eps=1e-5, rope_theta=10000.0, norm="layernorm", mlp="gelu", pos="learned",
    ),
    # The larger GPT-2 sizes (350M, 774M, 1.5B with GPT-2's vocabulary): head dim 64 throughout.
    "gpt2-medium": dict(_GPT2_BLOCK, dim=1024, n_layers=24, n_heads=16, n_kv_heads=16),
    "gpt2-large": dict(_GPT2_BLOCK, dim=1280, n_layers=36, n_heads=20, n_kv_heads=20),
    "gpt2-xl": dict(_GPT2_BLOCK, dim=1600, n_layers=48, n_heads=25, n_kv_heads=25),
}  # fmt: skip


def model_args_from_config(cfg: Any, *, vocab_size: int, seq_len: int) -> TransformerModelArgs:
    """The preset named by `cfg.preset` (a `ModelConfig`), with every non-None field of cfg on top.

    `vocab_size` and `seq_len` come from the tokenizer and the data; cfg.vocab_size / cfg.seq_len win.
    """
    if cfg.preset not in PRESETS:
        raise UserError(
            f"unknown model.preset '{cfg.preset}'; valid presets: {', '.join(PRESETS)} "
            "(`lmtrain params --list` describes them)"
        )
    kwargs = dict(PRESETS[cfg.preset], vocab_size=vocab_size, seq_len=seq_len)
    for f in dataclasses.fields(TransformerModelArgs):
        value = getattr(cfg, f.name, None)
        if value is not None:
            kwargs[f.name] = value
    return TransformerModelArgs(**kwargs)


# --------------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / rms(x) * weight: LayerNorm without centring and without bias (Llama)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # The same arithmetic as below, in one call instead of seven ops (bit-identical in fp32):
            # a decoded token runs 2 * n_layers + 1 norms on one row each, where op overhead dominates.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Statistics in fp32 even for bf16 activations: the mean of squares loses too much in bf16.
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def build_norm(args: TransformerModelArgs) -> nn.Module:
    if args.norm == "rmsnorm":
        return RMSNorm(args.dim, eps=args.norm_eps)
    if args.norm == "none":
        return nn.Identity()  # the "no normalisation" ablation: nothing to learn, nothing to rescale
    return nn.LayerNorm(args.dim, eps=args.norm_eps)  # weight and bias, as GPT-2


# --------------------------------------------------------------------------------------------------
# Rotary position embeddings (Meta's convention)
# --------------------------------------------------------------------------------------------------


def rope_tables(head_dim: int, seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angle of every (position, channel pair): two (seq_len, head_dim/2).

    Pair i of a head rotates at frequency theta^(-2i/head_dim), so low pairs turn fast (local
    position) and high pairs slowly (long range). Meta stores these as complex `freqs_cis`; cos and sin
    in real tensors are the same numbers and keep torch.compile away from complex dtypes.
    """
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim)
    )
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)  # (T, hd/2)
    return angles.cos(), angles.sin()


def rope_rotation(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """e^(i*angle) as one complex (T, 1, hd/2) tensor (broadcast over heads) for eager mode, built once
    per forward pass and shared by every layer's q and k; None under torch.compile (the real form)."""
    if torch.compiler.is_compiling():
        return None
    return torch.complex(cos.float(), sin.float())[:, None]


def apply_rotary_emb(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotation: torch.Tensor | None = None
) -> torch.Tensor:
    """Rotate consecutive channel pairs (0,1), (2,3), ... of every head: x is (B, T, H, hd).

    This is Meta's `view_as_complex` on pairs followed by a multiplication with e^(i*angle):
    (a + ib)(cos + i sin) = (a cos - b sin) + i(a sin + b cos). Hugging Face instead pairs channel j
    with j + hd/2 ("rotate_half"); `lmtrain.export_hf` permutes wq/wk rows to convert.

    Eager mode multiplies complex numbers: one kernel forward and one backward, where the real form
    (unbind, four products, a stack) costs about four times as much on CPU. Under torch.compile the
    real form is used: the compiler fuses it into one kernel anyway and stays away from complex dtypes.
    """
    xf = x if x.dtype == torch.float32 else x.float()  # no op at all in fp32: decoding counts ops
    pairs = xf.unflatten(-1, (-1, 2))  # (B, T, H, hd/2, 2)
    if not torch.compiler.is_compiling():
        if rotation is None:
            rotation = rope_rotation(cos, sin)  # (T, 1, hd/2): over batch and heads
        rotated = torch.view_as_real(torch.view_as_complex(pairs) * rotation).flatten(-2)  # (B, T, H, hd)
        return rotated if rotated.dtype == x.dtype else rotated.type_as(x)
    cos = cos[None, :, None, :]  # (1, T, 1, hd/2): broadcast over batch and heads
    sin = sin[None, :, None, :]
    a, b = pairs.unbind(-1)  # (B, T, H, hd/2) each
    rotated = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1)  # (B, T, H, hd/2, 2)
    return rotated.flatten(-2).type_as(x)  # (B, T, H, hd)


# --------------------------------------------------------------------------------------------------
# Decode-time products
# --------------------------------------------------------------------------------------------------


def decode_linear(x: torch.Tensor, weight: torch.Tensor, blocks: int = 1) -> torch.Tensor:
    """F.linear(x, weight) for the column-major weights of `lmtrain.generate.decode_layout`.

    A single row (one decoded token) times a weight is a vector product, which CPU BLAS runs on one
    thread at about 25 GB/s here, however many threads torch has. With `blocks` > 1 the weight's
    transpose (in, out), contiguous in that layout, is viewed as `blocks` column blocks (no copy) and
    one bmm multiplies the row by all of them, one block per thread: the same dot products in the
    same order, so the same bits, measured 2.0-2.4x faster for the tiny preset's 32000 x 256 head and
    1.3-1.6x for 256 x 1536 to 4096 x 14336 weights on 2 threads. More than one row (a prompt)
    takes plain F.linear, which already uses every thread.
    """
    out_features, in_features = weight.shape
    if blocks <= 1 or x.numel() != in_features or weight.stride() != (1, out_features):
        return F.linear(x, weight)
    columns = weight.t().view(in_features, blocks, out_features // blocks).transpose(0, 1)  # (P, in, out/P)
    rows = x.reshape(1, 1, in_features).expand(blocks, 1, in_features)  # (P, 1, in)
    return torch.bmm(rows, columns).view(*x.shape[:-1], out_features)  # (P, 1, out/P) is (..., out)


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------


class KVCache:
    """Keys and values of the tokens seen so far for one layer, pre-allocated for the whole context.

    It holds the n_kv_heads key/value heads, not the n_heads repeated ones: grouped-query attention
    exists precisely to shrink this cache (4x for Llama-3 8B).
    """

    def __init__(self, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv, T, hd) at positions start_pos.. and return all keys/values so far."""
        end = start_pos + k.shape[2]
        assert end <= self.k.shape[2], "KV cache overflow: the caller must stop at the context length"
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]  # (B, n_kv, start_pos + T, hd)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, n_kv, T, hd) -> (B, n_kv * n_rep, T, hd): each key/value head serves n_rep query heads."""
    if n_rep == 1:
        return x
    return x.repeat_interleave(n_rep, dim=1)


# SDPA shares each key/value head among its query heads itself (`enable_gqa`, torch >= 2.5) instead of
# attending to repeated copies. Used on CPU only, where it was measured (10% less attention time in a
# training step, half of a decode step's); on CUDA some backends lack it and would fall back to the
# slow math kernel, so the copy stays there.
_SDPA_HAS_GQA = torch.torch_version.TorchVersion(torch.__version__) >= (2, 5)


def grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout_p: float = 0.0
) -> torch.Tensor:
    """Causal (or masked) attention of q (B, H, T, hd) over k, v (B, Hkv, S, hd) -> (B, H, T, hd)."""
    rep = q.shape[1] // k.shape[1]
    causal = mask is None and q.shape[2] > 1
    if rep > 1 and _SDPA_HAS_GQA and q.device.type == "cpu":
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal, enable_gqa=True
        )
    return F.scaled_dot_product_attention(
        q, repeat_kv(k, rep), repeat_kv(v, rep), attn_mask=mask, dropout_p=dropout_p, is_causal=causal
    )


class Attention(nn.Module):
    """Grouped-query causal self-attention; rotary embeddings on q and k when pos == "rope"; dropout on
    the attention weights in training mode when args.dropout > 0."""

    def __init__(self, args: TransformerModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.head_dim
        self.use_rope = args.pos == "rope"
        self.dropout = args.dropout
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        # While decoding on CPU (`lmtrain.generate.decode_layout`): wq, wk and wv as one weight, of which
        # their own weights are row slices, so that a token's three projections are one product.
        self.wqkv: torch.Tensor | None = None
        self.blocks = 1  # decode_linear's column blocks while decoding

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        rope: tuple | None,  # cos, sin: (T, hd/2) each, and their complex rotation (or None)
        mask: torch.Tensor | None,  # (B or 1, 1, T, S) bool, True = may attend; None = plain causal
        cache: KVCache | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        if self.wqkv is not None:
            kv = self.n_kv_heads * self.head_dim
            qkv = decode_linear(x, self.wqkv, self.blocks)  # (B, T, q + 2 kv)
            q, k, v = qkv.split((self.n_heads * self.head_dim, kv, kv), dim=-1)
            q = q.view(B, T, self.n_heads, self.head_dim)  # (B, T, H, hd)
            k, v = k.view(B, T, self.n_kv_heads, self.head_dim), v.view(B, T, self.n_kv_heads, self.head_dim)
        else:
            with _range("Attention/wq", x, self.wq):
                q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, hd)
            with _range("Attention/wk", x, self.wk):
                k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, hd)
            with _range("Attention/wv", x, self.wv):
                v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, hd)
        if self.use_rope:
            assert rope is not None
            q, k = apply_rotary_emb(q, *rope), apply_rotary_emb(k, *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        if cache is not None:
            k, v = cache.update(start_pos, k, v)  # (B, Hkv, S, hd) with S = start_pos + T
        with _range("Attention/sdpa", q, keys=k):
            out = grouped_attention(q, k, v, mask, self.dropout if self.training else 0.0)  # (B, H, T, hd)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, C)
        if self.wqkv is not None:
            return decode_linear(out, self.wo.weight, self.blocks)  # no module call per token
        with _range("Attention/wo", out, self.wo):
            return self.wo(out)


# --------------------------------------------------------------------------------------------------
# Feed-forward
# --------------------------------------------------------------------------------------------------


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). The gate w1 decides, per hidden unit, how much of w3 x passes."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w13: torch.Tensor | None = None  # w1 and w3 as one weight while decoding (see Attention.wqkv)
        self.blocks = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        if self.w13 is not None:
            gate, up = decode_linear(x, self.w13, self.blocks).chunk(2, dim=-1)  # (B, T, hidden) each
            return decode_linear(F.silu(gate) * up, self.w2.weight, self.blocks)
        with _range("FeedForward/w1", x, self.w1):
            gate = F.silu(self.w1(x))  # (B, T, hidden)
        with _range("FeedForward/w3", x, self.w3):
            up = self.w3(x)  # (B, T, hidden)
        with _range("FeedForward/w2", gate, self.w2):
            return self.w2(gate * up)


# The activations of the two-matrix MLP, by `mlp` switch value.
ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's (and BERT's original code's) approximation
    "gelu_exact": lambda x: F.gelu(x, approximate="none"),  # x * Phi(x), Phi the normal CDF (erf)
    "silu": F.silu,  # x * sigmoid(x): SwiGLU's activation without its gate
}


class TwoLayerFeedForward(nn.Module):
    """GPT-2's MLP: w2(act(w1 x)) with hidden = 4 * dim; act is GELU (tanh or exact) or SiLU."""

    def __init__(self, dim: int, hidden_dim: int, activation: str = "gelu"):
        super().__init__()
        self.activation = activation
        self.act = ACTIVATIONS[activation]
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        with _range("FeedForward/w1", x, self.w1):
            h = self.act(self.w1(x))  # (B, T, hidden)
        with _range("FeedForward/w2", h, self.w2):
            return self.w2(h)

    def extra_repr(self) -> str:
        return f"activation={self.activation}"  # print(model) names the ablation


# --------------------------------------------------------------------------------------------------
# Block and model
# --------------------------------------------------------------------------------------------------


class TransformerBlock(nn.Module):
    """Pre-norm residual block: h = x + attn(norm(x)); out = h + ffn(norm(h)).

    norm_position="post" moves each norm after its residual add: h = norm(x + attn(x)),
    out = norm(h + ffn(h)). parallel_block=True feeds both branches the block's input:
    out = x + attn(norm(x)) + ffn(norm'(x)), with GPT-NeoX's two norms, so the parameters stay those of
    the sequential block. Dropout, when on, drops from each branch's output before its add.
    """

    def __init__(self, layer_id: int, args: TransformerModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.post_norm = args.norm_position == "post"
        self.parallel = args.parallel_block
        self.attention_norm = build_norm(args)
        self.attention = Attention(args)
        self.ffn_norm = build_norm(args)
        if args.mlp == "swiglu":
            self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        else:
            self.feed_forward = TwoLayerFeedForward(args.dim, args.ffn_hidden_dim, args.mlp)
        # Identity when off: no random numbers drawn, so training stays bit-for-bit deterministic.
        self.resid_dropout = nn.Dropout(args.dropout) if args.dropout > 0 else nn.Identity()

    def _drop(self, branch: torch.Tensor) -> torch.Tensor:
        # Dropout acts in training only; skipping the module call in eval saves a decode step 2 calls a layer.
        return self.resid_dropout(branch) if self.training else branch

    def forward(self, x, rope, mask, cache: KVCache | None = None, start_pos: int = 0) -> torch.Tensor:
        if self.parallel:
            attn = self.attention(self.attention_norm(x), rope, mask, cache, start_pos)  # (B, T, C)
            ffn = self.feed_forward(self.ffn_norm(x))  # (B, T, C), from x, not from x + attn
            return x + self._drop(attn) + self._drop(ffn)
        if self.post_norm:
            h = self.attention_norm(x + self._drop(self.attention(x, rope, mask, cache, start_pos)))
            return self.ffn_norm(h + self._drop(self.feed_forward(h)))  # (B, T, C)
        h = x + self._drop(self.attention(self.attention_norm(x), rope, mask, cache, start_pos))
        return h + self._drop(self.feed_forward(self.ffn_norm(h)))  # (B, T, C)


class Transformer(nn.Module):
    def __init__(self, args: TransformerModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.pos_embeddings = nn.Embedding(args.seq_len, args.dim) if args.pos == "learned" else None
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = build_norm(args)  # kept with post-norm blocks too: that switch moves only theirs
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)  # untied from tok_embeddings
        # Non-persistent: derived from args, so they stay out of checkpoints (as Meta's freqs_cis).
        self.register_buffer("freqs_cos", torch.empty(0), persistent=False)
        self.register_buffer("freqs_sin", torch.empty(0), persistent=False)
        self.output_blocks = 1  # decode_linear's column blocks for the head while decoding
        self.init_weights()

    # ---- initialisation ----------------------------------------------------------------------------

    def reset_rope(self) -> None:
        """(Re)compute the RoPE tables on the buffers' device; call after `to_empty()` from meta."""
        if self.args.pos != "rope":
            return
        device = self.tok_embeddings.weight.device
        cos, sin = rope_tables(self.args.head_dim, self.args.seq_len, self.args.rope_theta, device=device)
        self.freqs_cos, self.freqs_sin = cos, sin  # (seq_len, hd/2) each, fp32 whatever the model dtype

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2's scheme: every weight ~ N(0, 0.02), norms at 1 (bias 0), and the two projections that
        write into the residual stream (attention.wo, feed_forward.w2) at 0.02 / sqrt(2 * n_layers): the
        stream sums 2 * n_layers of them, so this keeps its variance at initialisation independent of
        depth. Also recomputes the RoPE tables. Works on a model materialised with `to_empty()`.
        """
        std = 0.02
        residual_std = std / math.sqrt(2 * self.args.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_residual = name.endswith("attention.wo") or name.endswith("feed_forward.w2")
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if is_residual else std)
            elif isinstance(module, (RMSNorm, nn.LayerNorm)):
                module.reset_parameters()
        self.reset_rope()

    # ---- forward -----------------------------------------------------------------------------------

    def forward(
        self,
        tokens: torch.Tensor,  # (B, T) int64
        doc_ids: torch.Tensor | None = None,  # (B, T): tokens attend only within their own document
        *,
        cache: list[KVCache] | None = None,  # one per layer, for incremental decoding
        start_pos: int = 0,  # position of tokens[:, 0] (non-zero only with a cache)
        last_only: bool = False,  # logits of the last position only: (B, 1, vocab), for sampling
        labels: torch.Tensor | None = None,  # (B, T): return the summed next-token loss instead of logits
        loss_chunk: int = DEFAULT_CHUNK,  # with labels: rows per chunk of the fused head + loss (0: plain)
    ) -> torch.Tensor:
        B, T = tokens.shape
        if start_pos + T > self.args.seq_len:
            raise UserError(
                f"sequence of {start_pos + T} tokens is longer than the model's context "
                f"model.seq_len={self.args.seq_len}: shorten the input or raise model.seq_len"
            )
        h = self.tok_embeddings(tokens)  # (B, T, C)
        if self.pos_embeddings is not None:
            positions = torch.arange(start_pos, start_pos + T, device=tokens.device)
            h = h + self.pos_embeddings(positions)  # (B, T, C) + (T, C)
        rope = None
        if self.args.pos == "rope":
            cos, sin = self.freqs_cos[start_pos : start_pos + T], self.freqs_sin[start_pos : start_pos + T]
            rope = (cos, sin, rope_rotation(cos, sin))  # the complex form once, not per layer
        mask = self._attention_mask(tokens, doc_ids, start_pos)
        for i, layer in enumerate(self.layers):
            with _range(f"layers.{i}"):
                h = layer(h, rope, mask, None if cache is None else cache[i], start_pos)
        if last_only:
            h = h[:, -1:]  # (B, 1, C): sampling needs one distribution, not T of them
        h = self.norm(h)  # (B, T, C)
        if labels is not None:
            # Inside forward, so that DDP/FSDP and torch.compile see the head and the loss as part of it.
            return lm_loss_sum(h.flatten(0, 1), self.output.weight, labels.flatten(), loss_chunk)  # ()
        if self.output_blocks > 1:
            return decode_linear(h, self.output.weight, self.output_blocks)  # decoding (decode_layout)
        return self.output(h)  # (B, T, vocab)

    @staticmethod
    def _attention_mask(tokens: torch.Tensor, doc_ids: torch.Tensor | None, start_pos: int):
        """None where SDPA's own causal mask is right (the fast path); else a bool (B|1, 1, T, S) mask."""
        T = tokens.shape[1]
        if doc_ids is None:
            if start_pos == 0 or T == 1:
                return None  # is_causal, or one new token that may see the whole cache
            # Prefill after a prefix: query t sits at position start_pos + t; SDPA's is_causal would
            # align queries to the top-left corner instead.
            q_pos = torch.arange(start_pos, start_pos + T, device=tokens.device)
            k_pos = torch.arange(start_pos + T, device=tokens.device)
            return (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, T, S)
        if doc_ids.shape != tokens.shape:
            raise UserError(
                f"doc_ids has shape {tuple(doc_ids.shape)}; expected the tokens' {tuple(tokens.shape)}"
            )
        if start_pos != 0:
            raise UserError(
                "doc_ids (document masking) is for training; it cannot be combined with a KV cache"
            )
        causal = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()  # (T, T)
        same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
        return (same_doc & causal)[:, None]  # (B, 1, T, T); the diagonal keeps every row non-empty

    # ---- inference helpers -------------------------------------------------------------------------

    def new_kv_cache(self, batch_size: int, max_seq_len: int | None = None) -> list[KVCache]:
        """One pre-allocated cache per layer, in the model's dtype and device."""
        weight = self.output.weight
        length = min(max_seq_len or self.args.seq_len, self.args.seq_len)
        return [
            KVCache(batch_size, length, self.args.n_kv_heads, self.args.head_dim, weight.dtype, weight.device)
            for _ in range(self.args.n_layers)
        ]


def clean_state_dict_keys(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Strip the `_orig_mod.` (torch.compile) and `module.` (DDP) prefixes, wherever they are nested.

    Checkpoints store the plain Meta-layout keys, loadable into an unwrapped `Transformer`.
    """
    cleaned = {}
    for key, value in state_dict.items():
        parts = [p for p in key.split(".") if p not in ("_orig_mod", "module")]
        cleaned[".".join(parts)] = value
    return cleaned
