#!/usr/bin/env python
"""The mixed-precision study: one model, the same batches and steps in seven precision modes, one report.

    python -m jobs.precision_study                  # CPU-sized, here (also: make sweep SWEEP=precision)
    python -m jobs.precision_study --cluster clariden --wait   # GPU-sized, one launcher job on clariden

Modes: fp32; bf16 autocast (fp32 master weights); pure bf16 (weights, gradients and AdamW states in
bf16, the course's mode); fp16 autocast without loss scaling; fp16 with lmtrain's static loss scaler,
with its dynamic scaler (`lmtrain.precision`), and with `torch.amp.GradScaler`. Every mode starts from
the same initial weights (same seed) and trains on the same list of batches, drawn once. The lmtrain
modes step through the trainer's own `train_step`; the GradScaler mode follows the same step (loss
normalised by the batch's tokens, clipping, skip on inf/NaN) with torch's scaler in place of lmtrain's.

Reported per mode: final loss, skipped steps, the loss-scale history, tokens/s. For fp16 without
scaling, at `--probe-every` steps: the fraction of the gradient values that underflow to zero, i.e.
are non-zero in an fp32 backward of the same weights and batch but zero in the fp16 autocast backward
(and, for comparison, the fraction that casting the fp32 gradient to fp16 zeroes, with and without
the static scale). Written to `<out>/report.md` with `precision.png` and every step in `results.json`.

With `--cluster` the study is one job of the jobs launcher (jobs/experiments/precision/experiment.yaml:
one task, one GPU) that runs this module with the same arguments; `--size full` is then the default
except on `--cluster local`. Inside an allocation, `--size full` runs it directly.

On a CPU the fp16 (and, without avx512_bf16/amx_bf16, the bf16) rows are emulated: every op rounds
its output to the low-precision dtype, so underflow, overflow and rounding are those of the dtype,
but the arithmetic runs in fp32 and the tokens/s says nothing about a GPU. The report says which rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from lmtrain.errors import UserError

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = REPO / "jobs" / "experiments" / "precision" / "experiment.yaml"

# fp16's smallest positive subnormal (2^-24) and smallest normal (2^-14) value.
FP16_TINY = 2.0**-24
FP16_MIN_NORMAL = 2.0**-14


@dataclass(frozen=True)
class Mode:
    name: str
    model_dtype: str
    """dtype of the weights, gradients and AdamW states: fp32 or bf16."""
    amp: str
    """autocast dtype of the forward pass: none, bf16 or fp16."""
    scaler: str
    """loss scaling: none, static, dynamic (lmtrain's scalers) or torch (torch.amp.GradScaler)."""
    description: str

    @property
    def compute(self) -> str:
        return self.amp if self.amp != "none" else self.model_dtype


MODES = (
    Mode("fp32", "fp32", "none", "none", "fp32 weights and compute"),
    Mode("bf16-autocast", "fp32", "bf16", "none", "fp32 master weights, bf16 autocast"),
    Mode("bf16-pure", "bf16", "none", "none", "bf16 weights, gradients and AdamW states"),
    Mode("fp16-unscaled", "fp32", "fp16", "none", "fp16 autocast, no loss scaling"),
    Mode("fp16-static", "fp32", "fp16", "static", "fp16 autocast, lmtrain StaticLossScaler"),
    Mode("fp16-dynamic", "fp32", "fp16", "dynamic", "fp16 autocast, lmtrain DynamicLossScaler"),
    Mode("fp16-gradscaler", "fp32", "fp16", "torch", "fp16 autocast, torch.amp.GradScaler"),
)
MODE_NAMES = tuple(m.name for m in MODES)


@dataclass
class StudySize:
    """The model and run of one study size; every field has a flag of the same name."""

    dim: int
    n_layers: int
    n_heads: int
    sequence_length: int
    batch_size: int
    steps: int
    lr: float


SIZES = {
    # Seconds per mode on two CPU cores with byte tokens.
    "cpu": StudySize(dim=128, n_layers=2, n_heads=4, sequence_length=64, batch_size=8, steps=40, lr=1e-3),
    # 0.8B parameters with byte tokens (1.3B with a 128K vocabulary): minutes per mode on one GH200.
    "full": StudySize(
        dim=2048, n_layers=16, n_heads=16, sequence_length=2048, batch_size=4, steps=300, lr=3e-4
    ),
}


@dataclass
class ModeResult:
    mode: Mode
    arithmetic: str
    """How this device computes the mode's dtype: native, or emulated in fp32 (see the docstring)."""
    losses: list[float] = dataclasses.field(default_factory=list)
    skipped: list[bool] = dataclasses.field(default_factory=list)
    scales: list[float] = dataclasses.field(default_factory=list)
    """Loss scale in effect at each step (1 without scaling)."""
    step_seconds: list[float] = dataclasses.field(default_factory=list)
    tokens: list[int] = dataclasses.field(default_factory=list)
    underflow: list[dict] = dataclasses.field(default_factory=list)
    """fp16-unscaled only: the probes (see `underflow_probe`)."""

    @property
    def tokens_per_s(self) -> float | None:
        """Over the steps after the first, which holds allocation and warm-up."""
        if len(self.step_seconds) < 2:
            return None
        return sum(self.tokens[1:]) / sum(self.step_seconds[1:])

    def final_loss(self, last: int = 5) -> float | None:
        """Mean loss of the last `last` steps whose loss is finite (one step's loss is noisy)."""
        tail = [x for x in self.losses[-last:] if math.isfinite(x)]
        return sum(tail) / len(tail) if tail else None

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["tokens_per_s"] = self.tokens_per_s
        return out


# --------------------------------------------------------------------------------------------------
# Where each dtype is computed natively
# --------------------------------------------------------------------------------------------------


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


# CPU instruction-set flags (/proc/cpuinfo) that give a dtype hardware dot products.
CPU_HARDWARE = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}


def arithmetic(compute: str, device: torch.device, flags: set[str]) -> str:
    """`native ...` or `emulated` for `compute` (fp32/bf16/fp16) on this device."""
    if compute == "fp32":
        return "native"
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return "emulated" if compute == "bf16" and major < 8 else "native (tensor cores)"
    found = [f for f in CPU_HARDWARE[compute] if f in flags]
    return f"native ({', '.join(found)})" if found else "emulated"


# --------------------------------------------------------------------------------------------------
# Model, data and one training step per mode
# --------------------------------------------------------------------------------------------------


def build_args(size: StudySize, vocab_size: int):
    from lmtrain.model import TransformerModelArgs

    return TransformerModelArgs(
        dim=size.dim,
        n_layers=size.n_layers,
        n_heads=size.n_heads,
        n_kv_heads=size.n_heads,
        vocab_size=vocab_size,
        seq_len=size.sequence_length,
        multiple_of=1,
        ffn_dim_multiplier=None,
        rope_theta=10000.0,
    )


def draw_batches(dataset: str, tokenizer: str, size: StudySize, seed: int) -> tuple[list[dict], int]:
    """`size.steps` batches from the training split, drawn once so that every mode sees the same ones;
    and the tokenizer's vocabulary size."""
    from lmtrain.config import DataConfig
    from lmtrain.data import build_dataloader, resolve_tokenizer

    cfg = DataConfig(
        dataset=dataset,
        tokenizer=tokenizer,
        sequence_length=size.sequence_length,
        batch_size=size.batch_size,
    )
    tok = resolve_tokenizer(cfg)
    loader = build_dataloader(cfg, tok, "train", seed=seed)
    batches = []
    for batch in loader:
        batches.append({k: v for k, v in batch.items() if k in ("input_ids", "labels")})
        if len(batches) == size.steps:
            break
    return batches, len(tok)


def _autocast(mode: Mode, device: torch.device):
    from lmtrain.config import PrecisionConfig
    from lmtrain.precision import autocast

    return lambda: autocast(PrecisionConfig(model_dtype=mode.model_dtype, amp=mode.amp), device.type)


def _lmtrain_scaler(mode: Mode, init_scale: float, growth_interval: int):
    from lmtrain.config import PrecisionConfig
    from lmtrain.precision import build_loss_scaler

    kind = mode.scaler if mode.scaler in ("static", "dynamic") else "none"
    cfg = PrecisionConfig(
        model_dtype=mode.model_dtype,
        amp=mode.amp,
        loss_scaler=kind,
        init_scale=init_scale,
        growth_interval=growth_interval,
    )
    return build_loss_scaler(cfg)


def grad_scaler_step(
    model, optimizer, scaler, batch: dict, device, amp, max_norm: float
) -> tuple[float, bool]:
    """lmtrain's train_step with torch.amp.GradScaler: (mean loss, skipped)."""
    from lmtrain.losses import IGNORE_INDEX
    from lmtrain.optim import clip_grad_norm

    tokens = int((batch["labels"] != IGNORE_INDEX).sum())
    with amp():
        loss = model(batch["input_ids"].to(device), labels=batch["labels"].to(device))
    scaler.scale(loss / max(tokens, 1)).backward()
    scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.grad is not None]
    clip_grad_norm(params, max_norm)  # inf/NaN gradients are left alone; scaler.step skips them
    before = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    # GradScaler backs off exactly when it found inf/NaN and skipped the step.
    return float(loss.detach()) / max(tokens, 1), scaler.get_scale() < before


def underflow_probe(model, batch: dict, device: torch.device, static_scale: float) -> dict:
    """Backward of one batch on the current weights in fp32 and in fp16 autocast, without scaling.

    `underflow`: among the gradient values that are non-zero in fp32, the share that is exactly zero in
    the fp16 backward (lost to fp16's range: below 2^-24 in some op on the way). `cast_underflow`: the
    share of them that casting the fp32 gradient to fp16 zeroes; `cast_underflow_scaled`: the same for
    the gradient times `static_scale`; `subnormal`: the share below fp16's smallest normal 2^-14."""
    from lmtrain.losses import IGNORE_INDEX

    tokens = max(int((batch["labels"] != IGNORE_INDEX).sum()), 1)
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(amp_dtype) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = model(batch["input_ids"].to(device), labels=batch["labels"].to(device))
        (loss / tokens).backward()
        out = [p.grad.detach().float().flatten() for p in params if p.grad is not None]
        model.zero_grad(set_to_none=True)
        return out

    reference = torch.cat(grads(None))
    fp16 = torch.cat(grads(torch.float16))
    nonzero = reference != 0
    n = int(nonzero.sum())
    magnitude = reference.abs()
    return {
        "nonzero_fp32": n,
        "underflow": int((nonzero & (fp16 == 0)).sum()) / n,
        "cast_underflow": int((nonzero & (reference.half() == 0)).sum()) / n,
        "cast_underflow_scaled": int((nonzero & ((reference * static_scale).half() == 0)).sum()) / n,
        "subnormal": int((nonzero & (magnitude < FP16_MIN_NORMAL)).sum()) / n,
        "smallest_nonzero": float(magnitude[nonzero].min()) if n else None,
    }


def run_mode(
    mode: Mode,
    args,
    batches: list[dict],
    device: torch.device,
    *,
    seed: int,
    lr: float,
    init_scale: float,
    growth_interval: int,
    probe_every: int,
    flags: set[str],
    log=print,
) -> ModeResult:
    from lmtrain.config import OptimizerConfig
    from lmtrain.hooks import StepHooks
    from lmtrain.losses import IGNORE_INDEX
    from lmtrain.model import Transformer
    from lmtrain.optim import build_optimizer
    from lmtrain.precision import torch_dtype
    from lmtrain.train import train_step

    torch.manual_seed(seed)  # the same initial weights in every mode
    model = Transformer(args).to(device=device, dtype=torch_dtype(mode.model_dtype)).train()
    optimizer = build_optimizer(model, OptimizerConfig(lr=lr, weight_decay=0.1), device.type)
    amp = _autocast(mode, device)
    max_norm = 1.0
    if mode.scaler == "torch":
        scaler: Any = torch.amp.GradScaler(
            device.type, init_scale=init_scale, growth_interval=growth_interval
        )
    else:
        scaler = _lmtrain_scaler(mode, init_scale, growth_interval)
    result = ModeResult(mode, arithmetic(mode.compute, device, flags))
    hooks = StepHooks()
    for step, batch in enumerate(batches, 1):
        if mode.name == "fp16-unscaled" and (step == 1 or step % probe_every == 0 or step == len(batches)):
            result.underflow.append({"step": step, **underflow_probe(model, batch, device, init_scale)})
        scale = scaler.get_scale() if mode.scaler == "torch" else scaler.scale
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        if mode.scaler == "torch":
            loss, skipped = grad_scaler_step(model, optimizer, scaler, batch, device, amp, max_norm)
        else:
            out = train_step(
                model, optimizer, scaler, [batch], device=device, amp=amp, max_norm=max_norm, hooks=hooks
            )
            loss, skipped = out.loss, out.skipped
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        result.step_seconds.append(time.perf_counter() - start)
        result.losses.append(loss)
        result.skipped.append(skipped)
        result.scales.append(float(scale))
        result.tokens.append(int((batch["labels"] != IGNORE_INDEX).sum()))
        if step % max(1, len(batches) // 10) == 0 and step < len(batches):  # progress on long runs
            log(f"  {mode.name} step {step}/{len(batches)}: loss {loss:.4f}, scale {scale:g}")
    rate = result.tokens_per_s
    log(
        f"{mode.name:16s} final loss {result.final_loss() or float('nan'):.4f}  skipped {sum(result.skipped)}"
        f"  tokens/s {rate or float('nan'):,.0f}  ({result.arithmetic})"
    )
    return result


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def scale_history(result: ModeResult) -> str:
    """`65536 → 32768 (step 3) → ...`: the scale and the steps where it changed."""
    if result.mode.scaler == "none":
        return "-"
    parts = [f"{result.scales[0]:g}"]
    for step in range(1, len(result.scales)):
        if result.scales[step] != result.scales[step - 1]:
            parts.append(f"{result.scales[step]:g} (step {step + 1})")
    if len(parts) > 8:
        parts = [*parts[:4], f"… {len(parts) - 7} changes …", *parts[-3:]]
    return " → ".join(parts)


def _signed(delta: float) -> str:
    text = f"{delta:+.4f}"
    return "±0" if text in ("+0.0000", "-0.0000") else text


def plot(results: list[ModeResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmtrain.atomic import atomic_savefig

    fig, grid = plt.subplots(2, 2, figsize=(13, 8))
    loss_ax, diff_ax, scale_ax, underflow_ax = grid.flat
    fp32 = next((r for r in results if r.mode.name == "fp32"), None)
    for i, r in enumerate(results):
        steps = range(1, len(r.losses) + 1)
        loss_ax.plot(steps, r.losses, label=r.mode.name, linewidth=1.2)
        if fp32 is not None and r is not fp32:
            diff_ax.plot(
                steps, [a - b for a, b in zip(r.losses, fp32.losses)], label=r.mode.name, linewidth=1
            )
        if r.mode.scaler != "none":
            # Dashed over solid: the two dynamic scalers follow one policy and would hide each other.
            line = scale_ax.plot(
                steps, r.scales, label=r.mode.name, drawstyle="steps-post", linestyle="-" if i % 2 else "--"
            )
            skipped = [s for s, skip in zip(steps, r.skipped) if skip]
            scale_ax.plot(
                skipped, [r.scales[s - 1] for s in skipped], "x", color=line[0].get_color(), markersize=9
            )
        if r.underflow:
            probes = [p["step"] for p in r.underflow]
            underflow_ax.plot(
                probes, [100 * p["underflow"] for p in r.underflow], "o-", label="fp16 backward"
            )
            underflow_ax.plot(
                probes, [100 * p["cast_underflow"] for p in r.underflow], "s--", label="fp32 grad cast"
            )
    loss_ax.set(title="training loss", xlabel="step", ylabel="loss (nats/token)")
    diff_ax.set(title="loss minus fp32's loss", xlabel="step")
    scale_ax.set(title="loss scale (x: step skipped)", xlabel="step", yscale="log")
    underflow_ax.set(
        title="fp16 without scaling: gradients lost to underflow", xlabel="step", ylabel="% of non-zero"
    )
    for ax in grid.flat:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)


def write_report(results: list[ModeResult], out_dir: Path, setup: dict) -> Path:
    from lmtrain.atomic import atomic_write_text
    from lmtrain.tables import fmt, markdown_table

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        out_dir / "results.json",
        json.dumps({"setup": setup, "modes": [r.to_dict() for r in results]}, indent=1) + "\n",
    )
    plot(results, out_dir / "precision.png")
    fp32 = next((r for r in results if r.mode.name == "fp32"), None)
    headers = ["mode", "weights", "compute", "loss scaling", "arithmetic here", "final loss", "Δ vs fp32"]
    headers += ["skipped steps", "loss scale history", "tokens/s", "vs fp32"]
    rows = []
    for r in results:
        final = r.final_loss()
        base = fp32.final_loss() if fp32 else None
        rate, base_rate = r.tokens_per_s, fp32.tokens_per_s if fp32 else None
        rows.append(
            [
                r.mode.name,
                r.mode.model_dtype,
                r.mode.compute,
                {"none": "-", "torch": "torch.amp.GradScaler"}.get(r.mode.scaler, f"lmtrain {r.mode.scaler}"),
                r.arithmetic,
                fmt(final, 4),
                _signed(final - base) if final is not None and base is not None and r is not fp32 else "-",
                f"{sum(r.skipped)} / {len(r.skipped)}",
                scale_history(r),
                fmt(rate, 0),
                f"{rate / base_rate:.2f}×" if rate and base_rate else "-",
            ]
        )
    lines = [
        "# Precision study",
        "",
        f"{setup['model']} on {setup['dataset']} ({setup['tokens_per_step']:,} tokens per step, "
        f"{setup['steps']} steps, AdamW lr {setup['lr']:g}, gradient clipping at 1.0), on {setup['device']}; "
        f"torch {setup['torch']}. Every mode starts from the same weights and trains on the same batches. "
        "The final loss is the mean of the last 5 steps' training loss; tokens/s excludes the first step. "
        f"Scalers start at {setup['init_scale']:g}; the dynamic ones grow after {setup['growth_interval']} "
        "clean steps.",
        "",
        markdown_table(headers, rows).rstrip(),
        "",
        "![loss, loss scale and underflow](precision.png)",
        "",
    ]
    emulated = [r for r in results if r.arithmetic == "emulated"]
    if emulated:
        missing = sorted({f for r in emulated for f in CPU_HARDWARE.get(r.mode.compute, ())})
        lacks = f" (this CPU lacks {', '.join(missing)})" if setup["device"].startswith("CPU") else ""
        lines += [
            f"**Emulated rows: {', '.join(r.mode.name for r in emulated)}.** This device has no hardware "
            f"arithmetic for their dtype{lacks}: each op computes in fp32 and rounds its output to that "
            "dtype, so rounding, underflow and overflow at op boundaries are the dtype's, but their tokens/s "
            "says nothing about a GPU.",
            "",
        ]
    probed = next((r for r in results if r.underflow), None)
    if probed:
        lines += [
            "## Gradient underflow in fp16 without loss scaling",
            "",
            "At each probed step of the fp16-unscaled run, one backward of the same weights and batch in "
            "fp32 and in fp16 autocast. *Lost in fp16 backward*: share of the gradient values that are "
            "non-zero in fp32 but exactly zero in fp16. *fp32 grad → fp16*: share that a cast of the fp32 "
            f"gradient zeroes (|g| < 2^-24); *× {setup['init_scale']:g}*: the same after the static "
            "scale; *subnormal*: share below fp16's smallest normal 2^-14, where fp16 keeps fewer digits.",
            "",
            markdown_table(
                [
                    "step",
                    "non-zero fp32 values",
                    "lost in fp16 backward",
                    "fp32 grad → fp16",
                    f"× {setup['init_scale']:g} → fp16",
                    "subnormal in fp16",
                    "smallest |g|",
                ],
                [
                    [
                        str(p["step"]),
                        f"{p['nonzero_fp32']:,}",
                        f"{p['underflow']:.2%}",
                        f"{p['cast_underflow']:.2%}",
                        f"{p['cast_underflow_scaled']:.2%}",
                        f"{p['subnormal']:.2%}",
                        f"{p['smallest_nonzero']:.2e}" if p["smallest_nonzero"] is not None else "-",
                    ]
                    for p in probed.underflow
                ],
            ).rstrip(),
            "",
        ]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.precision_study",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--size", choices=list(SIZES), help="cpu or full (default: full on CUDA, else cpu)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument(
        "--dataset", default="data/stdlib-bytes", help="training data, as data.dataset (default: %(default)s)"
    )
    p.add_argument("--tokenizer", default="", help="tokenizer, as data.tokenizer (default: the dataset's)")
    p.add_argument("--modes", help=f"comma-separated subset of {', '.join(MODE_NAMES)} (default: all)")
    for f in dataclasses.fields(StudySize):
        p.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=type(getattr(SIZES["cpu"], f.name)),
            help=f"cpu size: {getattr(SIZES['cpu'], f.name):g}, full: {getattr(SIZES['full'], f.name):g}",
        )
    p.add_argument("--seed", type=int, default=0, help="initial weights and data order (default: 0)")
    p.add_argument(
        "--init-scale",
        type=float,
        default=2.0**16,
        help="initial (dynamic) or fixed (static) loss scale (default: %(default)g)",
    )
    p.add_argument(
        "--growth-interval",
        type=int,
        default=10,
        help="dynamic scalers: clean steps before the scale doubles (default: %(default)s)",
    )
    p.add_argument(
        "--probe-every",
        type=int,
        default=10,
        help="fp16-unscaled: probe underflow every N steps (default: 10)",
    )
    p.add_argument("--out", help="report directory (default: runs/precision/<size>)")
    p.add_argument("--cluster", help="submit as one launcher job to this cluster (local, clariden)")
    p.add_argument("--account", help="with --cluster: Slurm account (else the cluster profile's)")
    p.add_argument("--wait", action="store_true", help="with --cluster: wait for the job and its report")
    return p


def job_arguments(args: argparse.Namespace, size_name: str, out_dir: Path) -> list[str]:
    """The arguments of the study inside the launcher's job: this command's, without the cluster's."""
    dataset = Path(args.dataset)
    out = ["--size", size_name, "--device", args.device, "--out", str(out_dir.resolve())]
    out += ["--dataset", str(dataset.resolve()) if dataset.exists() else args.dataset]
    out += ["--tokenizer", args.tokenizer] if args.tokenizer else []
    out += ["--modes", args.modes] if args.modes else []
    for f in dataclasses.fields(StudySize):
        if getattr(args, f.name) is not None:
            out += [f"--{f.name.replace('_', '-')}", str(getattr(args, f.name))]
    out += ["--seed", str(args.seed), "--init-scale", repr(args.init_scale)]
    out += ["--growth-interval", str(args.growth_interval), "--probe-every", str(args.probe_every)]
    return out


def submit(args: argparse.Namespace, size_name: str, out_dir: Path, log=print):
    """Submit the study as one job of the jobs launcher; returns the submitit job."""
    from jobs import submit as launcher
    from jobs.sbatch import render_sbatch

    prepared = launcher.prepare(
        str(EXPERIMENT),
        args.cluster,
        [f"data.dataset={args.dataset}"],
        args.account,
        run_dir=str(out_dir.resolve()),
    )
    for warning in prepared.warnings:
        log(f"warning: {warning}")
    command = list(prepared.plan.command)  # [nsys ...] [numactl ...] PYTHON -m lmtrain.train --config X
    at = command.index("lmtrain.train")
    command[at:] = ["jobs.precision_study", *job_arguments(args, size_name, out_dir)]
    plan = dataclasses.replace(prepared.plan, command=tuple(command))
    job = launcher.submit(dataclasses.replace(prepared, plan=plan, sbatch=render_sbatch(plan)))
    log(f"submitted the precision study as job {job.job_id} on {args.cluster}; report: {out_dir}/report.md")
    return job


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from lmtrain.distributed import DistEnv, resolve_device

    if args.cluster:
        size_name = args.size or ("cpu" if args.cluster == "local" else "full")
    else:
        device = resolve_device(args.device, DistEnv())
        size_name = args.size or ("full" if device.type == "cuda" else "cpu")
    size = dataclasses.replace(
        SIZES[size_name],
        **{
            f.name: getattr(args, f.name)
            for f in dataclasses.fields(StudySize)
            if getattr(args, f.name) is not None
        },
    )
    for f in dataclasses.fields(StudySize):
        if not getattr(size, f.name) > 0:
            raise UserError(f"--{f.name.replace('_', '-')} must be > 0, got {getattr(size, f.name)}")
    if size.steps < 2:
        raise UserError(f"--steps must be >= 2 (the first step is excluded from tokens/s), got {size.steps}")
    if args.probe_every < 1 or args.growth_interval < 1 or not args.init_scale > 0:
        raise UserError("--probe-every and --growth-interval must be >= 1, --init-scale > 0")
    modes = list(MODES)
    if args.modes:
        chosen = [m.strip() for m in args.modes.split(",") if m.strip()]
        unknown = [m for m in chosen if m not in MODE_NAMES]
        if unknown:
            raise UserError(f"--modes: unknown {unknown}; valid: {', '.join(MODE_NAMES)}")
        modes = [m for m in MODES if m.name in chosen]
    out_dir = Path(args.out) if args.out else Path("runs") / "precision" / size_name
    if args.cluster:
        job = submit(args, size_name, out_dir)
        if args.wait:
            job.result()
            print(f"report: {out_dir / 'report.md'}")
        return 0
    if device.type == "cpu" and size_name == "full":
        print(
            "warning: --size full on a CPU: expect hours; --size cpu is the CPU-sized study", file=sys.stderr
        )

    batches, vocab_size = draw_batches(args.dataset, args.tokenizer, size, args.seed)
    if len(batches) < size.steps:
        raise UserError(f"--dataset {args.dataset} gave only {len(batches)} batches; need {size.steps}")
    model_args = build_args(size, vocab_size)
    flags = cpu_flags()
    from lmtrain.accounting import count_parameters

    params = count_parameters(model_args)["total"]
    print(
        f"precision study ({size_name}): {len(modes)} modes x {size.steps} steps on {device}; {params / 1e6:.2f}M parameters"
    )
    results = [
        run_mode(
            mode,
            model_args,
            batches,
            device,
            seed=args.seed,
            lr=size.lr,
            init_scale=args.init_scale,
            growth_interval=args.growth_interval,
            probe_every=args.probe_every,
            flags=flags,
        )
        for mode in modes
    ]
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (
            f"CPU ({platform.processor() or platform.machine()}, torch capability "
            f"{torch.backends.cpu.get_cpu_capability()}, threads: {torch.get_num_threads()})"
        )
    )
    setup = {
        "size": size_name,
        "model": f"Llama block dim {size.dim} x {size.n_layers} layers, {size.n_heads} heads, "
        f"vocab {vocab_size} ({params / 1e6:.2f}M parameters)",
        "dataset": args.dataset,
        "tokenizer": args.tokenizer or "the dataset's",
        "steps": size.steps,
        "tokens_per_step": size.batch_size * size.sequence_length,
        "lr": size.lr,
        "device": where,
        "torch": torch.__version__,
        "init_scale": args.init_scale,
        "growth_interval": args.growth_interval,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    path = write_report(results, out_dir, setup)
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    from lmtrain.cli import run_user_facing

    raise SystemExit(run_user_facing(main, sys.argv[1:]))
