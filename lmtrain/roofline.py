"""`lmtrain predict`: a roofline model of one training step, op class by op class, on a given GPU.

lmtrain predict --preset llama3-8b --device gh200 --seq 2048 --batch 1 [--fused] [--compile]
lmtrain predict --preset llama3-8b --device gh200 --course   # the course's four experiments

Every op of a step (forward, backward, optimizer) gets its FLOPs and the bytes it moves through HBM;
its time is bounded below by max(FLOPs / peak FLOP/s, bytes / HBM bandwidth), the roofline. The sum
over ops (a single GPU stream runs them one after another) bounds the step time, hence tokens/s and
MFU from above. The model is the course's setting: parameters, gradients, activations and AdamW
moments all in bf16, no autocast, flash-style attention (causal, T x T never stored).

What it does not see, and why measured MFU stays below the bound: GEMMs and attention kernels reach
a fraction of the datasheet peak (`--gemm-efficiency` scales it, e.g. to a measured FFN GEMM rate),
kernel launch gaps and CPU overhead in eager mode, and the traffic of ops counted here only roughly
(eager elementwise chains are counted kernel by kernel from lmtrain's implementation; under
`--compile` each chain becomes one fused kernel that reads its inputs and writes its outputs once).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from lmtrain.accounting import count_parameters, flops_per_token
from lmtrain.config import ModelConfig
from lmtrain.errors import UserError
from lmtrain.hardware import PEAKS, device_peaks
from lmtrain.model import PRESETS, TransformerModelArgs, model_args_from_config

# --------------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    key: str
    label: str
    tflops: float
    """Dense bf16 peak, TFLOP/s (from lmtrain.metrics.PEAK_TFLOPS, the trainer's MFU table)."""
    bandwidth: float
    """HBM bandwidth, bytes/s (datasheet)."""


def device(key: str) -> Device:
    """The roofline parameters of a GPU by key (gh200, h100-sxm, ...); a UserError lists the keys."""
    try:
        peaks = device_peaks(key)
    except UserError:
        raise UserError(f"--device {key!r}: unknown GPU; expected one of {', '.join(PEAKS)}") from None
    tflops = peaks.tflops("bf16")
    if tflops is None:
        raise UserError(f"--device {key!r}: the table has no bf16 peak for {peaks.label}")
    return Device(key.lower(), peaks.label, tflops, peaks.bandwidth)


# --------------------------------------------------------------------------------------------------
# Ops of one training step
# --------------------------------------------------------------------------------------------------

BF16 = 2  # bytes per element of parameters, gradients, activations and moments

# Bytes moved per element of the tensor an elementwise chain works on, forward + backward, for
# (eager, compiled). Eager counts lmtrain's kernels one by one (fp32 upcasts included); a backward
# chain moves about twice its forward (each op reads its saved input and the incoming gradient and
# writes a gradient). Compiled: one fused kernel per direction, reading inputs and writing outputs once.
ELEMENTWISE_BYTES: dict[str, tuple[float, float, str]] = {
    # RMSNorm: float(), pow, mean, rsqrt-multiply, type_as, * weight (36 B forward).
    "norm": (3 * 36, 4 + 6, "RMSNorm (2L + 1), per element of tokens x dim"),
    # silu(w1 x) * w3 x: silu (4 B) and the product (6 B) forward.
    "swiglu": (3 * 10, 6 + 10, "SwiGLU gate, per element of tokens x ffn_hidden"),
    # float(), complex multiply, type_as on q and k (20 B forward).
    "rope": (3 * 20, 4 + 4, "RoPE on q and k, per element of tokens x (H + Hkv) x hd"),
    # h = x + f(x): read two, write one; backward adds the two branches' gradients.
    "residual": (6 + 6, 2 + 2, "residual adds (2L), per element of tokens x dim"),
    # (B, H, T, hd) -> (B, T, H * hd) before wo, and back in backward.
    "transpose": (4 + 4, 4 + 4, "attention output transpose (L), per element of tokens x dim"),
    # Key/value heads copied to n_heads on CUDA (repeat_interleave) and summed back in backward.
    "kv_repeat": (2 * (2 + 2), 2 * (2 + 2), "key/value head copies (L), per element of the copies"),
}
# Cross-entropy over the logits (lmtrain's chunked fused loss): fp32 upcast, max, subtract, exp, sum,
# scale, downcast in eager (about 44 B per logit); one read, one write when compiled.
LOSS_BYTES = (44.0, 2 + 2 + 4.0)
# AdamW per parameter, bf16 everything: the foreach kernels make about 19 passes over 2-byte tensors
# (moment updates, bias correction, sqrt, addcdiv, weight decay); fused reads param, grad, two moments
# and writes param and moments once (14 B). Gradient clipping adds a norm read and a scale (6 B).
ADAMW_BYTES = {"foreach": 38.0, "fused": 14.0}
CLIP_BYTES = 6.0


@dataclass
class Op:
    cls: str  # gemm, attention, norm, elementwise, loss, embedding, optimizer
    name: str
    count: int  # instances per step
    flops: float  # per instance
    bytes: float  # per instance

    @property
    def group(self) -> str:
        """The row it is summed into by default: GEMMs by shape, everything else by class."""
        return f"gemm {self.name.rsplit(' ', 1)[0]}" if self.cls == "gemm" else self.cls

    def seconds(self, dev: Device, gemm_efficiency: float = 1.0) -> float:
        """Roofline time of all instances: each bound by compute or by memory, whichever is slower."""
        peak = dev.tflops * 1e12 * (gemm_efficiency if self.cls in ("gemm", "attention") else 1.0)
        return self.count * max(self.flops / peak, self.bytes / dev.bandwidth)


def _gemm_ops(label: str, tokens: int, n_in: int, n_out: int, count: int) -> list[Op]:
    """Forward, input-gradient and weight-gradient GEMMs of a (n_in -> n_out) linear over `tokens` rows."""
    flops = 2.0 * tokens * n_in * n_out
    moved = BF16 * (tokens * n_in + n_in * n_out + tokens * n_out)  # every one reads two, writes one
    shape = f"{tokens}x{n_in} @ {n_in}x{n_out} ({label})"
    return [
        Op("gemm", f"{shape} forward", count, flops, moved),
        Op("gemm", f"{shape} input-grad", count, flops, moved),
        Op("gemm", f"{shape} weight-grad", count, flops, moved),
    ]


def step_ops(
    args: TransformerModelArgs, seq: int, batch: int, *, fused_optimizer: bool, compiled: bool
) -> list[Op]:
    """Every op of one training step of `batch` sequences of `seq` tokens."""
    M, L, C = batch * seq, args.n_layers, args.dim
    H, Hkv, hd, F, V = args.n_heads, args.n_kv_heads, args.head_dim, args.ffn_hidden_dim, args.vocab_size
    kv = Hkv * hd
    ops: list[Op] = []
    # GEMMs, grouped by shape: same-shaped projections of a layer share a line.
    ops += _gemm_ops("wq, wo", M, C, C, 2 * L)
    ops += _gemm_ops("wk, wv", M, C, kv, 2 * L)
    ops += _gemm_ops("w1, w3", M, C, F, 2 * L)
    ops += _gemm_ops("w2", M, F, C, L)
    ops += _gemm_ops("output head", M, C, V, 1)
    # Flash attention, causal: QK^T and PV over half the T x T square; backward recomputes the scores
    # and runs five such products against forward's two, hence 2.5x.
    attn_fwd = 2 * 2.0 * batch * H * hd * seq * seq / 2
    qkvo = BF16 * M * (2 * H + 2 * Hkv) * hd
    ops.append(Op("attention", "flash attention forward (causal)", L, attn_fwd, qkvo))
    ops.append(Op("attention", "flash attention backward (causal)", L, 2.5 * attn_fwd, 2 * qkvo))
    # Elementwise chains.
    pick = 1 if compiled else 0
    sizes = {
        "norm": ((2 * L + 1) * M * C, "norm"),
        "swiglu": (L * M * F, "elementwise"),
        "rope": (L * M * (H + Hkv) * hd, "elementwise"),
        "residual": (2 * L * M * C, "elementwise"),
        "transpose": (L * M * C, "elementwise"),
        "kv_repeat": (L * M * 2 * H * hd if Hkv != H else 0, "elementwise"),
    }
    for key, (elements, cls) in sizes.items():
        if elements:
            per_element, label = ELEMENTWISE_BYTES[key][pick], ELEMENTWISE_BYTES[key][2]
            ops.append(Op(cls, label, 1, 0.0, per_element * elements))
    ops.append(
        Op("loss", "cross-entropy over the logits (fused with the head)", 1, 0.0, LOSS_BYTES[pick] * M * V)
    )
    # Embedding: gather forward; backward zeroes the (V, C) gradient and scatter-adds M rows into it.
    ops.append(
        Op(
            "embedding",
            "token embedding gather + gradient scatter",
            1,
            0.0,
            BF16 * (2 * M * C + V * C + 3 * M * C),
        )
    )
    P = count_parameters(args)["total"]
    adamw = ADAMW_BYTES["fused" if fused_optimizer else "foreach"]
    ops.append(
        Op(
            "optimizer",
            f"AdamW ({'fused' if fused_optimizer else 'foreach'}), per parameter",
            1,
            0.0,
            adamw * P,
        )
    )
    ops.append(Op("optimizer", "gradient norm + clipping", 1, 0.0, CLIP_BYTES * P))
    return ops  # fmt: skip


@dataclass
class Prediction:
    args: TransformerModelArgs
    device: Device
    seq: int
    batch: int
    fused: bool
    compiled: bool
    gemm_efficiency: float
    ops: list[Op]

    @property
    def step_seconds(self) -> float:
        return sum(op.seconds(self.device, self.gemm_efficiency) for op in self.ops)

    @property
    def tokens_per_s(self) -> float:
        return self.batch * self.seq / self.step_seconds

    @property
    def model_flops_per_token(self) -> float:
        return flops_per_token(self.args, self.seq)

    @property
    def mfu(self) -> float:
        """Upper bound on MFU as the trainer computes it (model FLOPs/token x tokens/s / peak)."""
        return self.model_flops_per_token * self.tokens_per_s / (self.device.tflops * 1e12)

    def by_group(self) -> dict[str, dict[str, float]]:
        """FLOPs, bytes and roofline seconds per GEMM shape and per other op class."""
        out: dict[str, dict[str, float]] = {}
        for op in self.ops:
            row = out.setdefault(op.group, {"flops": 0.0, "bytes": 0.0, "seconds": 0.0})
            row["flops"] += op.count * op.flops
            row["bytes"] += op.count * op.bytes
            row["seconds"] += op.seconds(self.device, self.gemm_efficiency)
        return out


def predict(
    args: TransformerModelArgs,
    dev: Device,
    seq: int,
    batch: int = 1,
    fused: bool = False,
    compiled: bool = False,
    gemm_efficiency: float = 1.0,
) -> Prediction:
    if seq < 1 or batch < 1:
        raise UserError(f"--seq and --batch must be >= 1, got {seq} and {batch}")
    if not 0 < gemm_efficiency <= 1:
        raise UserError(f"--gemm-efficiency must be in (0, 1], got {gemm_efficiency}")
    ops = step_ops(args, seq, batch, fused_optimizer=fused, compiled=compiled)
    return Prediction(args, dev, seq, batch, fused, compiled, gemm_efficiency, ops)


# The course's experiments on one GH200 (8B, vocabulary 131072, batch 1) and the students' published
# MFU (tokens/s where published). `None`: no published figure.
COURSE_EXPERIMENTS: list[tuple[str, dict, float | None, float | None]] = [
    ("baseline", dict(seq=2048, fused=False, compiled=False), 0.326, 6674.0),
    ("fused", dict(seq=2048, fused=True, compiled=False), None, None),
    ("fused + compile", dict(seq=2048, fused=True, compiled=True), 0.416, None),
    ("seq 4096 (fused)", dict(seq=4096, fused=True, compiled=False), 0.435, 8356.0),
]
COURSE_VOCAB = 131072  # the course's tokenizer (Mistral-Nemo)

# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmtrain predict",
        description=__doc__.split("\n\n")[0],
        epilog="Devices: " + ", ".join(PEAKS) + ". Presets: " + ", ".join(PRESETS) + ".",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--preset", default="llama3-8b", help="model preset")
    p.add_argument("--vocab-size", type=int, default=COURSE_VOCAB, help="vocabulary (the course's tokenizer)")
    p.add_argument("--device", default="gh200", help="GPU whose peak and bandwidth bound the ops")
    p.add_argument("--seq", type=int, default=2048, help="sequence length")
    p.add_argument("--batch", type=int, default=1, help="sequences per step (one GPU)")
    p.add_argument("--fused", action="store_true", help="fused AdamW (the course's --fused-optimizer)")
    p.add_argument("--compile", action="store_true", help="torch.compile: one kernel per elementwise chain")
    p.add_argument(
        "--gemm-efficiency", type=float, default=1.0,
        help="fraction of the peak GEMMs and attention reach (1: the pure roofline)",
    )  # fmt: skip
    p.add_argument("--ops", action="store_true", help="list every op, not only the op classes")
    p.add_argument("--course", action="store_true", help="the course's four experiments vs published MFU")
    return p


def _fmt(x: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:,.1f} {prefix}{unit}"
    return f"{x:,.0f} {unit}"


def _class_table(pred: Prediction, show_ops: bool):
    from rich.table import Table

    d = pred.device
    title = (
        f"one training step: {pred.batch} x {pred.seq} tokens on {d.label} "
        f"({d.tflops:g} TFLOP/s bf16, {d.bandwidth / 1e12:g} TB/s), "
        f"{'fused' if pred.fused else 'foreach'} AdamW, {'compiled' if pred.compiled else 'eager'}"
    )
    table = Table(title=title)
    columns = ("op class", "op", "count") if show_ops else ("op class / GEMM shape (both directions)",)
    for col in (*columns, "FLOPs", "bytes", "FLOP/byte", "bound", "time ms", "share"):
        table.add_column(
            col, justify="left" if col in (*columns[:2], "bound") else "right", no_wrap=col == columns[0]
        )
    total = pred.step_seconds
    peak, bw = d.tflops * 1e12, d.bandwidth
    if show_ops:
        rows = [
            ((op.cls, op.name, str(op.count)), op.count * op.flops, op.count * op.bytes,
             op.seconds(d, pred.gemm_efficiency)) for op in pred.ops
        ]  # fmt: skip
    else:
        rows = [((g,), r["flops"], r["bytes"], r["seconds"]) for g, r in pred.by_group().items()]
    for labels, flops, moved, seconds in rows:
        intensity = f"{flops / moved:,.0f}" if moved else "-"
        compute_peak = peak * (pred.gemm_efficiency if labels[0].startswith(("gemm", "attention")) else 1.0)
        bound = "compute" if flops / compute_peak >= moved / bw else "memory"
        table.add_row(
            *labels, _fmt(flops, "FLOP"), _fmt(moved, "B"), intensity, bound, f"{1e3 * seconds:.3g}",
            f"{seconds / total:.1%}",
        )  # fmt: skip
    table.add_section()
    flops = sum(op.count * op.flops for op in pred.ops)
    moved = sum(op.count * op.bytes for op in pred.ops)
    blanks = [""] * (len(columns) - 1)
    table.add_row(
        "total", *blanks, _fmt(flops, "FLOP"), _fmt(moved, "B"), "", "", f"{1e3 * total:.1f}", "100%"
    )
    return table


def _course_table(args: TransformerModelArgs, dev: Device, gemm_efficiency: float):
    from rich.table import Table

    table = Table(
        title=f"course experiments, {dev.label}, batch 1, roofline bound vs students' published figures"
    )
    for col in (
        "experiment", "seq", "step ms (bound)", "tokens/s (bound)", "MFU (bound)", "published MFU",
        "published tokens/s", "published / bound",
    ):  # fmt: skip
        table.add_column(col, justify="left" if col == "experiment" else "right")
    for name, kw, mfu, tps in COURSE_EXPERIMENTS:
        pred = predict(args, dev, kw["seq"], 1, kw["fused"], kw["compiled"], gemm_efficiency)
        table.add_row(
            name, str(kw["seq"]), f"{1e3 * pred.step_seconds:.0f}", f"{pred.tokens_per_s:,.0f}",
            f"{pred.mfu:.1%}", "—" if mfu is None else f"{mfu:.1%}", "—" if tps is None else f"{tps:,.0f}",
            "—" if mfu is None else f"{mfu / pred.mfu:.2f}",
        )  # fmt: skip
    return table


def main(argv: list[str]) -> int:
    from rich.console import Console

    opts = _parser().parse_args(argv)
    if opts.preset not in PRESETS:
        raise UserError(f"--preset {opts.preset!r}: unknown; valid presets: {', '.join(PRESETS)}")
    if opts.seq < 1 or opts.batch < 1:
        raise UserError(f"--seq and --batch must be >= 1, got {opts.seq} and {opts.batch}")
    if opts.vocab_size < 1:
        raise UserError(f"--vocab-size must be >= 1, got {opts.vocab_size}")
    dev = device(opts.device)
    seq_len = max(opts.seq, 4096 if opts.course else 0)
    args = model_args_from_config(
        ModelConfig(preset=opts.preset), vocab_size=opts.vocab_size, seq_len=seq_len
    )
    console = Console(width=150)
    if opts.course:
        console.print(_course_table(args, dev, opts.gemm_efficiency))
        print(
            "bound: the roofline sum over ops (every op at the datasheet peak or bandwidth); "
            "published / bound = the share of the bound the students reached"
        )
        return 0
    pred = predict(args, dev, opts.seq, opts.batch, opts.fused, opts.compile, opts.gemm_efficiency)
    console.print(_class_table(pred, opts.ops))
    print(
        f"{opts.preset}: {count_parameters(args)['total'] / 1e9:.2f}B parameters, "
        f"{pred.model_flops_per_token / 1e9:.1f} GFLOP/token (6N + 12LHQT); bound: "
        f"{1e3 * pred.step_seconds:.1f} ms/step, {pred.tokens_per_s:,.0f} tokens/s, MFU {pred.mfu:.1%}"
    )
    return 0
