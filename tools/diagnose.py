#!/usr/bin/env python3
"""lmtrain doctor runs/my-run   (or: python tools/diagnose.py trace.json --markdown doctor.md --json doctor.json)

A pipeline doctor: reads a torch.profiler trace of any PyTorch training loop (lmtrain's torch_trace.json,
or the Chrome trace a script wrote with `prof.export_chrome_trace(...)` or `tensorboard_trace_handler`)
and names what slows the loop down, each with its measured cost per step and the fix:

  data-loader    time the step waits for the next batch
  host-sync      .item(), .cpu(), nonzero, boolean indexing, printing tensors inside the step
  pageable-copy  host-to-device copies from memory that is not pinned (CUDA traces)
  fp32-matmul    matmuls and attention in fp32 where autocast would run them in bf16
  tiny-ops       the same small op called many times per step (Python loops over heads, patches, params)
  repeated-work  masks and position tables rebuilt in every step from constants
  recompile      torch.compile recompiling inside the steps (shapes or Python values that change)
  memory-growth  memory that grows from step to step (tensors of every step kept alive)

and the peak memory by category when the trace was recorded with profile_memory=True. Steps are the
`ProfilerStep#N` spans (call `prof.step()` once per step) or lmtrain's `lmtrain/data_wait` step starts.
A trace recorded on a CPU shows the host side only: where a cost needs a CUDA trace to be measured (the
wait a sync causes, copy times, kernel times), the report says so.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
import re
import statistics
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmtrain.atomic import atomic_write_text  # noqa: E402
from lmtrain.errors import UserError  # noqa: E402
from lmtrain.tables import fmt, markdown_table  # noqa: E402
from lmtrain.tools.common import run_tool  # noqa: E402

# Thresholds: a finding is reported only above them, so a clean loop gets a short report.
DATA_WAIT_SHARE = 0.05  # data-loader wait above 5% of the step
FP32_MATMUL_SHARE = 0.5  # more than half the matmul time in fp32 ...
FP32_STEP_SHARE = 0.05  # ... and at least 5% of the step
TINY_REPEATS = 8  # one op with one shape called this often in a row is a loop ...
TINY_GAP = 10  # ... when consecutive calls are at most this many ops apart (a layer's repeat is further)
TINY_CPU_US = 200.0  # ... when each call is this short on the host
TABLE_MIN_ELEMENTS = 1024  # constant tensors smaller than this are not worth caching
GROWTH_MIN_BYTES = 1 << 20  # memory growing by at least 1 MiB per step ...
GROWTH_MIN_SHARE = 0.01  # ... and 1% of the peak

SYNC_OPS = {"aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::masked_select",
            "aten::_unique2", "aten::unique_consecutive", "aten::unique_dim", "aten::equal"}  # fmt: skip
CUDA_SYNC_CALLS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy"}
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::convolution",
              "aten::convolution_backward", "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
              "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
              "aten::_scaled_dot_product_cudnn_attention", "aten::_flash_attention_forward",
              "aten::_efficient_attention_forward"}  # fmt: skip
FACTORY_OPS = {"aten::ones", "aten::zeros", "aten::full", "aten::arange", "aten::eye", "aten::linspace",
               "aten::logspace", "aten::tril_indices", "aten::triu_indices"}  # fmt: skip
# Ops that build position tables and masks -> the most dims their input has when they do (activations
# have a batch dim: (B, T, C); a flattened (B*T, V) exp is a softmax, so exp counts on 1-D inputs only).
TABLE_OPS = {"aten::tril": 2, "aten::triu": 2, "aten::sin": 2, "aten::cos": 2, "aten::outer": 1, "aten::polar": 2,
             "aten::meshgrid": 1, "aten::exp": 1}  # fmt: skip
LOW_PRECISION = ("c10::BFloat16", "c10::Half")
FLOAT_TYPES = ("float", "double", *LOW_PRECISION)
DATA_LOADER = re.compile(r"enumerate\(DataLoader\)#.*__next__|^lmtrain/data_wait$")
OPTIMIZER = re.compile(r"^Optimizer\.step|^lmtrain/optimizer$")
AUTOGRAD = re.compile(r"^autograd::engine::evaluate_function")
COMPILE_SPANS = {"entire_frame_compile", "entire_backward_compile"}
COMPILED_REGION = re.compile(r"Torch-Compiled Region: (\d+)/(\d+)")

FIXES = {
    "data-loader": "tokenize/decode/augment once up front or on the device in batches, not per sample in "
    "__getitem__; DataLoader(num_workers=N, persistent_workers=True, pin_memory=True) overlaps loading with the step",
    "host-sync": "keep metrics on the device (loss_sum += loss.detach()) and read them every N steps; no print(tensor), "
    ".item(), .cpu() or boolean-mask indexing inside the step",
    "pageable-copy": "DataLoader(pin_memory=True) (or tensor.pin_memory()) and .to(device, non_blocking=True)",
    "fp32-matmul": "run forward and loss under torch.autocast(device_type, dtype=torch.bfloat16); on GPUs also "
    "torch.set_float32_matmul_precision('high') for what stays fp32",
    "tiny-ops": "batch the loop into one op: all heads in one scaled_dot_product_attention, patches with a strided "
    "Conv2d/unfold, foreach/fused optimizers; or torch.compile the region",
    "repeated-work": "build constant tables and masks once (register_buffer(..., persistent=False)) and slice them per "
    "step; causal attention: scaled_dot_product_attention(is_causal=True)",
    "recompile": "give the compiled function the same shapes every step (fixed-length blocks, drop_last=True) or mark "
    "the changing dim dynamic (torch._dynamo.mark_dynamic, dynamic=True); TORCH_LOGS=recompiles names the guard",
    "memory-growth": "something keeps tensors of every step alive (a list of losses, outputs or attention maps, "
    "total += loss): keep detached scalars, or only the last value",
}
TITLES = {
    "data-loader": "waiting for the data loader",
    "host-sync": "host-device syncs inside the step",
    "pageable-copy": "copies from non-pinned memory",
    "fp32-matmul": "fp32 matmuls where autocast would apply",
    "tiny-ops": "many tiny ops (launch-bound loops)",
    "repeated-work": "identical work repeated every step",
    "recompile": "torch.compile recompilations",
    "memory-growth": "memory grows every step",
}


# ----------------------------------------------------------------------------- the trace


@dataclass
class Span:
    """One complete ("X") event on a host thread or a device stream; times in microseconds."""

    name: str
    cat: str
    ts: float
    dur: float
    tid: object
    args: dict
    parent: Span | None = None
    depth: int = 0
    device_us: float = 0.0  # time of the GPU kernels and copies this span launched (CUDA traces)

    @property
    def end(self) -> float:
        return self.ts + self.dur

    def ancestors(self):
        node = self.parent
        while node is not None:
            yield node
            node = node.parent

    def input_type(self) -> str | None:
        types = self.args.get("Input type")
        return types[0] if types else None

    def dims(self) -> str:
        return str([d for d in self.args.get("Input Dims", []) if d])


@dataclass
class Trace:
    path: Path
    host: list[Span]  # cpu_op, user_annotation, python_function, cuda_runtime, cuda_driver
    device: list[Span]  # kernel, gpu_memcpy, gpu_memset
    memory: list[dict]  # [memory] instant events: ts, bytes, total, addr, device_type
    meta: dict
    steps: list[tuple[float, float]] = field(default_factory=list)
    step_source: str = ""
    starts: list[float] = field(default_factory=list)

    @property
    def has_cuda(self) -> bool:
        return bool(self.device) or any(s.cat == "cuda_runtime" for s in self.host)

    def step_of(self, ts: float) -> int | None:
        i = bisect.bisect_right(self.starts, ts) - 1
        return i if i >= 0 and ts <= self.steps[i][1] else None

    @property
    def n_steps(self) -> int:
        return len(self.steps)

    def step_ms(self) -> list[float]:
        return [(end - start) / 1e3 for start, end in self.steps]


HOST_CATS = {
    "cpu_op",
    "user_annotation",
    "python_function",
    "cuda_runtime",
    "cuda_driver",
    "operator",
    "Operator",
}
DEVICE_CATS = {"kernel", "gpu_memcpy", "gpu_memset", "Kernel", "Memcpy", "Memset"}
TRACE_NAMES = (
    "torch_trace.json",
    "*.pt.trace.json",
    "*.pt.trace.json.gz",
    "torch_trace*.json",
    "*trace*.json",
)


def find_trace(path: Path) -> Path:
    """The trace file itself, or the one in a run directory (lmtrain's torch_trace.json first)."""
    if not path.exists():
        raise UserError(
            f"{path}: no such file or directory; give a torch.profiler trace (.json) or a run directory"
        )
    if path.is_file():
        return path
    for pattern in TRACE_NAMES:
        found = sorted(path.glob(pattern), key=lambda p: p.stat().st_mtime, reverse=True)
        if found:
            return found[0]
    raise UserError(
        f"{path}: no torch.profiler trace in this directory (looked for {', '.join(TRACE_NAMES)}); write one with "
        "lmtrain's profiling.torch_profile=true, prof.export_chrome_trace(PATH) or tensorboard_trace_handler(DIR)"
    )


def read_events(path: Path) -> tuple[list[dict], dict]:
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        doc = json.loads(raw)
    except (gzip.BadGzipFile, EOFError) as exc:
        raise UserError(
            f"{path}: not a readable gzip file ({exc}); give the trace .json or .json.gz"
        ) from exc
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not a JSON text file; give a torch.profiler Chrome trace (.json)") from exc
    except json.JSONDecodeError as exc:
        # A prefix of valid JSON fails at its very end, or inside a string it cut (reported where the
        # string starts); a file cut just after a "}" or "]" is caught by the first.
        text = exc.doc.rstrip()
        ends_early = exc.pos >= len(text) or exc.msg.startswith("Unterminated string")
        ends_early = ends_early or not text.endswith(("}", "]"))
        hint = " (the file ends early: was the trace still being written?)" if ends_early else ""
        raise UserError(
            f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}{hint}; "
            "give a complete torch.profiler Chrome trace"
        ) from exc
    if isinstance(doc, list):  # the Chrome trace format also allows a bare list of events
        doc = {"traceEvents": doc}
    if not isinstance(doc, dict) or not isinstance(doc.get("traceEvents"), list):
        raise UserError(
            f"{path}: JSON, but not a Chrome trace (no traceEvents list); give the file torch.profiler's "
            "export_chrome_trace wrote"
        )
    meta = {k: v for k, v in doc.items() if k != "traceEvents"}
    return doc["traceEvents"], meta


def nest(spans: list[Span]) -> None:
    """Set each host span's parent: the innermost span on the same thread that encloses it."""
    by_thread: dict[object, list[Span]] = defaultdict(list)
    for s in spans:
        by_thread[s.tid].append(s)
    for thread in by_thread.values():
        thread.sort(key=lambda s: (s.ts, -s.dur))
        stack: list[Span] = []
        for s in thread:
            while stack and s.ts >= stack[-1].end:
                stack.pop()
            if stack:
                s.parent, s.depth = stack[-1], stack[-1].depth + 1
            stack.append(s)


def attribute_device_time(host: list[Span], device: list[Span]) -> None:
    """Add each kernel's and copy's duration to the host spans around the runtime call that launched it
    (the `correlation` arg links the two)."""
    by_corr: dict[object, float] = defaultdict(float)
    for d in device:
        if "correlation" in d.args:
            by_corr[d.args["correlation"]] += d.dur
    for r in host:
        if r.cat == "cuda_runtime" and r.args.get("correlation") in by_corr:
            us = by_corr[r.args["correlation"]]
            r.device_us += us
            for a in r.ancestors():
                a.device_us += us


def load_trace(path: Path) -> Trace:
    path = find_trace(Path(path))
    events, meta = read_events(path)
    host, device, memory = [], [], []
    for e in events:
        if not isinstance(e, dict):
            continue
        ph, cat, name = e.get("ph"), e.get("cat"), e.get("name", "")
        if ph == "X" and isinstance(e.get("dur"), (int, float)) and isinstance(e.get("ts"), (int, float)):
            span = Span(
                str(name), str(cat), float(e["ts"]), float(e["dur"]), e.get("tid"), e.get("args") or {}
            )
            if cat in HOST_CATS:
                host.append(span)
            elif cat in DEVICE_CATS:
                device.append(span)
        elif ph == "i" and name == "[memory]":
            a = e.get("args") or {}
            if "Bytes" in a and "Total Allocated" in a:
                memory.append({"ts": float(e["ts"]), "bytes": a["Bytes"], "total": a["Total Allocated"],
                               "addr": a.get("Addr"), "device_type": a.get("Device Type", 0)})  # fmt: skip
    if not any(s.cat in ("cpu_op", "operator", "Operator") for s in host):
        raise UserError(
            f"{path}: a Chrome trace without PyTorch operator events (cat cpu_op); give a torch.profiler trace "
            "recorded with ProfilerActivity.CPU"
        )
    nest(host)
    attribute_device_time(host, device)
    trace = Trace(path, host, device, sorted(memory, key=lambda m: m["ts"]), meta)
    trace.steps, trace.step_source = find_steps(host)
    trace.starts = [s for s, _ in trace.steps]
    return trace


def find_steps(host: list[Span]) -> tuple[list[tuple[float, float]], str]:
    marked = sorted((s for s in host if s.name.startswith("ProfilerStep#")), key=lambda s: s.ts)
    if marked:
        return [(s.ts, s.end) for s in marked], "ProfilerStep#N spans"
    starts = sorted(s.ts for s in host if s.name == "lmtrain/data_wait")
    if starts:
        ends = starts[1:] + [max(s.end for s in host if s.name.startswith("lmtrain/"))]
        return list(zip(starts, ends)), "lmtrain/data_wait step starts"
    ops = [s for s in host if s.cat == "cpu_op"]
    return [(min(s.ts for s in ops), max(s.end for s in ops))], "the whole trace (no step markers)"


# ----------------------------------------------------------------------------- findings


@dataclass
class Finding:
    check: str
    ms_per_step: float  # measured in this trace (host time on a CPU trace)
    share: float  # of the mean step time
    evidence: str
    measured: str = ""  # what the number is, and what it would take to measure the rest
    mib_per_step: float | None = None  # memory findings: growth per step

    @property
    def title(self) -> str:
        return TITLES[self.check]

    @property
    def fix(self) -> str:
        return FIXES[self.check]

    def as_dict(self) -> dict:
        return {"check": self.check, "title": self.title, "ms_per_step": self.ms_per_step, "share": self.share,
                "evidence": self.evidence, "measured": self.measured, "fix": self.fix,
                "mib_per_step": self.mib_per_step}  # fmt: skip


def outermost(spans: list[Span], names: set[str]) -> list[Span]:
    """Spans named in `names` that are not nested inside another span of `names`."""
    return [s for s in spans if s.name in names and not any(a.name in names for a in s.ancestors())]


def in_steps(trace: Trace, spans) -> dict[int, list[Span]]:
    per_step: dict[int, list[Span]] = defaultdict(list)
    for s in spans:
        i = trace.step_of(s.ts)
        if i is not None:
            per_step[i].append(s)
    return per_step


def inside(span: Span, pattern: re.Pattern) -> bool:
    return any(pattern.search(a.name) for a in span.ancestors())


class Doctor:
    def __init__(self, trace: Trace):
        self.trace = trace
        self.n = trace.n_steps
        self.step_ms = statistics.fmean(trace.step_ms())
        self.ops = [s for s in trace.host if s.cat == "cpu_op"]
        self.notes: list[str] = []
        self.forward_by_seq: dict[int, list[Span]] | None = None
        self.compiles = [s for s in outermost(self.ops, COMPILE_SPANS) if trace.step_of(s.ts) is not None]
        self.steady_ms = self.step_ms - sum(s.dur for s in self.compiles) / 1e3 / self.n

    def per_step(self, total_us: float, base_ms: float | None = None) -> tuple[float, float]:
        """(ms per step, share of the step without compile time: what is left once compiling stops)."""
        ms = total_us / 1e3 / self.n
        base = base_ms if base_ms is not None else self.steady_ms
        return ms, ms / base if base else 0.0

    def steps_with(self, per_step: dict[int, list]) -> int:
        return sum(1 for spans in per_step.values() if spans)

    # ---------------------------------------------------------------- checks
    def data_loader(self) -> Finding | None:
        waits = [s for s in self.trace.host if DATA_LOADER.search(s.name) and not inside(s, DATA_LOADER)]
        waits = [s for s in waits if self.trace.step_of(s.ts) is not None]
        if not waits:
            return None
        ms, share = self.per_step(sum(s.dur for s in waits))
        if share < DATA_WAIT_SHARE:
            return None
        single = any("_SingleProcessDataLoaderIter" in s.name for s in waits)
        how = (
            "num_workers=0: batches are built in the training process"
            if single
            else "the workers fall behind"
        )
        return Finding("data-loader", ms, share, f"{len(waits) / self.n:.0f} wait(s)/step, {ms:.1f} ms; {how}",
                       "host time in the loader's __next__")  # fmt: skip

    def host_sync(self) -> Finding | None:
        # The optimizer's step counters live on the host (unless capturable): reading them syncs nothing.
        syncs = [s for s in outermost(self.ops, SYNC_OPS) if not inside(s, OPTIMIZER)]
        syncs += [
            s for s in self.ops if s.name == "aten::index" and "bool" in (s.args.get("Input type") or [])[1:]
        ]
        per_step = in_steps(self.trace, syncs)
        cuda_waits = in_steps(self.trace, [s for s in self.trace.host if s.name in CUDA_SYNC_CALLS])
        if max(self.steps_with(per_step), self.steps_with(cuda_waits)) < max(1, (self.n + 1) // 2):
            return None  # an occasional read at a logging step is fine; every step is not
        counts = Counter(s.name.removeprefix("aten::") for spans in per_step.values() for s in spans)
        evidence = ", ".join(f"{name} x{c / self.n:.0f}" for name, c in counts.most_common()) + " per step"
        if cuda_waits:
            wait_us = sum(s.dur for spans in cuda_waits.values() for s in spans)
            ms, share = self.per_step(wait_us)
            calls = Counter(s.name for spans in cuda_waits.values() for s in spans)
            evidence += "; " + ", ".join(f"{n} x{c / self.n:.0f}" for n, c in calls.items())
            return Finding("host-sync", ms, share, evidence, "host time blocked in CUDA synchronizations")
        ms, share = self.per_step(sum(s.dur for spans in per_step.values() for s in spans))
        return Finding("host-sync", ms, share, evidence,
                       "host time of the sync ops; the GPU queue drain each one forces needs a CUDA trace")  # fmt: skip

    def pageable_copies(self) -> Finding | None:
        copies = [s for s in self.trace.device if "Pageable" in s.name and "HtoD" in s.name]
        if not self.trace.has_cuda:
            self.notes.append("pageable-copy: a CPU-only trace has no host-to-device copies; profile on a GPU "
                              "(ProfilerActivity.CUDA) to measure them")  # fmt: skip
            return None
        per_step = in_steps(self.trace, copies)
        if not per_step:
            return None
        spans = [s for v in per_step.values() for s in v]
        mib = sum(float(s.args.get("bytes", 0)) for s in spans) / 2**20 / self.n
        ms, share = self.per_step(sum(s.dur for s in spans))
        return Finding("pageable-copy", ms, share, f"{len(spans) / self.n:.0f} HtoD copies/step, {mib:.1f} MiB/step "
                       "from pageable memory", "device time of the copies")  # fmt: skip

    def upcast_by_kernel(self, span: Span) -> bool:
        """A matmul that an op given bf16/fp16 inputs runs in fp32 inside (the math attention path upcasts),
        or the backward of one: autocast did apply there, the kernel chose fp32."""
        if any(a.input_type() in LOW_PRECISION for a in span.ancestors() if a.name.startswith("aten::")):
            return True
        node = next((a for a in span.ancestors() if AUTOGRAD.search(a.name)), None)
        if node is None or "Sequence number" not in node.args:
            return False
        if self.forward_by_seq is None:
            self.forward_by_seq = defaultdict(list)
            for s in self.ops:
                if "Sequence number" in s.args and s.name.startswith("aten::") and not inside(s, AUTOGRAD):
                    self.forward_by_seq[s.args["Sequence number"]].append(s)
        forward = self.forward_by_seq.get(node.args["Sequence number"], [])
        return any(
            a.input_type() in LOW_PRECISION
            for f in forward
            for a in f.ancestors()
            if a.name.startswith("aten::")
        )

    def fp32_matmuls(self) -> Finding | None:
        mms = [s for s in outermost(self.ops, MATMUL_OPS) if self.trace.step_of(s.ts) is not None
               and not self.upcast_by_kernel(s)]  # fmt: skip
        if not mms:
            return None
        if all(s.input_type() is None for s in mms):
            self.notes.append("fp32-matmul: the trace has no input types; profile with record_shapes=True")
            return None
        fp32 = [s for s in mms if s.input_type() == "float"]
        # on a GPU the host only launches: the kernels' time is what fp32 costs
        cost = (lambda s: s.device_us) if self.trace.device else (lambda s: s.dur)
        ms, share = self.per_step(sum(map(cost, fp32)))
        if (
            not fp32
            or sum(map(cost, fp32)) < FP32_MATMUL_SHARE * sum(map(cost, mms))
            or share < FP32_STEP_SHARE
        ):
            return None
        biggest = max(fp32, key=cost)
        what = (
            "GPU kernel time of fp32 matmuls"
            if self.trace.device
            else "host time of fp32 matmuls on this CPU; the bf16 gain on tensor cores needs a GPU to measure"
        )
        return Finding("fp32-matmul", ms, share, f"{len(fp32) / self.n:.0f} of {len(mms) / self.n:.0f} matmuls/step "
                       f"in fp32; longest {biggest.name} {biggest.dims()}", what)  # fmt: skip

    def tiny_ops(self) -> Finding | None:
        """Python loops over small ops: the same op with the same shapes called again and again, only a few
        other ops apart (a model's layers repeat their ops too, but a whole layer apart)."""
        by_step: dict[int, list[Span]] = defaultdict(list)
        for s in self.ops:
            if s.name.startswith("aten::") and not any(a.name.startswith("aten::") for a in s.ancestors()):
                i = self.trace.step_of(s.ts)
                if i is not None and not inside(s, DATA_LOADER):
                    by_step[i].append(s)
        regions: list[tuple[int, list[Span], Span]] = []  # (step, ops of the loop, one repeated op)
        for i, seq in by_step.items():
            seq.sort(key=lambda s: s.ts)
            last_at: dict[tuple[str, str], tuple[int, int]] = {}  # op+shape -> (index, calls in its chain)
            for j, s in enumerate(seq):
                # scalar bookkeeping (step counters, .item()) is not a kernel launch; syncs are their own check
                if s.dims() == "[]" or s.name in SYNC_OPS:
                    continue
                key = (s.name, s.dims())
                prev, calls = last_at.get(key, (-TINY_GAP - 1, 0))
                last_at[key] = (j, calls + 1 if j - prev <= TINY_GAP else 1)
                if last_at[key][1] == TINY_REPEATS:
                    regions.append((i, seq, s))
        if len({i for i, _, _ in regions}) < max(1, (self.n + 1) // 2):
            return None
        ops_in_loops: set[int] = set()
        examples: Counter = Counter()
        shapes: dict[str, str] = {}
        for _, seq, s in regions:
            key = (s.name, s.dims())
            idx = [k for k, o in enumerate(seq) if (o.name, o.dims()) == key]
            # the loop spans from the first to the last call of the repeated op that are TINY_GAP apart
            for a, b in zip(idx, idx[1:]):
                if b - a <= TINY_GAP:
                    ops_in_loops.update(id(o) for o in seq[a : b + 1])
            examples[s.name.removeprefix("aten::")] += len(idx)
            shapes.setdefault(s.name.removeprefix("aten::"), s.dims())
        loop_ops = [o for seq in by_step.values() for o in seq if id(o) in ops_in_loops]
        if statistics.median(o.dur for o in loop_ops) >= TINY_CPU_US:
            return None  # long ops in a loop are not launch-bound
        ms, share = self.per_step(sum(o.dur for o in loop_ops))
        top = "; ".join(
            f"{name} x{c / self.n:.0f} (e.g. {shapes[name]})" for name, c in examples.most_common(3)
        )
        return Finding("tiny-ops", ms, share, f"{len(loop_ops) / self.n:.0f} ops/step in loops of one op repeated "
                       f">= {TINY_REPEATS}x at most {TINY_GAP} ops apart; {top} per step",
                       f"host time of the ops in those loops (median {statistics.median(o.dur for o in loop_ops):.0f} "
                       "us each)")  # fmt: skip

    def repeated_work(self) -> Finding | None:
        # The loader's and optimizer's own buffers and backward's zero-filled gradients are not tables.
        skip = re.compile("|".join((DATA_LOADER.pattern, OPTIMIZER.pattern, AUTOGRAD.pattern)))
        found = []
        for s in self.ops:
            if self.trace.step_of(s.ts) is None or inside(s, skip):
                continue
            if any(a.name.startswith("aten::") for a in s.ancestors()):
                continue  # what an op does inside (an attention kernel's own mask) is not the user's code
            if s.name in FACTORY_OPS and elements(s) >= TABLE_MIN_ELEMENTS:
                found.append(s)
            elif s.name in TABLE_OPS and s.input_type() in FLOAT_TYPES and table_rank(s) <= TABLE_OPS[s.name]:
                found.append(s)
        per_step = in_steps(self.trace, found)
        if self.steps_with(per_step) < max(1, (self.n + 1) // 2):
            return None
        names = Counter(s.name.removeprefix("aten::") for s in found)
        ms, share = self.per_step(sum(s.dur for s in found))
        shapes = sorted({s.dims() if s.name not in FACTORY_OPS else str(s.args.get("Concrete Inputs", [""])[0])
                         for s in found})[:3]  # fmt: skip
        return Finding("repeated-work", ms, share, ", ".join(f"{n} x{c / self.n:.0f}" for n, c in names.items())
                       + f" per step from constants ({', '.join(shapes)})", "host time rebuilding them")  # fmt: skip

    def recompiles(self) -> Finding | None:
        compiles = self.compiles
        regions = [
            COMPILED_REGION.search(s.name) for s in self.ops if s.name.startswith("Torch-Compiled Region")
        ]
        recompiled = sorted({f"{m[1]}/{m[2]}" for m in regions if m and int(m[2]) > 0})
        if not compiles:
            return None
        if not recompiled:
            self.notes.append(f"recompile: {len(compiles)} first compilation(s) inside the profiled steps; "
                              "start the profile after a warm-up step")  # fmt: skip
            return None
        ms, share = self.per_step(sum(s.dur for s in compiles), base_ms=self.step_ms)
        return Finding("recompile", ms, share, f"{len(compiles)} compilations in {self.n} steps; compiled "
                       f"versions {', '.join(recompiled)} (frame/recompile)", "host time compiling")  # fmt: skip

    def memory_growth(self, mem: list[dict]) -> Finding | None:
        if self.n < 3 or not mem:
            return None
        times = [m["ts"] for m in mem]
        ends = []
        for _, end in self.trace.steps:
            i = bisect.bisect_right(times, end) - 1
            ends.append(mem[i]["total"] if i >= 0 else 0)
        deltas = [b - a for a, b in zip(ends, ends[1:])]
        peak = max(m["total"] for m in mem)
        growth = statistics.fmean(deltas)
        if min(deltas) <= 0 or growth < GROWTH_MIN_BYTES or growth < GROWTH_MIN_SHARE * peak:
            return None
        return Finding("memory-growth", 0.0, 0.0, f"allocated memory at step ends: "
                       f"{', '.join(f'{e / 2**20:.0f}' for e in ends)} MiB (+{growth / 2**20:.1f} MiB/step)",
                       "memory, not time: the run runs out of memory after enough steps",
                       mib_per_step=growth / 2**20)  # fmt: skip

    def run(self) -> list[Finding]:
        mem = memory_events(self.trace)
        found = [self.data_loader(), self.host_sync(), self.pageable_copies(), self.fp32_matmuls(), self.tiny_ops(),
                 self.repeated_work(), self.recompiles(), self.memory_growth(mem)]  # fmt: skip
        if not self.trace.meta.get("profile_memory") and not mem:
            self.notes.append(
                "memory: no [memory] events; profile with profile_memory=True for peak memory by category"
            )
        if mem and mem[0]["device_type"] == 0:
            self.notes.append("memory: on a CPU the profiler counts only blocks allocated while it records; "
                              "parameters and optimizer state allocated before are not in the peak")  # fmt: skip
        if not self.trace.has_cuda:
            self.notes.append("this is a CPU trace: times are host times; kernel times, sync waits and copy times "
                              "need a trace with ProfilerActivity.CUDA on a GPU")  # fmt: skip
        return sorted((f for f in found if f is not None), key=lambda f: -f.ms_per_step)


def table_rank(span: Span) -> int:
    return max((len(d) for d in span.args.get("Input Dims", []) if d), default=0)


def elements(span: Span) -> int:
    """Output elements of a factory op, from its size argument (Concrete Inputs, needs record_shapes)."""
    concrete = span.args.get("Concrete Inputs") or [""]
    if span.name == "aten::arange":
        nums = [float(x) for x in concrete[:3] if re.fullmatch(r"-?[\d.]+(e-?\d+)?", x or "")]
        if len(nums) == 1:
            return int(nums[0])
        if len(nums) >= 2:
            step = nums[2] if len(nums) == 3 and nums[2] else 1.0
            return int(abs((nums[1] - nums[0]) / step))
        return 0
    sizes = [int(x) for x in re.findall(r"\d+", concrete[0] or "")]
    n = 1
    for x in sizes:
        n *= x
    return n if sizes else 0


# ----------------------------------------------------------------------------- memory by category


def memory_events(trace: Trace) -> list[dict]:
    """The [memory] events of the device that trains (CUDA when the trace has it, else the CPU), each with
    `total`: the allocated bytes after it. CUDA's totals are the caching allocator's own; the CPU's count
    from the profiler's start and can drift when blocks from an earlier profile are freed, so on a CPU the
    total is the sum of the blocks allocated and not yet freed within this trace."""
    cuda = [m for m in trace.memory if m["device_type"] == 1]
    if cuda:
        return cuda
    events, live, total = [], {}, 0
    for m in trace.memory:
        if m["device_type"] != 0:
            continue
        if m["bytes"] > 0:
            total += m["bytes"] - live.get(m["addr"], 0)
            live[m["addr"]] = m["bytes"]
        elif m["addr"] in live:
            total -= live.pop(m["addr"])
        events.append({**m, "total": total})
    return events


def category(trace: Trace, ts: float, host_by_thread: list[Span]) -> str:
    """What an allocation at `ts` was for, from the spans that enclose it."""
    names = [s.name for s in host_by_thread if s.ts <= ts <= s.end]
    if any(DATA_LOADER.search(n) for n in names):
        return "input batches"
    if any(n.startswith("Optimizer.step") or n == "lmtrain/optimizer" for n in names):
        return "optimizer"
    if any("AccumulateGrad" in n for n in names):
        return "gradients"
    if any(n.startswith("autograd::engine::evaluate_function") for n in names) or "lmtrain/backward" in names:
        return "backward temporaries"
    if trace.step_of(ts) is not None:
        return "activations (forward)"
    return "outside the steps"


def memory_by_category(trace: Trace) -> dict | None:
    mem = memory_events(trace)
    if not mem:
        return None
    peak_i = max(range(len(mem)), key=lambda i: mem[i]["total"])
    live: dict[object, tuple[int, float]] = {}
    for m in mem[: peak_i + 1]:
        if m["bytes"] > 0:
            live[m["addr"]] = (m["bytes"], m["ts"])
        else:
            live.pop(m["addr"], None)
    annotated = [s for s in trace.host if s.cat in ("user_annotation", "cpu_op") and (
        DATA_LOADER.search(s.name) or s.name.startswith(("Optimizer.step", "lmtrain/", "autograd::engine"))
        or "AccumulateGrad" in s.name)]  # fmt: skip
    annotated.sort(key=lambda s: s.ts)
    starts = [s.ts for s in annotated]
    by_cat: Counter = Counter()
    for size, ts in live.values():
        # only spans that start before ts can enclose it; the enclosing ones are few and recent
        i = bisect.bisect_right(starts, ts)
        by_cat[category(trace, ts, [s for s in annotated[max(0, i - 64) : i] if s.end >= ts])] += size
    peak = mem[peak_i]["total"]
    by_cat["allocated before the profile (parameters, optimizer state, ...)"] = max(
        0, peak - sum(by_cat.values())
    )
    step = trace.step_of(mem[peak_i]["ts"])
    device = "cuda" if mem[0]["device_type"] == 1 else "cpu"
    if device == "cpu":
        # The CPU totals start at zero when profiling starts; CUDA's are the caching allocator's own.
        by_cat["allocated before the profile (parameters, optimizer state, ...)"] = 0
    return {"device": device, "peak_bytes": peak, "peak_step": step,
            "categories": {k: v for k, v in by_cat.most_common() if v > 0}}  # fmt: skip


# ----------------------------------------------------------------------------- report


def diagnose(path) -> dict:
    trace = load_trace(Path(path))
    doctor = Doctor(trace)
    findings = doctor.run()
    return {
        "trace": str(trace.path),
        "steps": trace.n_steps,
        "step_source": trace.step_source,
        "step_ms": doctor.step_ms,
        "step_ms_without_compile": doctor.steady_ms,
        "device": "cuda" if trace.has_cuda else "cpu",
        "findings": [f.as_dict() for f in findings],
        "memory": memory_by_category(trace),
        "notes": doctor.notes,
    }


def _cost(f: dict) -> str:
    if f["mib_per_step"] is not None:
        return f"+{f['mib_per_step']:.1f} MiB"
    return f"{f['ms_per_step']:.2f} ms ({100 * f['share']:.1f}%)"


def _memory_rows(report: dict) -> list[list[str]]:
    mem = report["memory"]
    return [[name, fmt(size / 2**20, 1), fmt(100 * size / mem["peak_bytes"], 1)] for name, size in
            mem["categories"].items()]  # fmt: skip


def _headline(report: dict) -> str:
    compiling = report["step_ms"] - report["step_ms_without_compile"]
    extra = (
        f" ({report['step_ms_without_compile']:.1f} without compiling)"
        if compiling > 0.05 * report["step_ms"]
        else ""
    )
    return (f"{report['trace']}: {report['steps']} steps ({report['step_source']}), {report['step_ms']:.1f} ms/step"
            f"{extra}, {report['device']} trace, {len(report['findings'])} finding(s); shares are of the step "
            "without compiling")  # fmt: skip


def to_markdown(report: dict) -> str:
    out = [f"# lmtrain doctor\n\n{_headline(report)}\n\n"]
    if report["findings"]:
        out.append(markdown_table(["#", "problem", "cost/step", "evidence", "fix"],
                                  [[str(i), f["title"], _cost(f), f["evidence"], f["fix"]]
                                   for i, f in enumerate(report["findings"], 1)]))  # fmt: skip
    else:
        out.append("No problems found above the thresholds.\n")
    if report["memory"]:
        mem = report["memory"]
        out.append(f"\n## Peak memory by category ({mem['device']}, {mem['peak_bytes'] / 2**20:.1f} MiB)\n\n")
        out.append(markdown_table(["category", "MiB", "% of peak"], _memory_rows(report)))
    if report["notes"]:
        out.append("\n## Not measured in this trace\n\n" + "".join(f"- {n}\n" for n in report["notes"]))
    return "".join(out)


def print_plain(report: dict) -> None:
    print(_headline(report))
    for i, f in enumerate(report["findings"], 1):
        print(f"{i}. {f['title']}: {_cost(f)}/step; {f['evidence']} [{f['measured']}]")
        print(f"   fix: {f['fix']}")
    if report["memory"]:
        mem = report["memory"]
        print(f"peak memory ({mem['device']}): {mem['peak_bytes'] / 2**20:.1f} MiB = " + ", ".join(
            f"{name} {size / 2**20:.1f} MiB" for name, size in mem["categories"].items()))  # fmt: skip
    for note in report["notes"]:
        print(f"note: {note}")


def print_rich(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 160))  # evidence and fixes are long: wrap less
    table = Table(title=_headline(report), title_justify="left", show_lines=True)
    for col, kw in (("#", {"justify": "right"}), ("problem", {"style": "bold"}), ("cost/step", {"justify": "right"}),
                    ("evidence", {}), ("fix", {"style": "green"})):  # fmt: skip
        table.add_column(col, **kw)
    for i, f in enumerate(report["findings"], 1):
        table.add_row(str(i), f["title"], _cost(f), f"{f['evidence']}\n[dim]{f['measured']}[/dim]", f["fix"])
    console.print(table if report["findings"] else _headline(report) + ": no problems above the thresholds")
    if report["memory"]:
        mem = report["memory"]
        mt = Table(title=f"peak memory by category ({mem['device']}, {mem['peak_bytes'] / 2**20:.1f} MiB)",
                   title_justify="left")  # fmt: skip
        for col in ("category", "MiB", "% of peak"):
            mt.add_column(col, justify="left" if col == "category" else "right")
        for row in _memory_rows(report):
            mt.add_row(*row)
        console.print(mt)
    for note in report["notes"]:
        console.print(f"[dim]note: {note}[/dim]")


def _write(target: str, text: str) -> None:
    if target == "-":
        sys.stdout.write(text)
    else:
        atomic_write_text(target, text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmtrain doctor", description=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument(
        "trace", type=Path, help="a torch.profiler Chrome trace (.json, .json.gz) or a run directory"
    )
    p.add_argument(
        "--json", metavar="PATH", nargs="?", const="-", help="write the report as JSON (no PATH: stdout)"
    )
    p.add_argument(
        "--markdown",
        metavar="PATH",
        nargs="?",
        const="-",
        help="write the report as markdown (no PATH: stdout)",
    )
    p.add_argument(
        "--plain",
        action="store_true",
        help="plain lines even on a terminal (default: rich tables on a terminal)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = diagnose(args.trace)
    if args.json:
        _write(args.json, json.dumps(report, indent=1) + "\n")
    if args.markdown:
        _write(args.markdown, to_markdown(report))
    if "-" not in (args.json, args.markdown):
        if sys.stdout.isatty() and not args.plain:
            print_rich(report)
        else:
            print_plain(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
