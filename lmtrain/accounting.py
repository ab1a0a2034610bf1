"""`lmtrain params`: exact parameter count, FLOPs per token and training memory of a model.

lmtrain params --preset llama3-8b --vocab-size 131072 --seq-len 2048
lmtrain params --preset tiny --vocab-size 256 --norm layernorm --mlp gelu
lmtrain params --list

The model is built on the meta device, so even 8B parameters cost no memory and the count is exact
(it is the model's own parameters, not a formula). The trainer's MFU uses `flops_per_token`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from typing import Any

import torch

from lmtrain.arguments import params_overrides, params_parser
from lmtrain.config import ModelConfig
from lmtrain.errors import UserError
from lmtrain.model import PRESETS, Transformer, TransformerModelArgs, model_args_from_config

# Components in display order; each parameter name belongs to exactly one.
COMPONENTS = ("embedding", "positions", "attention", "feed_forward", "norms", "head")


def _component(name: str) -> str:
    if name.startswith("tok_embeddings."):
        return "embedding"
    if name.startswith("pos_embeddings."):
        return "positions"
    if ".attention." in name:
        return "attention"
    if ".feed_forward." in name:
        return "feed_forward"
    if name.startswith("output."):
        return "head"
    assert "norm" in name, f"parameter {name} belongs to no component"
    return "norms"


@functools.lru_cache(maxsize=32)
def _meta_parameter_sizes(args_items: tuple) -> tuple[tuple[str, int], ...]:
    """(name, numel) of every parameter of a model built on the meta device: no memory, exact."""
    with torch.device("meta"):
        model = Transformer(TransformerModelArgs(**dict(args_items)))
    return tuple((name, p.numel()) for name, p in model.named_parameters())


def count_parameters(model_or_args: Transformer | TransformerModelArgs) -> dict[str, int]:
    """Parameters per component, plus `total` and `non_embedding` (total minus the embedding tables,
    which are lookups, not matmuls: the N of the 6N FLOPs rule). The output head counts as non-embedding
    because it is untied and costs a full matmul."""
    if isinstance(model_or_args, torch.nn.Module):
        shapes = tuple((name, p.numel()) for name, p in model_or_args.named_parameters())
    else:
        shapes = _meta_parameter_sizes(tuple(dataclasses.asdict(model_or_args).items()))
    counts = dict.fromkeys(COMPONENTS, 0)
    for name, numel in shapes:
        counts[_component(name)] += numel
    counts["total"] = sum(counts[c] for c in COMPONENTS)
    counts["non_embedding"] = counts["total"] - counts["embedding"] - counts["positions"]
    return counts


def flops_per_token(args: TransformerModelArgs, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls of forward (2N) and backward (4N), N without the
    embeddings, plus 12 * L * H * Q * T for the attention scores and the weighted sum (QK^T and AV:
    2 matmuls x 2 FLOPs per multiply-add x 3 for forward + backward), T the sequence length. Counts full
    (not causal-halved) attention, as the PaLM appendix and most MFU reports do."""
    n = count_parameters(args)["non_embedding"]
    return 6.0 * n + 12.0 * args.n_layers * args.n_heads * args.head_dim * seq_len


# Bytes per parameter for (weights, gradients, AdamW's two moments) and per activation element.
PRECISIONS: dict[str, dict[str, float]] = {
    # Everything in fp32.
    "fp32": dict(weights=4, gradients=4, optimizer=8, activation=4),
    # Everything in bf16, the course's setting: parameters, gradients and AdamW moments.
    "bf16": dict(weights=2, gradients=2, optimizer=4, activation=2),
    # fp32 master weights, gradients and moments; autocast computes in bf16 and keeps a bf16 copy of
    # each weight alive until backward has used it (the +2).
    "mixed": dict(weights=4 + 2, gradients=4, optimizer=8, activation=2),
}


def activation_elements_per_token(args: TransformerModelArgs) -> int:
    """Leading-order count of tensor elements one token leaves saved for backward (no recomputation,
    flash-style SDPA that stores no T x T matrix). Per block: each norm's input and output (4 x dim),
    q and the attention output before and after the head merge (3 x dim), k and v (2 x kv_dim), and the
    MLP's hidden tensors (SwiGLU: w1 out, silu out, w3 out, product; GELU: w1 out, gelu out). After the
    blocks: the final norm's input and output, the logits and their fp32 log-softmax (as elements of
    the compute dtype, so fp32 logits are counted twice)."""
    kv_dim = args.n_kv_heads * args.head_dim
    mlp = (4 if args.mlp == "swiglu" else 2) * args.ffn_hidden_dim
    per_block = 7 * args.dim + 2 * kv_dim + mlp
    head = 2 * args.dim + 3 * args.vocab_size
    return args.n_layers * per_block + head


def memory_estimate(args: TransformerModelArgs, seq_len: int) -> dict[str, dict[str, float]]:
    """Bytes of training memory per precision: weights, gradients, optimizer, states (their sum),
    activations per token and per sequence of seq_len tokens."""
    n = count_parameters(args)["total"]
    act = activation_elements_per_token(args)
    out = {}
    for name, b in PRECISIONS.items():
        row = dict(weights=n * b["weights"], gradients=n * b["gradients"], optimizer=n * b["optimizer"])
        row["states"] = row["weights"] + row["gradients"] + row["optimizer"]
        row["activations_per_token"] = act * b["activation"]
        row["activations_per_sequence"] = act * b["activation"] * seq_len
        out[name] = row
    return out


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    return params_parser()


def _fmt_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _list_presets(console: Any) -> None:
    from rich.table import Table

    table = Table(title="model presets (override any field with its flag)", caption="params with vocab 32000")
    for col in ("preset", "dim", "layers", "heads", "kv", "norm", "mlp", "pos", "params"):
        table.add_column(
            col, justify="left" if col in ("preset", "norm", "mlp", "pos") else "right", no_wrap=True
        )
    for name, preset in PRESETS.items():
        args = TransformerModelArgs(**preset, vocab_size=32000, seq_len=2048)
        table.add_row(
            name,
            str(args.dim),
            str(args.n_layers),
            str(args.n_heads),
            str(args.n_kv_heads),
            args.norm,
            args.mlp,
            args.pos,
            _fmt_count(count_parameters(args)["total"]),
        )
    console.print(table)


def main(argv: list[str]) -> int:
    from rich.console import Console
    from rich.table import Table

    opts = _parser().parse_args(argv)
    # Pipes and CI logs get a fixed width instead of rich's 80 columns, so no cell is truncated.
    console = Console(width=None if sys.stdout.isatty() else 120)
    if opts.list:
        _list_presets(console)
        return 0
    overrides = {
        f.name: getattr(opts, f.name) for f in params_overrides() if getattr(opts, f.name) is not None
    }
    for flag in ("vocab_size", "seq_len"):
        if getattr(opts, flag) < 1:
            raise UserError(
                f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(opts, flag)}"
            )
    cfg = ModelConfig(preset=opts.preset, **overrides)
    args = model_args_from_config(cfg, vocab_size=opts.vocab_size, seq_len=opts.seq_len)
    counts = count_parameters(args)
    total = counts["total"]

    title = f"{opts.preset}" + "".join(f" {k}={v}" for k, v in overrides.items())
    table = Table(title=f"parameters: {title}, vocab {args.vocab_size}")
    table.add_column("component", no_wrap=True)
    table.add_column("parameters", justify="right")
    table.add_column("share", justify="right")
    labels = dict(
        embedding="embedding (tok_embeddings)",
        positions="learned positions",
        attention="attention (wq, wk, wv, wo)",
        feed_forward=f"feed-forward ({args.mlp}, hidden {args.ffn_hidden_dim})",
        norms=f"norms ({args.norm})",
        head="output head (untied)",
    )
    for c in COMPONENTS:
        if c == "positions" and counts[c] == 0:
            continue
        table.add_row(labels[c], f"{counts[c]:,}", f"{100 * counts[c] / total:.2f}%")
    table.add_section()
    table.add_row("total", f"{total:,}", "100.00%", style="bold")
    table.add_row(
        "excluding the embedding",
        f"{counts['non_embedding']:,}",
        f"{100 * counts['non_embedding'] / total:.2f}%",
    )
    console.print(table)

    flops = flops_per_token(args, opts.seq_len)
    attn = 12.0 * args.n_layers * args.n_heads * args.head_dim * opts.seq_len
    console.print(f"training FLOPs per token at T={opts.seq_len}: {flops / 1e9:.2f} GFLOP")
    console.print(f"  = 6N {6 * counts['non_embedding'] / 1e9:.2f} + attention 12*L*H*Q*T {attn / 1e9:.2f}")

    mem = memory_estimate(args, opts.seq_len)
    mtable = Table(
        title="training memory estimate (AdamW, no activation recomputation)",
        caption="bf16: everything bf16, as the course; mixed: fp32 weights, gradients and moments, "
        "bf16 compute (autocast keeps a bf16 copy of the weights until backward)",
    )
    mtable.add_column("", no_wrap=True)
    for name in PRECISIONS:
        mtable.add_column(name, justify="right", no_wrap=True)
    rows = [
        ("weights", "weights"),
        ("gradients", "gradients"),
        ("AdamW moments", "optimizer"),
        ("weights+grads+AdamW", "states"),
        ("activations / token", "activations_per_token"),
        (f"activations / {opts.seq_len} tokens", "activations_per_sequence"),
    ]
    for label, key in rows:
        mtable.add_row(label, *(_fmt_bytes(mem[p][key]) for p in PRECISIONS))
    console.print(mtable)
    return 0
