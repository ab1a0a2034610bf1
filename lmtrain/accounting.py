"""`lmtrain params`: plan a run: parameters, FLOPs per token by matmul, memory per GPU, time.

lmtrain params --preset llama3-8b --vocab-size 131072 --seq-len 2048 --device gh200
lmtrain params --presets gpt2-small,gpt2-medium,gpt2-large,gpt2-xl,llama3-8b --seq-len 2048
lmtrain params --preset llama3-8b --sweep-seq 1024,4096,16384 --plot shares.png
lmtrain params --preset llama3-8b --strategy fsdp --gpus 4 --batch-size 2 --memory-gib 80
lmtrain params --preset gpt2-small --steps 400000 --batch-size 1024 --seq-len 1024 --device h100 --mfu 0.5
lmtrain params --preset tiny --vocab-size 256 --norm layernorm --mlp gelu --markdown
lmtrain params --calibrate        # the memory estimate against measured CPU peaks
lmtrain params --list

The model is built on the meta device, so even 8B parameters cost no memory and the count is exact
(it is the model's own parameters, not a formula). The trainer's MFU uses `flops_per_token`;
`flops_breakdown` splits it by matmul and sums back to it exactly. Memory comes from
`lmtrain.memory.estimate_training_memory`, the one estimator the job layer's fit check also uses.
All functions above the command line are pure and importable.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

import torch

from lmtrain.config import ModelConfig
from lmtrain.errors import UserError
from lmtrain.memory import (
    calibration_cases,
    calibration_table,
    device_memory_bytes,
    estimate_training_memory,
    largest_batch,
    meta_parameter_sizes,
)
from lmtrain.metrics import table_peak_tflops
from lmtrain.model import PRESETS, Transformer, TransformerModelArgs, model_args_from_config
from lmtrain.tables import markdown_table

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


def count_parameters(model_or_args: Transformer | TransformerModelArgs) -> dict[str, int]:
    """Parameters per component, plus `total` and `non_embedding` (total minus the embedding tables,
    which are lookups, not matmuls: the N of the 6N FLOPs rule). The output head counts as non-embedding
    because it is untied and costs a full matmul."""
    if isinstance(model_or_args, torch.nn.Module):
        shapes = tuple((name, p.numel()) for name, p in model_or_args.named_parameters())
    else:
        shapes = meta_parameter_sizes(tuple(dataclasses.asdict(model_or_args).items()))
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


# --------------------------------------------------------------------------------------------------
# FLOPs per matmul, AdamW, wall-clock
# --------------------------------------------------------------------------------------------------

# Training FLOPs per token, by matmul, in display order, with the part each one belongs to.
MATMULS: dict[str, str] = {
    "wq": "attention",
    "wk": "attention",
    "wv": "attention",
    "wo": "attention",
    "scores (QK^T)": "attention",
    "values (AV)": "attention",
    "w1": "feed_forward",
    "w3": "feed_forward",
    "w2": "feed_forward",
    "head": "head",
}
PARTS = ("attention", "feed_forward", "head", "norms")


def flops_breakdown(args: TransformerModelArgs, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token (forward + backward = 3 x 2 FLOPs per multiply-add) of each matmul,
    plus `norms`: the 6 FLOPs per norm weight that the 6N rule counts. The entries sum exactly to
    `flops_per_token(args, seq_len)`. Attention scores and values are full T x T (not causal-halved),
    as in `flops_per_token`; `w3` is 0 for the GELU feed-forward."""
    C, F, L = args.dim, args.ffn_hidden_dim, args.n_layers
    q_dim, kv_dim = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    per_layer_macs = {
        "wq": C * q_dim,
        "wk": C * kv_dim,
        "wv": C * kv_dim,
        "wo": q_dim * C,
        "scores (QK^T)": q_dim * seq_len,
        "values (AV)": q_dim * seq_len,
        "w1": C * F,
        "w3": C * F if args.mlp == "swiglu" else 0,
        "w2": F * C,
    }
    out = {name: 6.0 * L * macs for name, macs in per_layer_macs.items()}
    out["head"] = 6.0 * C * args.vocab_size
    out["norms"] = 6.0 * count_parameters(args)["norms"]
    return out


def flops_by_part(args: TransformerModelArgs, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token of attention (projections, scores and values), feed-forward, head and
    norms; they sum to `flops_per_token`."""
    parts = dict.fromkeys(PARTS, 0.0)
    for name, flops in flops_breakdown(args, seq_len).items():
        parts[MATMULS.get(name, name)] += flops
    return parts


# torch's AdamW, per parameter and step: decoupled weight decay (1 multiply), both moments (lerp of
# exp_avg: 3; exp_avg_sq * beta2 + (1 - beta2) * g^2: 4), the denominator (sqrt, divide by the bias
# correction, add eps: 3) and the update (divide, multiply by the step size, subtract: 3). Gradient
# clipping adds 3 (square, sum, rescale).
ADAMW_FLOPS_PER_PARAMETER = 14
CLIP_FLOPS_PER_PARAMETER = 3


def adamw_flops_per_step(args: TransformerModelArgs) -> float:
    """FLOPs of one AdamW step with gradient clipping over all parameters (elementwise, memory bound)."""
    return float((ADAMW_FLOPS_PER_PARAMETER + CLIP_FLOPS_PER_PARAMETER) * count_parameters(args)["total"])


def training_seconds(
    tokens: float, flops_per_token: float, gpus: int, peak_tflops: float, mfu: float
) -> float:
    """Wall-clock seconds to train `tokens` tokens on `gpus` devices of `peak_tflops` at `mfu` (0..1)."""
    return tokens * flops_per_token / (gpus * peak_tflops * 1e12 * mfu)


def _fmt_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

from lmtrain.arguments import DEFAULT_VOCAB, NATIVE_VOCAB, params_overrides  # noqa: E402
from lmtrain.arguments import params_parser as _parser  # noqa: E402

_OVERRIDES = params_overrides()


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


@dataclasses.dataclass
class Table:
    """A titled table of strings: rendered with rich on a terminal, or as markdown."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    caption: str = ""
    bold_last: bool = False  # the last row is a total


_TEXT_COLUMNS = ("part", "shape", "note", "estimated peak at")


def _render(tables: list[Table], lines: list[str], markdown: bool) -> None:
    if markdown:
        for table in tables:
            print(f"**{table.title}**\n")
            print(markdown_table(table.headers, table.rows))
            if table.caption:
                print(f"{table.caption}\n")
        for line in lines:
            print(f"- {line}")
        return
    from rich.console import Console
    from rich.table import Table as RichTable

    # Pipes and CI logs get a fixed width instead of rich's 80 columns, so no cell is truncated.
    console = Console(width=None if sys.stdout.isatty() else 200)
    for table in tables:
        rt = RichTable(title=table.title, caption=table.caption or None)
        for i, header in enumerate(table.headers):
            text = i == 0 or header in _TEXT_COLUMNS
            rt.add_column(header, justify="left" if text else "right", no_wrap=i == 0)
        for i, row in enumerate(table.rows):
            last = table.bold_last and i == len(table.rows) - 1
            if last:
                rt.add_section()
            rt.add_row(*row, style="bold" if last else None)
        console.print(rt)
    for line in lines:
        console.print(line)


def _list_presets() -> Table:
    rows = []
    for name, preset in PRESETS.items():
        vocab = NATIVE_VOCAB.get(name, DEFAULT_VOCAB)
        args = TransformerModelArgs(**preset, vocab_size=vocab, seq_len=2048)
        rows.append([name, str(args.dim), str(args.n_layers), str(args.n_heads), str(args.n_kv_heads), args.norm,
                     args.mlp, args.pos, f"{vocab:,}", _fmt_count(count_parameters(args)["total"])])  # fmt: skip
    return Table(
        "model presets (override any field with its flag)",
        ["preset", "dim", "layers", "heads", "kv", "norm", "mlp", "pos", "vocab", "params"],
        rows,
    )


def _model_args(opts, preset: str, seq_len: int, overrides: dict) -> TransformerModelArgs:
    vocab = opts.vocab_size or NATIVE_VOCAB.get(preset, DEFAULT_VOCAB)
    return model_args_from_config(ModelConfig(preset=preset, **overrides), vocab_size=vocab, seq_len=seq_len)


def _memory_kwargs(opts, seq_len: int) -> dict[str, Any]:
    return dict(seq_len=seq_len, precision=opts.precision, strategy=opts.strategy, world_size=opts.gpus,
                loss_chunk=opts.loss_chunk, fused_optimizer=opts.fused_optimizer,
                gradient_as_bucket_view=opts.gradient_as_bucket_view)  # fmt: skip


def _device_memory(opts) -> int | None:
    if opts.memory_gib is not None:
        return int(opts.memory_gib * 2**30)
    return device_memory_bytes(opts.device) if opts.device else None


def _peak_tflops(opts) -> float | None:
    if opts.peak_tflops is not None:
        return opts.peak_tflops
    if opts.device:
        dtype = (
            torch.float32
            if opts.precision == "fp32"
            else torch.float16
            if "fp16" in opts.precision
            else torch.bfloat16
        )
        return table_peak_tflops(opts.device, dtype)
    return None


def _check(opts) -> None:
    for flag in ("vocab_size", "seq_len", "batch_size", "gpus", "steps"):
        value = getattr(opts, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
    if opts.loss_chunk < 0:
        raise UserError(f"--loss-chunk must be >= 0 (0: plain logits), got {opts.loss_chunk}")
    if not 0 < opts.mfu <= 1:
        raise UserError(f"--mfu is a fraction of the peak in (0, 1], got {opts.mfu} (50% is 0.5)")
    if opts.strategy == "single" and opts.gpus != 1:
        raise UserError(f"--gpus {opts.gpus} needs --strategy ddp or fsdp (single runs one process)")
    for flag in ("memory_gib", "tokens", "peak_tflops"):
        value = getattr(opts, flag)
        if value is not None and not value > 0:
            raise UserError(f"--{flag.replace('_', '-')} must be > 0, got {value}")
    if opts.tokens is not None and opts.steps is not None:
        raise UserError("give either --tokens or --steps, not both")
    if (opts.tokens or opts.steps) and _peak_tflops(opts) is None:
        raise UserError("the wall-clock estimate needs a peak: give --device (e.g. gh200) or --peak-tflops")
    for seq in opts.sweep_seq or []:
        if seq < 1:
            raise UserError(f"--sweep-seq values must be positive integers, got {seq}")
    if opts.plot and not (opts.presets or opts.sweep_seq):
        raise UserError("--plot draws the table of --presets or --sweep-seq; give one of them")
    if opts.plot and not opts.plot.lower().endswith(".png"):
        raise UserError(f"--plot writes a PNG file; give a path ending in .png, got {opts.plot!r}")
    if opts.presets and opts.sweep_seq:
        raise UserError("give either --presets or --sweep-seq: one table varies one thing")


def model_report(args: TransformerModelArgs, opts, seq_len: int) -> dict[str, Any]:
    """Every number of `lmtrain params` for one model and sequence length (what --json prints)."""
    counts = count_parameters(args)
    matmuls = flops_breakdown(args, seq_len)
    total_flops = flops_per_token(args, seq_len)
    est = estimate_training_memory(args, batch_size=opts.batch_size, **_memory_kwargs(opts, seq_len))
    report: dict[str, Any] = {
        "model": dataclasses.asdict(args),
        "ffn_hidden_dim": args.ffn_hidden_dim,
        "parameters": counts,
        "flops_per_token": {"total": total_flops, "matmuls": matmuls, "parts": flops_by_part(args, seq_len)},
        "adamw_flops_per_step": adamw_flops_per_step(args),
        "memory": {
            "batch_size": opts.batch_size, "seq_len": seq_len, "precision": opts.precision,
            "strategy": opts.strategy, "gpus": opts.gpus,
            "terms": {name: value for name, value, _ in est.terms()},
            "peak_bytes": est.peak, "peak_phase": est.peak_phase, "total_bytes": est.total,
        },
    }  # fmt: skip
    memory = _device_memory(opts)
    if memory is not None:
        report["device_memory_bytes"] = memory
        report["fits"] = est.total <= memory
        report["largest_batch"] = largest_batch(args, memory, **_memory_kwargs(opts, seq_len))
    peak = _peak_tflops(opts)
    if opts.tokens or opts.steps:
        tokens = opts.tokens or opts.steps * opts.batch_size * seq_len * opts.gpus
        report["time"] = {
            "tokens": tokens, "gpus": opts.gpus, "mfu": opts.mfu, "peak_tflops": peak,
            "seconds": training_seconds(tokens, total_flops, opts.gpus, peak, opts.mfu),
        }  # fmt: skip
    return report


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%"


def _single_tables(
    args: TransformerModelArgs, opts, title: str, report: dict
) -> tuple[list[Table], list[str]]:
    counts, total = report["parameters"], report["parameters"]["total"]
    labels = dict(
        embedding="embedding (tok_embeddings)",
        positions="learned positions",
        attention="attention (wq, wk, wv, wo)",
        feed_forward=f"feed-forward ({args.mlp}, hidden {args.ffn_hidden_dim})",
        norms=f"norms ({args.norm})",
        head="output head (untied)",
    )
    rows = [[labels[c], f"{counts[c]:,}", _pct(counts[c], total)] for c in COMPONENTS
            if not (c == "positions" and counts[c] == 0)]  # fmt: skip
    rows.append(
        ["excluding the embedding", f"{counts['non_embedding']:,}", _pct(counts["non_embedding"], total)]
    )
    rows.append(["total", f"{total:,}", "100.00%"])
    tables = [Table(f"parameters: {title}, vocab {args.vocab_size}", ["component", "parameters", "share"], rows,
                    bold_last=True)]  # fmt: skip

    flops = report["flops_per_token"]
    T, C, F, q_dim = opts.seq_len, args.dim, args.ffn_hidden_dim, args.n_heads * args.head_dim
    kv = args.n_kv_heads * args.head_dim
    shapes = {"wq": f"{C} x {q_dim}", "wk": f"{C} x {kv}", "wv": f"{C} x {kv}", "wo": f"{q_dim} x {C}",
              "scores (QK^T)": f"{args.n_heads} heads x {args.head_dim} x T={T}",
              "values (AV)": f"{args.n_heads} heads x T={T} x {args.head_dim}",
              "w1": f"{C} x {F}", "w3": f"{C} x {F}", "w2": f"{F} x {C}", "head": f"{C} x {args.vocab_size}",
              "norms": "6 x norm weights (6N rule)"}  # fmt: skip
    rows = [[name, MATMULS.get(name, "norms"), shapes[name], f"{value / 1e9:.3f}", _pct(value, flops["total"])]
            for name, value in flops["matmuls"].items() if value]  # fmt: skip
    rows.append(["total", "", "", f"{flops['total'] / 1e9:.3f}", "100.0%"])
    tables.append(Table(
        f"training FLOPs per token at T={T} (6 per multiply-add, x{args.n_layers} layers)",
        ["matmul", "part", "shape", "GFLOP", "share"], rows,
        caption="parts: " + ", ".join(f"{p} {_pct(v, flops['total'])}" for p, v in flops["parts"].items() if v)
        + "; equals 6N + 12*L*H*Q*T (full, not causal-halved, attention)", bold_last=True,
    ))  # fmt: skip

    mem = report["memory"]
    est_notes = {name: note for name, _, note in
                 estimate_training_memory(args, batch_size=opts.batch_size, **_memory_kwargs(opts, T)).terms()}  # fmt: skip
    rows = [[name, _fmt_bytes(value), est_notes.get(name, "")] for name, value in mem["terms"].items()]
    rows.append(
        [f"peak per GPU ({mem['peak_phase']})", _fmt_bytes(mem["total_bytes"]), "tensor peak + GPU estimates"]
    )
    per = f"{opts.strategy} x{opts.gpus}" if opts.gpus > 1 else opts.strategy
    tables.append(Table(
        f"training memory per GPU: {opts.precision}, {per}, batch {opts.batch_size} x {T}, AdamW"
        f"{' fused' if opts.fused_optimizer else ''}, loss chunk {opts.loss_chunk}",
        ["term", "bytes", "note"], rows,
        caption="the peak is the largest moment of the step (end of forward, loss backward, final-norm "
        "backward, optimizer step), not the sum of all terms", bold_last=True,
    ))  # fmt: skip
    return tables, _summary_lines(report)


def _summary_lines(report: dict) -> list[str]:
    lines = [f"AdamW step (with clipping): {report['adamw_flops_per_step'] / 1e9:.2f} GFLOP "
             f"({ADAMW_FLOPS_PER_PARAMETER + CLIP_FLOPS_PER_PARAMETER} per parameter, memory bound)"]  # fmt: skip
    if "largest_batch" in report:
        memory, mem = report["device_memory_bytes"], report["memory"]
        verdict = "fits" if report["fits"] else "does NOT fit"
        lines.append(f"batch {mem['batch_size']} {verdict} in {_fmt_bytes(memory)}; largest batch that fits: "
                     f"{report['largest_batch']} x {mem['seq_len']} tokens per GPU")  # fmt: skip
        best = report["largest_batch"]
        if not report["fits"] and best:
            steps = -(-mem["batch_size"] // best)
            lines.append(f"  the same batch fits as {steps} accumulated micro-batches of at most {best} "
                         f"(--training.grad_accumulation_steps {steps})")  # fmt: skip
        elif not best:
            acts = sum(v for k, v in mem["terms"].items() if k.startswith("activations"))
            if acts > memory:
                lines.append(f"  not even one sequence fits: its activations alone take {_fmt_bytes(acts)}, "
                             "which no data-parallel sharding divides; shorten the sequence")  # fmt: skip
            else:
                lines.append("  not even one sequence fits: shard the weights, gradients and AdamW moments with "
                             "--strategy fsdp --gpus N")  # fmt: skip
    if "time" in report:
        t = report["time"]
        lines.append(f"{t['tokens']:.3g} tokens on {t['gpus']} GPU(s) at {100 * t['mfu']:.0f}% MFU of "
                     f"{t['peak_tflops']:g} TFLOP/s: {_fmt_duration(t['seconds'])}")  # fmt: skip
    return lines


def _sweep_table(reports: list[tuple[str, dict]], opts, varying: str) -> Table:
    rows = []
    for label, r in reports:
        flops, parts = r["flops_per_token"]["total"], r["flops_per_token"]["parts"]
        m = r["flops_per_token"]["matmuls"]
        row = [label, _fmt_count(r["parameters"]["total"]), f"{flops / 1e9:.2f}",
               _pct(parts["attention"], flops), _pct(m["scores (QK^T)"] + m["values (AV)"], flops),
               _pct(parts["feed_forward"], flops), _pct(parts["head"], flops),
               _fmt_bytes(r["memory"]["total_bytes"])]  # fmt: skip
        if "largest_batch" in r:
            row.append(str(r["largest_batch"]))
        if "time" in r:
            row.append(_fmt_duration(r["time"]["seconds"]))
        rows.append(row)
    headers = [varying, "params", "GFLOP/token", "attention", "of which T^2", "feed-forward", "head",
               f"memory (B={opts.batch_size})"]  # fmt: skip
    if reports and "largest_batch" in reports[0][1]:
        headers.append("largest batch")
    if reports and "time" in reports[0][1]:
        t = reports[0][1]["time"]
        headers.append(f"time ({t['gpus']} GPU, {100 * t['mfu']:.0f}% MFU)")
    seq = f"T={opts.seq_len}" if varying != "seq_len" else "across T"
    return Table(
        f"training FLOPs per token by part, {seq}; memory per GPU {opts.precision} {opts.strategy}",
        headers, rows,
        caption="attention = wq, wk, wv, wo + scores and values (full T x T); 'of which T^2' is the part that "
        "grows with context",
    )  # fmt: skip


def plot_flops_shares(reports: list[tuple[str, dict]], path: str, title: str) -> None:
    """Stacked bars of each row's training FLOPs per token: attention projections, the T^2 part of
    attention, feed-forward and head, as shares, with GFLOP/token above each bar; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmtrain.atomic import atomic_savefig

    labels = [label for label, _ in reports]
    segments = {
        "attention projections": [],
        "attention T^2 (scores, values)": [],
        "feed-forward": [],
        "head": [],
    }
    for _, r in reports:
        m, total = r["flops_per_token"]["matmuls"], r["flops_per_token"]["total"]
        quadratic = m["scores (QK^T)"] + m["values (AV)"]
        segments["attention projections"].append((m["wq"] + m["wk"] + m["wv"] + m["wo"]) / total)
        segments["attention T^2 (scores, values)"].append(quadratic / total)
        segments["feed-forward"].append((m["w1"] + m["w2"] + m["w3"]) / total)
        segments["head"].append(m["head"] / total)
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(labels) + 4), 4.5))
    bottom = [0.0] * len(labels)
    for name, shares in segments.items():
        ax.bar(labels, shares, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, shares)]
    for i, (_, r) in enumerate(reports):
        ax.text(i, 1.01, f"{r['flops_per_token']['total'] / 1e9:.1f} GF", ha="center", fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("share of training FLOPs per token")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, not over them
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)


def _calibration(markdown: bool, as_json: bool) -> int:
    rows = calibration_table(
        calibration_cases(), progress=lambda text: print(text, file=sys.stderr, flush=True)
    )
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(
        "memory estimate against the measured peak of live CPU tensor bytes (2 training steps)",
        ["config", "measured", "estimated", "error", "estimated peak at"],
        [
            [
                r["config"],
                _fmt_bytes(r["measured"]),
                _fmt_bytes(r["estimated"]),
                f"{100 * r['error']:+.1f}%",
                r["phase"],
            ]
            for r in rows
        ],  # fmt: skip
        caption="DDP/FSDP rows: 2 gloo processes, the larger rank's peak",
    )
    _render([table], [], markdown)
    return 0


def main(argv: list[str]) -> int:
    opts = _parser().parse_args(argv)
    if opts.calibrate:
        return _calibration(opts.markdown, opts.json)
    if opts.list:
        _render([_list_presets()], [], opts.markdown)
        return 0
    _check(opts)
    overrides = {f.name: getattr(opts, f.name) for f in _OVERRIDES if getattr(opts, f.name) is not None}
    if opts.presets or opts.sweep_seq:
        if opts.presets:
            runs = [(p, _model_args(opts, p, opts.seq_len, overrides), opts.seq_len) for p in opts.presets]
            varying = "preset"
        else:
            args = _model_args(opts, opts.preset, max(opts.sweep_seq), overrides)
            runs = [(f"T={t}", args, t) for t in opts.sweep_seq]
            varying = "seq_len"
        reports = [(label, model_report(args, opts, seq)) for label, args, seq in runs]
        if opts.plot:
            where = f"T={opts.seq_len}" if varying == "preset" else opts.preset
            plot_flops_shares(reports, opts.plot, f"training FLOPs per token by part ({where})")
        if opts.json:
            print(json.dumps({label: r for label, r in reports}, indent=2))
        else:
            _render([_sweep_table(reports, opts, varying)], [], opts.markdown)
        return 0
    args = _model_args(opts, opts.preset, opts.seq_len, overrides)
    report = model_report(args, opts, opts.seq_len)
    if opts.json:
        print(json.dumps(report, indent=2))
        return 0
    title = f"{opts.preset}" + "".join(f" {k}={v}" for k, v in overrides.items())
    tables, lines = _single_tables(args, opts, title, report)
    _render(tables, lines, opts.markdown)
    return 0
