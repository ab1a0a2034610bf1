"""Does a job fit in its GPUs' memory? The per-GPU estimate of `lmtrain.memory` next to the device memory
of the cluster profile, the data-parallel strategy that fits, and the change that would make a job fit.

    python -m jobs.submit --exp fused --cluster clariden --dry-run --account ACCOUNT job.gpus=4

The estimate is `lmtrain.memory.estimate_for_config` (calibrated within 15% of measured CPU peaks;
its CUDA context, NCCL buffer and fragmentation terms are estimates for GPUs only, not measured here).
A model whose vocabulary comes from a tokenizer only the job loads is estimated with the course
tokenizer's 131072 entries.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from jobs.spec import ClusterProfile, JobPlan
from lmtrain.config import TrainConfig
from lmtrain.memory import MemoryEstimate, estimate_for_config

COURSE_VOCAB_SIZE = 131072
# DDP is chosen only where its estimate, 15% larger (the estimator's calibration tolerance), still fits:
# otherwise FSDP2, whose shards leave room to spare.
DDP_FIT_MARGIN = 1.15
GIB = 2**30


def estimate(train: TrainConfig, world_size: int, strategy: str, **changes) -> MemoryEstimate:
    """Per-GPU bytes of `train` run by `world_size` processes with `strategy` (ddp, fsdp; one process is
    always single); `changes` replace data.batch_size or data.sequence_length."""
    data = dataclasses.replace(train.data, **changes)
    cfg = dataclasses.replace(with_strategy(train, strategy), data=data)
    return estimate_for_config(cfg, world_size=world_size, vocab_size=COURSE_VOCAB_SIZE)


def device_bytes(cluster: ClusterProfile, plan: JobPlan) -> int | None:
    """One GPU's memory from the profile; None where the job has no GPU or the profile does not say."""
    if not plan.gpus_per_node or not cluster.gpu_mem_mb:
        return None
    return cluster.gpu_mem_mb * 2**20


def choose_strategy(train: TrainConfig, cluster: ClusterProfile, plan: JobPlan) -> tuple[str, str] | None:
    """(strategy, why) for a multi-process GPU job: DDP (gradients as views of its buckets) where its
    estimate with DDP_FIT_MARGIN fits the GPU, else FSDP2. None where there is nothing to choose."""
    device = device_bytes(cluster, plan)
    if plan.world_size <= 1 or device is None:
        return None
    ddp = estimate(train, plan.world_size, "ddp").total
    why = (
        f"DDP needs ~{ddp / GIB:.1f} GiB per GPU, x{DDP_FIT_MARGIN} = {ddp * DDP_FIT_MARGIN / GIB:.1f} GiB "
        f"{'<=' if ddp * DDP_FIT_MARGIN <= device else '>'} {device / GIB:.1f} GiB of one GPU"
    )
    return ("ddp" if ddp * DDP_FIT_MARGIN <= device else "fsdp"), why


@dataclass
class MemoryFit:
    estimate: MemoryEstimate
    device: int  # bytes of one GPU
    suggestion: str | None  # what would fit, when it does not

    @property
    def fits(self) -> bool:
        return self.estimate.total <= self.device

    def line(self) -> str:
        e = self.estimate
        verdict = "fits" if self.fits else "does NOT fit"
        return (
            f"memory per GPU: ~{e.total / GIB:.1f} GiB estimated ({e.strategy} x{e.world_size}, {e.precision}, "
            f"batch {e.batch_size} x {e.seq_len}) of {self.device / GIB:.1f} GiB: {verdict}"
        )


def check_fit(train: TrainConfig, cluster: ClusterProfile, plan: JobPlan) -> MemoryFit | None:
    """The per-GPU estimate against the device; for a job that does not fit, the change that would."""
    device = device_bytes(cluster, plan)
    if device is None:
        return None
    est = estimate(train, plan.world_size, train.distributed.strategy)
    fit = MemoryFit(est, device, None)
    if not fit.fits:
        fit.suggestion = suggest_fit(train, plan, device)
    return fit


def suggest_fit(train: TrainConfig, plan: JobPlan, device: int) -> str:
    """Changes that make the job fit, cheapest first: FSDP over the same GPUs (or four), a smaller batch,
    a shorter sequence."""
    out = []
    if plan.world_size > 1 and train.distributed.strategy != "fsdp":
        if estimate(train, plan.world_size, "fsdp").total <= device:
            out.append("distributed.strategy=fsdp")
    elif plan.world_size == 1 and estimate(train, 4, "fsdp").total <= device:
        out.append("job.gpus=4 (FSDP2 shards the model over them)")
    strategy = train.distributed.strategy

    def fits(**change) -> bool:
        return estimate(train, plan.world_size, strategy, **change).total <= device

    low, high = 0, train.data.batch_size - 1  # the largest batch that fits, by bisection
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(batch_size=mid) else (low, mid - 1)
    if low >= 1:
        out.append(f"data.batch_size={low}")
    shorter = train.data.sequence_length // 2
    while shorter >= 128 and not fits(sequence_length=shorter):
        shorter //= 2
    if shorter >= 128:
        out.append(f"data.sequence_length={shorter}")
    return " or ".join(out) if out else "a smaller model (model.preset) or more GPUs with FSDP"


def memory_rows(fit: MemoryFit) -> list[tuple[str, str, str]]:
    """(term, GiB, note) rows of the estimate, then the total and the device."""
    rows = [(name, f"{value / GIB:.2f}", note) for name, value, note in fit.estimate.terms() if value]
    rows.append(("total (estimate)", f"{fit.estimate.total / GIB:.2f}", f"peak at {fit.estimate.peak_phase}"))
    rows.append(
        ("one GPU (cluster profile)", f"{fit.device / GIB:.2f}", "fits" if fit.fits else "does NOT fit")
    )
    return rows


def with_strategy(train: TrainConfig, strategy: str) -> TrainConfig:
    return dataclasses.replace(train, distributed=dataclasses.replace(train.distributed, strategy=strategy))
