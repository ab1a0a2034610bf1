"""The course's 8B experiments on one GPU, measured: tokens/s, TFLOP/s, MFU, memory, top kernels.

PYTHONPATH=. python3 bench/_gpu_check.py [--steps 6] [--configs baseline,fused,compile,seq4096] [--out DIR]
PYTHONPATH=. python3 bench/_gpu_check.py --dry-run      # the same pipeline on CPU with the tiny preset

Run through `bench/gpu_check.sh`. Builds a corpus (the Python standard library, byte tokenizer,
pre-tokenized), then for each configuration builds the 8B model (vocabulary 131072, as the course's
tokenizer) directly on the GPU in bf16 (parameters, gradients and AdamW moments, as the course), runs
lmtrain's training step (`lmtrain.train.train_step`) on batches of 1 x seq tokens: warm-up steps
(compilation happens there), timed steps, then two steps under torch.profiler. Configurations:
  baseline  seq 2048, foreach AdamW, eager          (students: 32.6% MFU)
  fused     seq 2048, fused AdamW, eager
  compile   seq 2048, fused AdamW, torch.compile    (students: 41.6%)
  seq4096   seq 4096, fused AdamW, eager            (students: 43.5%)
Each records tokens/s, TFLOP/s, MFU (against lmtrain.metrics' peak for the device), peak allocated memory
against lmtrain's memory estimate (`lmtrain.memory`: live tensor bytes at the step's peak), the
roofline bound of `lmtrain predict` for the same configuration, the top kernels by device time and the
FFN GEMMs' achieved TFLOP/s (aten::mm calls with an ffn_hidden-sized dimension, from the profile).
Writes gpu_check.json and gpu_check.md under --out ($OUT when set, else runs/gpu-check).

Without a CUDA GPU it exits at once (code 3) saying so. A configuration that runs out of memory is
recorded as such and the next one runs. --budget-s stops starting new configurations after that many
seconds (the whole check is meant to fit in 8 minutes on one H100/H200-class GPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

NO_GPU_EXIT = 3
PUBLISHED_MFU = {"baseline": 0.326, "compile": 0.416, "seq4096": 0.435}
CONFIGS = {  # name -> (sequence length, fused AdamW, torch.compile)
    "baseline": (2048, False, False),
    "fused": (2048, True, False),
    "compile": (2048, True, True),
    "seq4096": (4096, True, False),
}
COURSE_VOCAB = 131072


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(
        prog="bench/gpu_check.sh",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ", ".join(CONFIGS)
    )
    p.add_argument("--steps", type=int, default=6, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    p.add_argument("--out", default=None, help="output folder (default: $OUT, else runs/gpu-check)")
    p.add_argument(
        "--budget-s", type=float, default=420.0, help="start no configuration after this many seconds"
    )
    p.add_argument("--no-profile", action="store_true", help="skip the torch.profiler steps")
    p.add_argument(
        "--dry-run", action="store_true",
        help="on CPU: tiny preset in fp32, sequences / 16, torch.compile skipped",
    )  # fmt: skip
    a = p.parse_args(argv)
    names = [c.strip() for c in a.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown or not names:
        p.error(f"--configs: unknown or empty {unknown or a.configs!r}; valid: {', '.join(CONFIGS)}")
    if a.steps < 1 or a.warmup < 0:
        p.error(f"--steps must be >= 1 and --warmup >= 0, got {a.steps} and {a.warmup}")
    a.configs = names
    a.out = Path(a.out or os.environ.get("OUT") or REPO / "runs" / "gpu-check")
    return a


def build_corpus(out: Path, documents: int) -> Path:
    from lmtrain.data.prepare import parse_args as prepare_args
    from lmtrain.data.prepare import prepare

    corpus = out / "corpus"
    prepare(
        prepare_args(["--source", "stdlib", "--out", str(corpus), "--tokenizer", "byte", "--pretokenize",
                      "--max-documents", str(documents)]),
        progress=False,
    )  # fmt: skip
    return corpus


def build_model(args, device, dtype):
    """lmtrain's Transformer materialised on `device` in `dtype` without a CPU copy first."""
    import torch

    from lmtrain.model import Transformer

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = Transformer(args)
    finally:
        torch.set_default_dtype(default)
    model.to_empty(device=device)
    model.init_weights()  # normal weights, unit norms, fp32 RoPE tables
    return model.train()


def ffn_gemm_rate(prof, ffn_hidden: int, on_gpu: bool) -> dict | None:
    """Achieved TFLOP/s of the aten::mm calls with an ffn_hidden-sized dimension (w1, w2, w3 forward and
    backward), from a torch.profiler capture with record_shapes: FLOPs 2MKN over their kernel time."""
    flops = seconds = 0.0
    calls = 0
    for ev in prof.key_averages(group_by_input_shape=True):
        if ev.key != "aten::mm" or not ev.input_shapes or len(ev.input_shapes) < 2:
            continue
        (m, k), (k2, n) = ev.input_shapes[0][-2:], ev.input_shapes[1][-2:]
        if ffn_hidden not in (m, k, n) or k != k2:
            continue
        flops += 2.0 * m * k * n * ev.count
        us = getattr(ev, "self_device_time_total", 0.0) if on_gpu else ev.self_cpu_time_total
        seconds += (us or 0.0) / 1e6
        calls += ev.count
    if not calls or not seconds:
        return None
    return {"calls": calls, "tflop": flops / 1e12, "seconds": seconds, "tflops": flops / seconds / 1e12}


def top_kernels(prof, on_gpu: bool, top: int = 8) -> list[dict]:
    """The kernels (GPU) or operators (CPU) with the most self time in the profile."""
    import torch

    rows = []
    for ev in prof.key_averages():
        if on_gpu:
            if ev.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = ev.self_device_time_total
        else:
            us = ev.self_cpu_time_total
        rows.append({"name": ev.key[:90], "calls": ev.count, "ms": us / 1e3})
    return sorted(rows, key=lambda r: -r["ms"])[:top]


def run_config(name: str, opts, corpus: Path, device) -> dict:
    import torch

    from lmtrain.config import DataConfig, ModelConfig, OptimizerConfig
    from lmtrain.data import build_dataloader, resolve_tokenizer
    from lmtrain.hooks import StepHooks
    from lmtrain.memory import estimate_training_memory
    from lmtrain.metrics import resolve_peak, synchronize
    from lmtrain.model import model_args_from_config
    from lmtrain.optim import build_optimizer
    from lmtrain.precision import LossScaler
    from lmtrain.train import model_flops_per_token, train_step

    seq, fused, compiled = CONFIGS[name]
    preset, vocab = ("tiny", 512) if opts.dry_run else ("llama3-8b", COURSE_VOCAB)
    seq = seq // 16 if opts.dry_run else seq
    args = model_args_from_config(ModelConfig(preset=preset), vocab_size=vocab, seq_len=seq)
    dtype = torch.float32 if opts.dry_run else torch.bfloat16  # CPU bf16 matmuls are slow
    data_cfg = DataConfig(
        dataset=str(corpus), sequence_length=seq, batch_size=1, pipeline="packed", num_workers=0
    )
    loader = iter(build_dataloader(data_cfg, resolve_tokenizer(data_cfg), "train", seed=0))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(args, device, dtype)
    stepped = torch.compile(model, fullgraph=True) if compiled else model
    optimizer = build_optimizer(model, OptimizerConfig(lr=1e-5, fused=fused), device.type)
    scaler = LossScaler()

    def no_autocast():  # bf16 parameters, no autocast: the course's setting
        return torch.autocast(device.type, enabled=False)

    def step():
        batch = [next(loader)]
        return train_step(
            stepped, optimizer, scaler, batch, device=device, amp=no_autocast, max_norm=1.0, hooks=StepHooks()
        )

    t0 = time.perf_counter()
    for _ in range(opts.warmup):
        step()
    synchronize(device)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    losses = [step().loss for _ in range(opts.steps)]
    synchronize(device)
    seconds = time.perf_counter() - t0
    tokens_per_s = opts.steps * seq / seconds
    fpt = model_flops_per_token(args, seq)
    peak = resolve_peak(device, dtype, None)
    # Live tensor bytes at the step's peak, the figure max_memory_allocated measures.
    estimate = estimate_training_memory(
        args, batch_size=1, seq_len=seq, precision="fp32" if opts.dry_run else "bf16",
        fused_optimizer=fused, device=device.type,
    )  # fmt: skip
    result = {
        "config": name, "seq": seq, "fused": fused, "compile": compiled, "preset": preset,
        "steps": opts.steps, "warmup_s": warmup_s, "step_ms": 1e3 * seconds / opts.steps,
        "tokens_per_s": tokens_per_s, "tflops": fpt * tokens_per_s / 1e12,
        "mfu": fpt * tokens_per_s / (peak.tflops * 1e12), "peak_tflops": peak.tflops, "peak_source": peak.source,
        "loss_first": losses[0], "loss_last": losses[-1],
        "estimate_gib": estimate.peak / 2**30,
        "published_mfu": PUBLISHED_MFU.get(name),
    }  # fmt: skip
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if not opts.no_profile:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
            for _ in range(2):
                step()
            synchronize(device)
        on_gpu = device.type == "cuda"
        result["top_kernels"] = top_kernels(prof, on_gpu)
        result["ffn_gemms"] = ffn_gemm_rate(prof, args.ffn_hidden_dim, on_gpu)
    return result  # the model and optimizer go with this frame; main() collects them


def roofline_bound(name: str) -> float | None:
    """`lmtrain predict`'s MFU bound of the 8B configuration on a GH200."""
    from lmtrain.config import ModelConfig
    from lmtrain.model import model_args_from_config
    from lmtrain.roofline import device as roofline_device
    from lmtrain.roofline import predict

    seq, fused, compiled = CONFIGS[name]
    args = model_args_from_config(ModelConfig(preset="llama3-8b"), vocab_size=COURSE_VOCAB, seq_len=seq)
    return predict(args, roofline_device("gh200"), seq, 1, fused, compiled).mfu


def markdown(results: list[dict], device_label: str, dry_run: bool) -> str:
    from lmtrain.tables import fmt, markdown_table

    head = f"# GPU check on {device_label}{' (dry run: tiny preset on CPU)' if dry_run else ''}\n\n"
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["config"], r["error"]] + [""] * 8)
            continue
        pub = r.get("published_mfu")
        rows.append([
            r["config"], str(r["seq"]), fmt(r["step_ms"], 1), fmt(r["tokens_per_s"], 0), f"{r['tflops']:.3g}",
            f"{100 * r['mfu']:.1f}%", "—" if pub is None else f"{100 * pub:.1f}%",
            f"{100 * r['gh200_bound_mfu']:.1f}%" if r.get("gh200_bound_mfu") else "—",
            fmt(r["peak_memory_gib"], 1) if "peak_memory_gib" in r else "—", fmt(r["estimate_gib"], 1),
        ])  # fmt: skip
    cols = ["config", "seq", "ms/step", "tokens/s", "TFLOP/s", "MFU", "students' MFU", "GH200 bound",
            "peak GiB", "estimate GiB"]  # fmt: skip
    out = [head, markdown_table(cols, rows)]
    for r in results:
        if r.get("top_kernels"):
            out.append(f"\n## {r['config']}: top kernels by self time over 2 profiled steps\n\n")
            out.append(
                markdown_table(
                    ["kernel", "calls", "ms"],
                    [[k["name"], str(k["calls"]), fmt(k["ms"], 2)] for k in r["top_kernels"]],
                )
            )
        if r.get("ffn_gemms"):
            g = r["ffn_gemms"]
            out.append(
                f"\nFFN GEMMs: {g['calls']} calls, {g['tflop']:.3g} TFLOP in {1e3 * g['seconds']:.1f} ms: {g['tflops']:.3g} TFLOP/s\n"
            )
    return "".join(out)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    import torch

    if not opts.dry_run and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False): nothing measured. "
            "Run it on a GPU node, or with --dry-run to check the pipeline on CPU.",
            file=sys.stderr,
        )
        return NO_GPU_EXIT
    device = torch.device("cpu" if opts.dry_run else "cuda")
    label = "CPU" if opts.dry_run else torch.cuda.get_device_name(device)
    start = time.perf_counter()
    opts.out.mkdir(parents=True, exist_ok=True)
    corpus = build_corpus(opts.out, 40 if opts.dry_run else 400)
    print(f"gpu_check: {label}, corpus {corpus}, configs {', '.join(opts.configs)}", flush=True)
    results = []
    for name in opts.configs:
        elapsed = time.perf_counter() - start
        if elapsed > opts.budget_s:
            results.append({"config": name, "error": f"not run: {elapsed:.0f} s spent, over --budget-s"})
            continue
        if opts.dry_run and CONFIGS[name][2]:
            results.append({"config": name, "error": "not run: torch.compile is skipped in the dry run"})
            continue
        try:
            result = run_config(name, opts, corpus, device)
            result["gh200_bound_mfu"] = roofline_bound(name)
        except torch.cuda.OutOfMemoryError as exc:  # the frames it holds are freed after this block
            result = {"config": name, "error": f"out of memory: {str(exc).splitlines()[0][:120]}"}
        results.append(result)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        shown = result.get("error") or (
            f"{result['tokens_per_s']:,.0f} tokens/s, {result['tflops']:.1f} TFLOP/s, MFU {100 * result['mfu']:.1f}%"
        )
        print(f"  {name}: {shown} ({time.perf_counter() - start:.0f} s)", flush=True)
    from lmtrain.atomic import atomic_write_text

    report = {"device": label, "dry_run": opts.dry_run, "torch": torch.__version__, "results": results,
              "wall_s": time.perf_counter() - start}  # fmt: skip
    atomic_write_text(opts.out / "gpu_check.json", json.dumps(report, indent=1) + "\n")
    text = markdown(results, label, opts.dry_run)
    atomic_write_text(opts.out / "gpu_check.md", text)
    print(text)
    print(f"wrote {opts.out / 'gpu_check.json'} and gpu_check.md ({report['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
