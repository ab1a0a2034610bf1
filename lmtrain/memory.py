"""Training memory per GPU: one estimator, named terms in bytes, calibrated against measured CPU peaks.

    python -c "from lmtrain.memory import *; from lmtrain.model import *; print(estimate_training_memory(TransformerModelArgs(**PRESETS['llama3-8b'], vocab_size=131072), batch_size=1, seq_len=2048).summary())"

API (pure functions: no memory is allocated, the model is counted on the meta device):

    est = estimate_training_memory(args, batch_size=1, seq_len=2048, precision="bf16",
                                   strategy="fsdp", world_size=4, loss_chunk=512,
                                   fused_optimizer=False, gradient_as_bucket_view=False)
    est.total            # bytes per process (GPU): tensor peak + the GPU-only estimates
    est.peak             # bytes of live tensors at the step's peak (what calibration measures)
    est.terms()          # [(name, bytes, note)] in display order, for tables
    largest_batch(args, device_memory_bytes("gh200"), seq_len=2048, ...)  # 0 when nothing fits
    estimate_for_config(train_config, world_size=4, vocab_size=131072)     # as `lmtrain train` runs it

`args` is a `TransformerModelArgs` (`model_args_from_config(cfg.model, ...)` builds it from a config).
`precision`: "fp32" | "bf16" | "fp16" (weights, gradients and AdamW moments in that dtype, no autocast)
| "amp-bf16" | "amp-fp16" (fp32 master weights, gradients and moments; matmuls under autocast).
`strategy`: "single" | "ddp" | "fsdp" (FSDP2 `fully_shard` per block and at the root, as
`lmtrain.distributed.wrap_model`), with `world_size` processes and `batch_size` samples per process.

The model follows lmtrain's training step exactly: every activation term is what `lmtrain.model` saves
for backward (the residual stream that feeds each norm, the fp32 statistics of RMSNorm, q/k/v/output
of SDPA with k and v repeated to all heads, the feed-forward's hidden tensors), the fused head + loss
of `lmtrain.losses` (its fp32 weight gradient and the input gradient held from forward to backward,
one `loss_chunk x vocab` block of logits at a time), and torch's AdamW (foreach keeps one temporary
per parameter; fused keeps none). The peak is the largest of four moments of the step: the end of
forward (the loss's held gradients and logits chunks on top of every saved activation), the loss's
backward, the final norm's backward (the first gradients join every saved activation), and the
optimizer step (all gradients plus the optimizer's temporaries). Not modelled: document masking's
(B, 1, T, T) mask, activation checkpointing, torch.compile's fusions (they only lower the peak).

`measure_training_peak` measures the same quantity on CPU (the profiler's allocation events give the
live bytes of the CPU allocator), for one process or gloo DDP/FSDP ranks; `calibration_table` compares
the two. Terms only a GPU has are estimates, not measured anywhere here: see GPU_ONLY_ESTIMATES.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from dataclasses import dataclass, field

import torch

from lmtrain.distributed import DDP_GRADIENT_AS_BUCKET_VIEW
from lmtrain.errors import UserError
from lmtrain.hardware import DEVICE_MEMORY_MIB, PRECISIONS, STRATEGIES  # noqa: E402,F401  (re-exported)
from lmtrain.model import Transformer, TransformerModelArgs

# GPU-only terms. None of them can be measured on CPU, so each is an estimate from public figures, and
# each is 0 for device="cpu" (what calibration compares against).
GPU_ONLY_ESTIMATES = {
    # The CUDA context, cuBLAS/cuDNN handles and their workspaces: outside PyTorch's allocator but
    # inside the device's memory. About 0.5-1 GiB on Hopper with recent CUDA.
    "cuda_context": 1 << 30,
    # NCCL's communicator buffers per process group (channels x buffer size): a few hundred MiB.
    "nccl_buffers": 512 << 20,
    # The caching allocator reserves more than it hands out (block rounding, fragmentation between
    # tensors of different lifetimes): a fraction of the tensor peak.
    "fragmentation_fraction": 0.05,
}


def device_memory_bytes(name: str) -> int:
    """Total memory of a device from DEVICE_MEMORY_MIB, by its short name (`gh200`)."""
    key = name.lower()
    if key not in DEVICE_MEMORY_MIB:
        raise UserError(
            f"unknown device '{name}'; known devices: {', '.join(DEVICE_MEMORY_MIB)} "
            "(or give the memory directly with --memory-gib)"
        )
    return DEVICE_MEMORY_MIB[key] << 20


# --------------------------------------------------------------------------------------------------
# Parameters of the model, by the groups memory cares about
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def meta_parameter_sizes(args_items: tuple) -> tuple[tuple[str, int], ...]:
    """(name, numel) of every parameter of a model built on the meta device: no memory, exact.
    `args_items` is `tuple(dataclasses.asdict(args).items())`, hashable for the cache."""
    with torch.device("meta"):
        model = _Uninitialised(TransformerModelArgs(**dict(args_items)))
    return tuple((name, p.numel()) for name, p in model.named_parameters())


class _Uninitialised(Transformer):
    """The model's exact parameters without its initialisation: normal_() on the meta device goes
    through a slow reference implementation (seconds for 8B) and changes no shape."""

    def init_weights(self) -> None:
        pass


@dataclass(frozen=True)
class ParameterGroups:
    total: int  # every parameter
    matmul: int  # weights of nn.Linear layers (autocast keeps a low-precision copy of each)
    largest_block: int  # the largest transformer block (an FSDP unit)
    root: int  # embeddings, final norm and head: the root FSDP unit
    head: int  # the output projection (vocab x dim)
    largest_tensor: int


def parameter_groups(args: TransformerModelArgs) -> ParameterGroups:
    sizes = meta_parameter_sizes(tuple(dataclasses.asdict(args).items()))
    blocks: dict[str, int] = {}
    root = matmul = head = 0
    for name, numel in sizes:
        if name.startswith("layers."):
            block = name.split(".")[1]
            blocks[block] = blocks.get(block, 0) + numel
        else:
            root += numel
        if name.endswith(("wq.weight", "wk.weight", "wv.weight", "wo.weight", "w1.weight", "w2.weight",
                          "w3.weight", "output.weight")):  # fmt: skip
            matmul += numel
        if name == "output.weight":
            head = numel
    return ParameterGroups(
        total=sum(n for _, n in sizes),
        matmul=matmul,
        largest_block=max(blocks.values(), default=0),
        root=root,
        head=head,
        largest_tensor=max(n for _, n in sizes),
    )


# --------------------------------------------------------------------------------------------------
# The estimate
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bytes:
    """Bytes per element of each kind of tensor under one precision setting."""

    weight: int  # parameters (master weights under AMP)
    grad: int  # gradients (= weight dtype: torch accumulates into the parameter's dtype)
    state: int  # each of AdamW's two moments (= weight dtype)
    compute: int  # matmul inputs/outputs: the autocast dtype, else the weight dtype
    residual: int  # the residual stream and norm outputs: fp32 under AMP (fp32 embeddings + bf16)
    amp: bool


def precision_bytes(precision: str) -> Bytes:
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision.startswith("amp-"):
        return Bytes(weight=4, grad=4, state=4, compute=2, residual=4, amp=True)
    size = 4 if precision == "fp32" else 2
    return Bytes(weight=size, grad=size, state=size, compute=size, residual=size, amp=False)


@dataclass
class MemoryEstimate:
    """Bytes per process of one training step. `peak` is the live tensor bytes at the step's largest
    moment; `total` adds the GPU-only estimates. Activation terms are for the whole local batch."""

    precision: str
    strategy: str
    world_size: int
    batch_size: int
    seq_len: int
    weights: int
    gradients: int  # all gradients at once (the optimizer step holds them)
    optimizer_states: int  # AdamW's exp_avg and exp_avg_sq
    ddp_buckets: int  # DDP's flat gradient buckets (0 with gradient_as_bucket_view: grads are views)
    fsdp_unsharded: int  # FSDP: the root unit plus two gathered blocks (current and prefetched)
    amp_weight_copies: int  # autocast's low-precision copy of every matmul weight, forward to backward
    activations: dict[str, int]  # saved for backward, per component
    loss: int  # the fused head + loss: held gradients and one chunk of logits (or all logits)
    backward_transient: int  # the final norm's backward, on top of every saved activation
    optimizer_step: int  # foreach AdamW: one temporary per parameter; fused: none
    cuda_context: int = 0  # GPU-only estimate
    nccl_buffers: int = 0  # GPU-only estimate
    fragmentation: int = 0  # GPU-only estimate
    phases: dict[str, int] = field(default_factory=dict)

    @property
    def activations_total(self) -> int:
        return sum(self.activations.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def peak(self) -> int:
        return self.phases[self.peak_phase]

    @property
    def total(self) -> int:
        return self.peak + self.cuda_context + self.nccl_buffers + self.fragmentation

    def terms(self) -> list[tuple[str, int, str]]:
        """(name, bytes, note) in display order; the note says what the term is or that it is a guess."""
        rows = [
            ("weights", self.weights, "fp32 master" if self.precision.startswith("amp") else ""),
            ("gradients", self.gradients, ""),
            ("AdamW moments", self.optimizer_states, "exp_avg + exp_avg_sq"),
        ]
        if self.strategy == "ddp":
            rows.append(
                ("DDP buckets", self.ddp_buckets, "the gradients live here" if not self.gradients else "")
            )
        if self.strategy == "fsdp":
            rows.append(("FSDP unsharded params", self.fsdp_unsharded, "root + 2 blocks gathered"))
        if self.amp_weight_copies:
            rows.append(("autocast weight copies", self.amp_weight_copies, ""))
        for name, value in self.activations.items():
            rows.append((f"activations: {name}", value, ""))
        rows += [
            ("loss (head + chunked logits)", self.loss, ""),
            ("backward transients", self.backward_transient, ""),
            ("optimizer step temporaries", self.optimizer_step, ""),
        ]
        for name in ("cuda_context", "nccl_buffers", "fragmentation"):
            if getattr(self, name):
                rows.append((name.replace("_", " "), getattr(self, name), "estimate (GPU only)"))
        return rows

    def summary(self) -> str:
        gib = 2**30
        return (
            f"{self.total / gib:.2f} GiB per process ({self.precision}, {self.strategy} x{self.world_size}, "
            f"batch {self.batch_size} x {self.seq_len}; peak at {self.peak_phase})"
        )


def _activations(args: TransformerModelArgs, b: Bytes, n: int) -> dict[str, int]:
    """Bytes saved for backward by `n` tokens, per component (see the module docstring)."""
    C, F, L = args.dim, args.ffn_hidden_dim, args.n_layers

    def norm(consumers: int) -> int:
        # The input feeds the norm's statistics (RMSNorm upcasts it to fp32 first); RMSNorm also keeps
        # the normalised tensor in the input's dtype. The output is saved once by its consumers, or
        # under autocast once per consumer, each casting it to the compute dtype on its own.
        kept = (4 + b.residual) if args.norm == "rmsnorm" else b.residual
        if consumers == 0:
            out = 0
        elif b.amp:
            out = consumers * b.compute
        else:
            out = b.residual
        return n * C * (kept + out)

    ffn_inputs = 2 if args.mlp == "swiglu" else 1
    norms = L * (norm(3) + norm(ffn_inputs)) + norm(0)  # attention_norm, ffn_norm; the final norm
    if args.norm == "layernorm":
        norms += (2 * L + 1) * n * 8  # mean and rstd in fp32
    # SDPA keeps q, k, v (repeated to all heads), its output and fp32 log-sum-exp. Its output is laid
    # out (B, T, H, hd) in memory, so the head merge is a view and wo keeps that same tensor.
    attention = L * (4 * n * C * b.compute + 4 * n * args.n_heads)
    feed_forward = L * n * F * b.compute * (4 if args.mlp == "swiglu" else 2)
    embeddings = 3 * 8 * n  # int64 tokens and labels, and the indices the embedding keeps
    return dict(attention=attention, feed_forward=feed_forward, norms=norms, embeddings=embeddings)


def estimate_training_memory(
    args: TransformerModelArgs,
    *,
    batch_size: int,
    seq_len: int,
    precision: str = "bf16",
    strategy: str = "single",
    world_size: int = 1,
    loss_chunk: int = 512,
    fused_optimizer: bool = False,
    gradient_as_bucket_view: bool = False,
    device: str = "cuda",
) -> MemoryEstimate:
    """Bytes per process for one training step (forward, backward, clip, AdamW). `batch_size` is per
    process; `device="cpu"` leaves out the GPU-only estimates (for calibration against CPU)."""
    if strategy not in STRATEGIES:
        raise UserError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if batch_size < 1 or seq_len < 1 or world_size < 1 or loss_chunk < 0:
        raise UserError(
            f"need batch_size, seq_len, world_size >= 1 and loss_chunk >= 0 "
            f"(got {batch_size}, {seq_len}, {world_size}, {loss_chunk})"
        )
    if strategy == "single" and world_size != 1:
        raise UserError(f"strategy 'single' runs one process; got world_size={world_size} (use ddp or fsdp)")
    b = precision_bytes(precision)
    groups = parameter_groups(args)
    N, V, C = groups.total, args.vocab_size, args.dim
    n = batch_size * seq_len
    shard = world_size if strategy == "fsdp" else 1

    weights = -(-N * b.weight // shard)
    gradients = -(-N * b.grad // shard)
    states = -(-2 * N * b.state // shard)
    buckets = N * b.grad if strategy == "ddp" else 0
    if strategy == "ddp" and gradient_as_bucket_view:
        # The gradients live in the buckets: one copy, counted as buckets, none as gradients.
        gradients, buckets = 0, N * b.grad
    unsharded = 0
    if strategy == "fsdp" and world_size > 1:
        # The root unit stays gathered from forward to backward; blocks are gathered one at a time,
        # the next one prefetched. Each gather also keeps its shard-sized input buffer.
        gathered = groups.root + 2 * groups.largest_block
        unsharded = gathered * b.weight + -(-gathered * b.weight // world_size)
    amp_copies = groups.matmul * b.compute if b.amp else 0
    acts = _activations(args, b, n)
    act_total = sum(acts.values())

    # The head and the loss. Fused: the input gradient (residual dtype) and the fp32 weight gradient
    # are computed in forward and held until backward; one chunk of fp32 logits is live at a time,
    # next to the previous chunk's (its variables are rebound only when the next chunk is computed).
    # The final norm's output stays alive as the loss's input until forward ends.
    fused = loss_chunk > 0 and precision != "amp-fp16"
    extra_cast = b.compute if b.compute != 4 else 0  # a low-precision copy beside the fp32 one
    final_hidden = n * C * b.residual
    if fused:
        c = min(loss_chunk, n)
        held = n * C * b.residual + 4 * V * C
        weight_cast = V * C * b.compute if b.weight != b.compute else 0
        chunk_logits = c * V * (4 + extra_cast)
        chunk = max(chunk_logits * (2 if n > c else 1), chunk_logits + V * C * (4 + extra_cast))
        loss_forward = final_hidden + held + weight_cast + chunk
        # backward of the loss: dh and the scaled fp32 weight gradient (then cast to the weight dtype)
        loss_backward = held + n * C * b.residual + V * C * (4 + (b.grad if b.grad != 4 else 0))
    else:
        # Plain logits in the compute dtype, their fp32 copy and log_softmax's saved output; backward
        # holds the saved output beside two fp32 gradients of the logits.
        loss_forward = final_hidden + n * V * (extra_cast + 8)
        loss_backward = n * V * 12
    loss = max(loss_forward, loss_backward)

    # Backward of the final norm, the first after the head: the incoming gradient, the gradient of the
    # normalised tensor and (RMSNorm) four fp32 temporaries of its statistics' backward, while every
    # activation of the blocks is still saved and the head's gradient exists.
    norm_fp32_temps = 16 if args.norm == "rmsnorm" else 4
    backward_transient = n * C * (2 * b.residual + norm_fp32_temps)
    # FSDP keeps the root unit's gradients unsharded until the end of backward.
    head_grad = groups.head * b.grad if strategy != "fsdp" else groups.root * b.grad
    opt_step = 0 if fused_optimizer else -(-N * b.state // shard)

    persistent = weights + states + buckets + unsharded
    during_step = persistent + amp_copies + act_total
    phases = {
        "forward": during_step + loss_forward,
        "loss backward": during_step + loss_backward,
        "final-norm backward": during_step + head_grad + backward_transient,
        "optimizer step": persistent - unsharded + gradients + opt_step,
    }
    est = MemoryEstimate(
        precision=precision,
        strategy=strategy,
        world_size=world_size,
        batch_size=batch_size,
        seq_len=seq_len,
        weights=weights,
        gradients=gradients,
        optimizer_states=states,
        ddp_buckets=buckets,
        fsdp_unsharded=unsharded,
        amp_weight_copies=amp_copies,
        activations=acts,
        loss=loss,
        backward_transient=backward_transient,
        optimizer_step=opt_step,
        phases=phases,
    )
    if device != "cpu":
        est.cuda_context = GPU_ONLY_ESTIMATES["cuda_context"]
        est.nccl_buffers = GPU_ONLY_ESTIMATES["nccl_buffers"] if world_size > 1 else 0
        est.fragmentation = int(GPU_ONLY_ESTIMATES["fragmentation_fraction"] * est.peak)
    return est


def estimate_for_config(cfg, *, world_size: int = 1, vocab_size: int | None = None, device: str = "cuda"):
    """The estimate for a `TrainConfig` as `lmtrain train` would run it on `world_size` processes:
    its model, micro-batch, sequence length, precision, strategy, loss chunk and optimizer."""
    from lmtrain.model import model_args_from_config

    vocab = cfg.model.vocab_size or vocab_size
    if vocab is None:
        raise UserError(
            "the memory estimate needs the vocabulary size: set model.vocab_size or pass vocab_size"
        )
    seq_len = cfg.data.sequence_length
    args = model_args_from_config(cfg.model, vocab_size=vocab, seq_len=cfg.model.seq_len or seq_len)
    precision = f"amp-{cfg.precision.amp}" if cfg.precision.amp != "none" else cfg.precision.model_dtype
    return estimate_training_memory(
        args,
        batch_size=cfg.data.batch_size,
        seq_len=seq_len,
        precision=precision,
        strategy=cfg.distributed.strategy if world_size > 1 else "single",
        world_size=world_size,
        loss_chunk=cfg.training.loss_chunk,
        fused_optimizer=cfg.optim.fused,
        gradient_as_bucket_view=DDP_GRADIENT_AS_BUCKET_VIEW,
        device=device,
    )


def largest_batch(args: TransformerModelArgs, memory_bytes: int, *, limit: int = 1 << 16, **kwargs) -> int:
    """The largest per-process batch whose estimate fits `memory_bytes` (0 when not even 1 fits).
    `kwargs` are those of `estimate_training_memory` other than batch_size."""
    fits = lambda batch: estimate_training_memory(args, batch_size=batch, **kwargs).total <= memory_bytes  # noqa: E731
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# --------------------------------------------------------------------------------------------------
# Measurement on CPU: the peak of live tensor bytes of real training steps
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibrationCase:
    """One configuration to measure: a small model trained for a few real steps on CPU."""

    args: TransformerModelArgs
    batch_size: int
    seq_len: int
    precision: str = "fp32"
    strategy: str = "single"
    world_size: int = 1
    loss_chunk: int = 512
    fused_optimizer: bool = False

    def label(self) -> str:
        a = self.args
        model = f"d{a.dim} L{a.n_layers} V{a.vocab_size} {a.mlp}/{a.norm}"
        run = f"B{self.batch_size} T{self.seq_len} {self.precision} {self.strategy}"
        if self.world_size > 1:
            run += f"x{self.world_size}"
        if self.loss_chunk != 512:
            run += f" chunk{self.loss_chunk}"
        return f"{model} {run}" + (" fused-adamw" if self.fused_optimizer else "")

    def estimate(self) -> MemoryEstimate:
        return estimate_training_memory(
            self.args, batch_size=self.batch_size, seq_len=self.seq_len, precision=self.precision,
            strategy=self.strategy, world_size=self.world_size, loss_chunk=self.loss_chunk,
            fused_optimizer=self.fused_optimizer, gradient_as_bucket_view=DDP_GRADIENT_AS_BUCKET_VIEW,
            device="cpu",
        )  # fmt: skip


def peak_allocated_bytes(fn) -> int:
    """Run `fn()` and return the peak of bytes held by tensors it allocated on the CPU, from the
    profiler's allocation events (each carries the allocator's running total). Tensors that existed
    before the call are not counted: the total is taken relative to its value before the first event
    (the running total also carries what earlier profiled code left alive)."""
    import gc

    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    gc.collect()  # a previous model kept alive by reference cycles would free its tensors in the middle
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            fields = node.extra_fields
            events.append((node.start_time_ns, fields.total_allocated, fields.alloc_size))
    if not events:
        return 0
    events.sort()
    baseline = events[0][1] - events[0][2]
    return max(total for _, total, _ in events) - baseline


def _train_steps(case: CalibrationCase, rank: int = 0, steps: int = 2) -> None:
    """Build the model, wrap it, and take `steps` optimizer steps of lmtrain's own training step."""
    from lmtrain.config import DistributedConfig, OptimizerConfig, PrecisionConfig
    from lmtrain.distributed import DistEnv, wrap_model
    from lmtrain.hooks import StepHooks
    from lmtrain.optim import build_optimizer
    from lmtrain.precision import autocast, build_loss_scaler
    from lmtrain.train import train_step

    amp = case.precision.removeprefix("amp-") if case.precision.startswith("amp-") else "none"
    pcfg = PrecisionConfig(model_dtype="fp32" if amp != "none" else case.precision, amp=amp)
    torch.manual_seed(0)
    model = Transformer(case.args).to(dtype=getattr(torch, {"fp32": "float32", "bf16": "bfloat16",
                                                           "fp16": "float16"}[pcfg.model_dtype]))  # fmt: skip
    env = DistEnv(rank=rank, world_size=case.world_size)
    model = wrap_model(model, DistributedConfig(strategy="fsdp" if case.strategy == "fsdp" else "ddp"), env,
                       torch.device("cpu"))  # fmt: skip
    optimizer = build_optimizer(model, OptimizerConfig(fused=case.fused_optimizer), "cpu")
    scaler = build_loss_scaler(pcfg)
    g = torch.Generator().manual_seed(rank)
    shape = (case.batch_size, case.seq_len)
    for _ in range(steps):
        batch = {
            "input_ids": torch.randint(0, case.args.vocab_size, shape, generator=g),
            "labels": torch.randint(0, case.args.vocab_size, shape, generator=g),
        }
        train_step(model, optimizer, scaler, [batch], device=torch.device("cpu"),
                   amp=lambda: autocast(pcfg, "cpu"), max_norm=1.0, hooks=StepHooks(),
                   loss_chunk=case.loss_chunk)  # fmt: skip


# Measurements per distributed case. Under gloo, where FSDP's all-gathers and frees land against the
# compute varies from run to run, and with it the peak of the smallest cases: 30 runs on each rank of
# the 2-rank FSDP case at batch 1 x 32 measured 7.3 to 8.9 MB in 55 of 60 and 9.4 to 9.7 MB in 5. With
# three runs, two of them high sometimes made the median high too; the median of nine is the typical
# peak (its runs take a second or less each).
DISTRIBUTED_REPEATS = 9


def _distributed_worker(rank: int, cases: list[CalibrationCase], port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    world = cases[0].world_size
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    peaks = []
    for case in cases:
        repeats = []
        for _ in range(DISTRIBUTED_REPEATS):  # every rank runs as many, so the collectives pair up
            repeats.append(peak_allocated_bytes(functools.partial(_train_steps, case, rank)))
            dist.barrier()
        peaks.append(sorted(repeats)[len(repeats) // 2])
    gathered = [None] * world
    dist.all_gather_object(gathered, peaks)
    if rank == 0:
        torch.save([max(p[i] for p in gathered) for i in range(len(cases))], out)
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()
    # gloo's threads can abort the interpreter's exit ("terminate called without an active exception",
    # SIGABRT) after a clean run; the measurement is saved, so leave without running C++ destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def measure_training_peak(cases: list[CalibrationCase], progress=None) -> list[int]:
    """Measured peak bytes per process of each case (for DDP/FSDP the largest over ranks of each rank's
    median of DISTRIBUTED_REPEATS runs; the ranks are real gloo processes on this host, spawned once
    per world size). `progress(text)` is called before each measurement."""
    say = progress or (lambda text: None)
    import socket
    import tempfile

    import torch.multiprocessing as mp

    peaks: dict[int, int] = {}
    for i, case in enumerate(cases):
        if case.world_size == 1:
            say(f"measuring {i + 1}/{len(cases)}: {case.label()}")
            peaks[i] = peak_allocated_bytes(functools.partial(_train_steps, case))
    for world in sorted({c.world_size for c in cases if c.world_size > 1}):
        index = [i for i, c in enumerate(cases) if c.world_size == world]
        say(f"measuring {len(index)} configurations on {world} gloo processes")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with tempfile.TemporaryDirectory() as tmp:
            out = f"{tmp}/peaks.pt"
            mp.spawn(
                _distributed_worker, args=([cases[i] for i in index], port, out), nprocs=world, join=True
            )
            for i, peak in zip(index, torch.load(out)):
                peaks[i] = peak
    return [peaks[i] for i in range(len(cases))]


def calibration_cases() -> list[CalibrationCase]:
    """Small models across batch, sequence, precision, loss chunk, optimizer and strategy."""
    llama = TransformerModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512,
                                 multiple_of=64, ffn_dim_multiplier=None, seq_len=256)  # fmt: skip
    gpt = dataclasses.replace(llama, norm="layernorm", mlp="gelu", pos="learned", n_kv_heads=4)
    wide = dataclasses.replace(llama, dim=256, n_layers=4, n_heads=8, vocab_size=2048, multiple_of=256)
    return [
        CalibrationCase(llama, 4, 128, "fp32"),
        CalibrationCase(llama, 8, 256, "bf16"),
        CalibrationCase(llama, 4, 128, "amp-bf16"),
        CalibrationCase(gpt, 4, 256, "fp32", fused_optimizer=True),
        CalibrationCase(wide, 2, 256, "bf16"),
        CalibrationCase(wide, 4, 256, "amp-bf16", fused_optimizer=True),
        CalibrationCase(llama, 1, 64, "fp32"),
        CalibrationCase(llama, 16, 256, "fp32", loss_chunk=128),
        CalibrationCase(llama, 4, 128, "fp32", loss_chunk=0),
        CalibrationCase(llama, 4, 128, "amp-fp16"),
        CalibrationCase(gpt, 8, 128, "bf16"),
        CalibrationCase(llama, 4, 128, "fp32", "ddp", 2),
        CalibrationCase(llama, 4, 128, "bf16", "ddp", 2),
        CalibrationCase(llama, 4, 128, "fp32", "fsdp", 2),
        CalibrationCase(llama, 1, 32, "fp32", "fsdp", 2),
        CalibrationCase(llama, 8, 256, "bf16", "fsdp", 2),
    ]


def calibration_table(cases: list[CalibrationCase], progress=None) -> list[dict]:
    """[{config, measured, estimated, error}] with error = estimated / measured - 1."""
    measured = measure_training_peak(cases, progress)
    rows = []
    for case, peak in zip(cases, measured):
        est = case.estimate()
        rows.append(dict(config=case.label(), measured=peak, estimated=est.peak, phase=est.peak_phase,
                         error=est.peak / peak - 1))  # fmt: skip
    return rows
