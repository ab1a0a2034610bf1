"""One code path for 1 to N processes: torchrun or Slurm (`srun`, one task per GPU) environments,
NCCL on CUDA and gloo on CPU, DDP or FSDP2 (`fully_shard`).

    srun --ntasks-per-node=4 --gpus-per-task=1 python -m lmtrain.train --config my.yaml

Rank, world size and local rank come from torchrun's RANK/WORLD_SIZE/LOCAL_RANK, else from Slurm's
SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID with MASTER_ADDR the first host of SLURM_NODELIST (or
SLURM_JOB_NODELIST) and MASTER_PORT a port derived from the job id unless set.
"""

from __future__ import annotations

import datetime
import os
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lmtrain.config import DistributedConfig
from lmtrain.errors import UserError

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list: `nid[001-003,007],login1` -> nid001 nid002 nid003 nid007 login1."""
    hosts: list[str] = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]*)\])?([^,\[]*)", nodelist):
        prefix, ranges, suffix = m.group(1), m.group(2), m.group(3)
        if not prefix and not ranges:
            continue
        if ranges is None:
            hosts.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            if "-" in part:
                lo, hi = part.split("-", 1)
                width = len(lo)
                hosts.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(f"{prefix}{part}{suffix}")
    return hosts


def first_host(nodelist: str) -> str:
    """First host of a Slurm node list, via `scontrol show hostnames` when available."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10
        )
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    hosts = expand_nodelist(nodelist)
    if not hosts:
        raise UserError(f"cannot parse SLURM_NODELIST={nodelist!r}; set MASTER_ADDR explicitly")
    return hosts[0]


def _int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise UserError(f"environment variable {name}={environ[name]!r} must be an integer") from None


def detect_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Where this process sits in the job, from torchrun or Slurm variables (single process otherwise)."""
    env = os.environ if environ is None else environ
    port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else None
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, or a launcher that exported them
        return DistEnv(
            rank=_int(env, "RANK"),
            world_size=_int(env, "WORLD_SIZE"),
            local_rank=_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=port or DEFAULT_PORT,
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and _int(env, "SLURM_NTASKS") > 1:
        addr = env.get("MASTER_ADDR")
        if not addr:
            nodelist = (
                env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            )
            addr = first_host(nodelist) if nodelist else "127.0.0.1"
        if port is None:
            # A port per job so that two jobs sharing a node do not collide.
            job = env.get("SLURM_JOB_ID", "0")
            port = DEFAULT_PORT + (int(job) % 10000 if job.isdigit() else 0)
        return DistEnv(
            rank=_int(env, "SLURM_PROCID"),
            world_size=_int(env, "SLURM_NTASKS"),
            local_rank=_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            master_addr=addr,
            master_port=port,
        )
    return DistEnv()


def resolve_device(name: str, env: DistEnv) -> torch.device:
    """`auto`: this process's GPU (by local rank) when CUDA is present, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(
                f"training.device={name} but CUDA is not available; use training.device=cpu or auto"
            )
        if name == "cuda":
            return torch.device("cuda", env.local_rank % torch.cuda.device_count())
        return torch.device(name)
    if name != "cpu":
        raise UserError(f"training.device={name!r}: expected auto, cpu, cuda or cuda:N")
    return torch.device("cpu")


def init_distributed(cfg: DistributedConfig, device: torch.device, env: DistEnv) -> None:
    """Create the default process group when the job has more than one process."""
    if not env.distributed or dist.is_initialized():
        return
    backend = cfg.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise UserError("distributed.backend=nccl needs CUDA devices; use gloo (or auto) on CPU")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(minutes=10),
        device_id=device if backend == "nccl" else None,
    )


# DDP's gradients are views into its all-reduce buckets instead of a second full-size copy (lmtrain.memory
# counts them that way).
DDP_GRADIENT_AS_BUCKET_VIEW = True


def wrap_model(model: nn.Module, cfg: DistributedConfig, env: DistEnv, device: torch.device) -> nn.Module:
    """DDP or FSDP2 for more than one process; the model unchanged for one."""
    if not env.distributed:
        return model
    if cfg.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        device_ids = [device.index] if device.type == "cuda" else None
        return DDP(model, device_ids=device_ids, gradient_as_bucket_view=DDP_GRADIENT_AS_BUCKET_VIEW)
    from torch.distributed.fsdp import fully_shard

    # Shard each transformer block separately, then the rest (embeddings, norm, head) at the root.
    blocks = getattr(model, "layers", None) or getattr(getattr(model, "_orig_mod", None), "layers", None)
    if blocks is not None:
        for block in blocks.values() if isinstance(blocks, nn.ModuleDict) else blocks:
            fully_shard(block)
    fully_shard(model)
    return model


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full (unsharded) optimizer state dict into a plain, DDP or FSDP2 model's optimizer.

    torch's `set_optimizer_state_dict` rebuilds the param groups from flattened lists, so a tuple such
    as AdamW's `betas` comes back as a list; the types the optimizer was built with are put back so
    that the restored optimizer equals the saved one.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    built = [{k: type(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    for group, types in zip(optimizer.param_groups, built):
        for key, kind in types.items():
            if kind is tuple and isinstance(group.get(key), list):
                group[key] = tuple(group[key])


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj):
    """rank 0's python object on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cleanup(synchronize: bool = False) -> None:
    """Destroy the process group; with `synchronize`, after a barrier, so that no rank tears its
    connections down while another still has collectives in flight (gloo then aborts the process with
    "terminate called without an active exception")."""
    if dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()
