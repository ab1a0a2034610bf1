"""Configuration: one small dataclass per component, composed into `TrainConfig`.

Sources, later wins: dataclass defaults < YAML file (which may name a `base:` YAML it extends) <
command line (the course's `train.py` flags, and a dotted override `--section.field=value` for every
field). Each field's docstring is its `--help` text.

    python -m lmtrain.train --config jobs/experiments/smoke.yaml --optim.weight_decay=0.1
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import os
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from lmtrain.atomic import atomic_write_text
from lmtrain.errors import UserError


class ConfigError(UserError):
    """A user mistake in a config file or on the command line; the message says what to do."""


# --------------------------------------------------------------------------------------------------
# Component configs. Each component receives only its own dataclass.
# --------------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    dataset: str = "data/stdlib"
    """Training data: a directory written by `lmtrain prepare` (train.parquet/val.parquet), a parquet
    file with a `text` column, a JSONL file, or a pre-tokenized `.bin` token file."""

    tokenizer: str = ""
    """Tokenizer: `byte`, a Hugging Face hub name, a local directory or tokenizer.json. Empty uses
    the tokenizer saved beside the prepared corpus."""

    sequence_length: int = 4096
    """Tokens per training sample."""

    batch_size: int = 1
    """Samples per micro-batch on each process."""

    pipeline: Literal["packed", "padded"] = "packed"
    """`packed`: documents concatenated with BOS separators and cut into full samples (no padding);
    `padded`: the course's one-document-per-sample pipeline, padded to sequence_length + 1."""

    mask_bos_labels: bool = True
    """Packed pipeline: ignore the loss where the input token is a BOS separator."""

    document_masking: bool = False
    """Packed pipeline: pass document ids so that attention stays inside each document."""

    shuffle: bool = True
    """Shuffle documents each epoch (seeded by training.seed)."""

    interleave: int = 1
    """Packed pipeline, training: read the stream in blocks of this many batches and give each batch rows
    that lie this many samples apart, so that a small batch mixes documents instead of holding B
    consecutive pieces of one (1: rows are consecutive samples)."""

    num_workers: int = 0
    """DataLoader worker processes."""

    def __post_init__(self) -> None:
        _check_min(self, "sequence_length", 2)
        _check_min(self, "batch_size", 1)
        _check_min(self, "num_workers", 0)
        _check_min(self, "interleave", 1)


@dataclass
class ModelConfig:
    preset: str = "llama3-8b"
    """Architecture preset (`lmtrain params --list` shows them); the fields below override it."""

    dim: Optional[int] = None
    """Model width (None: from the preset)."""

    n_layers: Optional[int] = None
    """Number of transformer blocks (None: from the preset)."""

    n_heads: Optional[int] = None
    """Attention heads (None: from the preset)."""

    n_kv_heads: Optional[int] = None
    """Key/value heads for grouped-query attention (None: from the preset)."""

    vocab_size: Optional[int] = None
    """Vocabulary size (None: taken from the tokenizer)."""

    multiple_of: Optional[int] = None
    """SwiGLU hidden size is rounded up to a multiple of this (None: from the preset)."""

    ffn_dim_multiplier: Optional[float] = None
    """Scales the SwiGLU hidden size (None: from the preset)."""

    norm_eps: Optional[float] = None
    """Epsilon of the normalisation layers (None: from the preset)."""

    rope_theta: Optional[float] = None
    """Rotary embedding base (None: from the preset)."""

    seq_len: Optional[int] = None
    """Longest context the model supports (None: data.sequence_length)."""

    norm: Optional[Literal["rmsnorm", "layernorm", "none"]] = None
    """Ablation switch: normalisation layer; `none`: no normalisation at all (None: from the preset)."""

    mlp: Optional[Literal["swiglu", "gelu", "gelu_exact", "silu"]] = None
    """Ablation switch: feed-forward type: gated SwiGLU, or a two-matrix MLP (hidden 4 * dim) with
    GPT-2's tanh GELU, the exact erf GELU, or SiLU (None: from the preset)."""

    pos: Optional[Literal["rope", "learned", "none"]] = None
    """Ablation switch: rotary, learned absolute, or no position information (NoPE: only the causal
    mask tells positions apart) (None: from the preset)."""

    norm_position: Optional[Literal["pre", "post"]] = None
    """Ablation switch: `pre`: x + f(norm(x)) (Llama, GPT-2); `post`: norm(x + f(x)) (the original
    Transformer) (None: pre)."""

    parallel_block: Optional[bool] = None
    """Ablation switch: attention and feed-forward both read the block's input and their outputs are
    added together, x + attn(norm(x)) + ffn(norm(x)) (GPT-J, PaLM) (None: false, sequential)."""

    dropout: Optional[float] = None
    """Ablation switch: dropout probability on the attention weights and on the output of every
    attention and feed-forward branch, in training only (None: 0, off and deterministic)."""

    d_ff: Optional[int] = None
    """Feed-forward hidden size, overriding the rule (4 * dim, or Llama's 8/3 * dim rounded up to
    multiple_of for SwiGLU) (None: the rule)."""

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "seq_len"):
            if getattr(self, name) is not None:
                _check_min(self, name, 1)
        if self.d_ff is not None:
            _check_min(self, "d_ff", 1)
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class OptimizerConfig:
    lr: float = 1e-5
    """Peak learning rate (course flag --learning-rate)."""

    weight_decay: float = 0.1
    """AdamW decoupled weight decay; never applied to norms, biases or embeddings."""

    beta1: float = 0.9
    """AdamW first-moment decay."""

    beta2: float = 0.95
    """AdamW second-moment decay."""

    eps: float = 1e-8
    """AdamW epsilon."""

    fused: bool = False
    """Use the fused AdamW kernel where the device supports it (otherwise foreach)."""

    grad_max_norm: float = 1.0
    """Clip gradients to this global L2 norm (0 disables clipping)."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"optim.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.weight_decay < 0 or self.grad_max_norm < 0 or self.eps <= 0:
            raise ConfigError("optim.weight_decay and optim.grad_max_norm must be >= 0, optim.eps > 0")


@dataclass
class ScheduleConfig:
    name: Literal["cosine", "constant", "wsd"] = "cosine"
    """`cosine`: linear warmup then cosine decay to min_lr_ratio * lr; `constant`: linear warmup then
    constant (the course's schedule); `wsd`: warmup, stable, then linear decay over decay_fraction."""

    warmup_steps: int = 10
    """Linear warmup steps (course flag --lr-warmup-steps)."""

    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak (cosine and wsd)."""

    decay_fraction: float = 0.2
    """wsd: fraction of training spent in the final decay."""

    def __post_init__(self) -> None:
        _check_min(self, "warmup_steps", 0)
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"schedule.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"schedule.decay_fraction must be in (0, 1], got {self.decay_fraction}")


@dataclass
class PrecisionConfig:
    model_dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    """dtype of parameters, gradients and optimizer states (the course keeps all three in bf16)."""

    amp: Literal["none", "bf16", "fp16"] = "none"
    """Autocast dtype with fp32 master weights (requires model_dtype fp32)."""

    loss_scaler: Literal["dynamic", "static", "none"] = "dynamic"
    """Loss scaling used with fp16: dynamic (backs off on inf/NaN), static, or none."""

    init_scale: float = 65536.0
    """Initial (dynamic) or fixed (static) loss scale."""

    growth_factor: float = 2.0
    """Dynamic scaler: multiply the scale by this after growth_interval clean steps."""

    backoff_factor: float = 0.5
    """Dynamic scaler: multiply the scale by this after a step with inf/NaN gradients."""

    growth_interval: int = 2000
    """Dynamic scaler: clean steps before the scale grows."""

    def __post_init__(self) -> None:
        if self.amp != "none" and self.model_dtype != "fp32":
            raise ConfigError(
                f"precision.amp={self.amp} needs fp32 master weights: set precision.model_dtype=fp32 "
                f"(got {self.model_dtype})"
            )
        if not self.init_scale > 0 or not self.growth_factor > 1 or not 0 < self.backoff_factor < 1:
            raise ConfigError("precision: need init_scale > 0, growth_factor > 1, 0 < backoff_factor < 1")
        _check_min(self, "growth_interval", 1)


@dataclass
class CheckpointConfig:
    interval: int = 0
    """Save every N steps (0: only at the end and when a signal asks for it)."""

    keep_last: int = 3
    """Number of most recent checkpoints to keep."""

    resume: str = "none"
    """`none`, `auto` (newest valid checkpoint in the run directory) or a checkpoint path."""

    signals: str = "SIGUSR1,SIGUSR2,SIGTERM"
    """Signals that make the loop save at the next step boundary and exit for requeue."""

    allow_batch_change: bool = False
    """Resume a checkpoint written with another data.batch_size, data.sequence_length or
    training.grad_accumulation_steps (tokens per step and the data order change from there on)."""

    def __post_init__(self) -> None:
        _check_min(self, "interval", 0)
        _check_min(self, "keep_last", 1)


@dataclass
class LoggingConfig:
    frequency: int = 5
    """Log metrics every N steps (course flag --logging-frequency)."""

    tensorboard: bool = False
    """Also write TensorBoard scalars (needs the tensorboard package)."""

    wandb: bool = False
    """Also log to Weights & Biases in offline mode (needs the wandb package)."""

    peak_tflops: Optional[float] = None
    """Peak TFLOP/s for MFU; None: the GPU peak table, on CPU a matmul peak measured once per machine and
    cached (see lmtrain.metrics), on an unknown GPU a matmul timed at start-up."""

    progress: bool = True
    """Show a progress bar with ETA on an interactive terminal."""

    def __post_init__(self) -> None:
        _check_min(self, "frequency", 1)


@dataclass
class ProfilingConfig:
    profile: bool = False
    """Open an Nsight Systems capture range (cudaProfilerStart/Stop) over the profile window."""

    profile_step_start: int = 10
    """First step of the profile window."""

    profile_step_end: int = 12
    """Last step of the profile window."""

    emit_nvtx: bool = False
    """Inside the window, emit an NVTX range per autograd op with input shapes."""

    nvtx: bool = False
    """NVTX ranges around step, forward, backward, optimizer and inside each block."""

    torch_profile: bool = False
    """Run torch.profiler over the window: Chrome trace and a summary table in the run directory."""

    def __post_init__(self) -> None:
        if self.profile_step_end < self.profile_step_start:
            raise ConfigError(
                f"profiling.profile_step_end ({self.profile_step_end}) is before "
                f"profiling.profile_step_start ({self.profile_step_start})"
            )


@dataclass
class DistributedConfig:
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """How to spread the model over more than one process."""

    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Process-group backend; auto is NCCL on CUDA and gloo on CPU."""


@dataclass
class TrainingConfig:
    steps: int = 1000
    """Optimizer steps (course flag --training-steps)."""

    grad_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""

    seed: int = 42
    """Seed for python, numpy, torch and the data order."""

    device: str = "auto"
    """`auto` (CUDA when present, else CPU), `cpu`, `cuda` or `cuda:N`."""

    compile: bool = False
    """torch.compile(model, fullgraph=True) before wrapping for data parallelism."""

    loss_chunk: int = 512
    """Tokens per chunk of the fused output projection + cross-entropy, which computes the loss and its
    gradient chunk by chunk and never holds all (tokens x vocab) logits (4.2 GB in fp32 for 8192 tokens
    of Llama-3's vocabulary); 0: plain logits, then F.cross_entropy."""

    eval_interval: int = 0
    """Evaluate on the validation split every N steps (0: only at the end)."""

    eval_batches: int = 20
    """Validation batches per evaluation."""

    max_bad_steps: int = 5
    """Stop after this many consecutive steps with a non-finite loss."""

    run_dir: str = "runs"
    """Directory under which each run gets `<name>-<timestamp>/`."""

    name: str = "run"
    """Run name, the prefix of the run directory."""

    output_dir: str = ""
    """Exact run directory (empty: `<run_dir>/<name>-<timestamp>`). Launchers set it so that a
    requeued job resumes in place."""

    overwrite_output_dir: bool = False
    """Start a new run in an output_dir that already holds one, deleting that run's checkpoints,
    metrics, summary, config and tokenizer first. Without it such a run is refused (resume it with
    --checkpoint.resume auto instead)."""

    def __post_init__(self) -> None:
        _check_min(self, "steps", 1)
        _check_min(self, "grad_accumulation_steps", 1)
        _check_min(self, "eval_interval", 0)
        _check_min(self, "eval_batches", 1)
        _check_min(self, "max_bad_steps", 1)
        _check_min(self, "loss_chunk", 0)


@dataclass
class TrainConfig:
    """The whole training job: one section per component."""

    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


# The course's train.py flags, unchanged, and the field each one sets.
COURSE_FLAGS: dict[str, str] = {
    "--dataset": "data.dataset",
    "--tokenizer-name-or-path": "data.tokenizer",
    "--sequence-length": "data.sequence_length",
    "--batch-size": "data.batch_size",
    "--fused-optimizer": "optim.fused",
    "--learning-rate": "optim.lr",
    "--lr-warmup-steps": "schedule.warmup_steps",
    "--training-steps": "training.steps",
    "--logging-frequency": "logging.frequency",
    "--profile": "profiling.profile",
    "--profile-step-start": "profiling.profile_step_start",
    "--profile-step-end": "profiling.profile_step_end",
    "--grad-max-norm": "optim.grad_max_norm",
    "--model-dtype": "precision.model_dtype",
    "--compile": "training.compile",
}


# --------------------------------------------------------------------------------------------------
# Introspection helpers
# --------------------------------------------------------------------------------------------------


def _check_min(obj: Any, name: str, minimum: int) -> None:
    value = getattr(obj, name)
    if value < minimum:
        section = _SECTION_OF.get(type(obj).__name__, type(obj).__name__)
        raise ConfigError(f"{section}.{name} must be >= {minimum}, got {value}")


_SECTION_OF = {
    f.type if isinstance(f.type, str) else f.type.__name__: f.name for f in dataclasses.fields(TrainConfig)
}


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (Python does not keep them at runtime)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def sections() -> dict[str, type]:
    """Section name -> component dataclass, in TrainConfig order."""
    hints = _field_types(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig)}


def all_keys() -> list[str]:
    """Every dotted key `section.field` that a config may set."""
    return [f"{s}.{f.name}" for s, cls in sections().items() for f in dataclasses.fields(cls)]


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = " | ".join(type_name(a) for a in args)
        return f"{inner} | null" if len(args) < len(typing.get_args(tp)) else inner
    return getattr(tp, "__name__", str(tp))


def suggest(name: str, candidates: list[str]) -> str:
    """`did you mean ...?` text for an unknown name, or a hint to list the valid ones."""
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    if not close:
        # Try matching the last component alone (`weight_decay` -> `optim.weight_decay`).
        tail = name.rsplit(".", 1)[-1].replace("-", "_")
        close = [c for c in candidates if c.rsplit(".", 1)[-1] == tail][:3]
    if close:
        return "did you mean " + " or ".join(f"'{c}'" for c in close) + "?"
    return "run with --help to list the valid names"


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Convert `value` (from YAML or the command line) to the field type `tp`, or raise ConfigError."""

    def fail() -> ConfigError:
        return ConfigError(f"{source}: {key} = {value!r} is not a valid {type_name(tp)}")

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if any(typing.get_origin(a) is Literal and value in typing.get_args(a) for a in args):
            return value  # a choice spelled `none` (model.norm=none) is that choice, not null
        if type(None) in args and (
            value is None or (isinstance(value, str) and value.lower() in ("none", "null", ""))
        ):
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key, source)
            except ConfigError:
                continue
        raise fail()
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise ConfigError(f"{source}: {key} = {value!r} is not one of: {', '.join(map(str, choices))}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise fail()
    if tp is int:
        if isinstance(value, bool):
            raise fail()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:  # `1e3` is a valid way to write a step count
                    as_float = float(value)
                except ValueError:
                    raise fail() from None
                if as_float.is_integer():
                    return int(as_float)
        raise fail()
    if tp is float:
        if isinstance(value, bool):
            raise fail()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `5e-5` as a string
            try:
                return float(value)
            except ValueError:
                raise fail() from None
        raise fail()
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise fail()
    raise AssertionError(f"unsupported config field type {tp!r} for {key}")


# --------------------------------------------------------------------------------------------------
# YAML files: `base:` inheritance, merging, errors with file and line
# --------------------------------------------------------------------------------------------------


def read_yaml(path: str | os.PathLike) -> dict:
    """Read one YAML mapping; syntax errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}"
        )
    return data


def deep_merge(base: dict, override: dict) -> dict:
    """Merge two nested dicts; values from `override` win, mappings merge key by key."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml_with_bases(path: str | os.PathLike, _chain: tuple[Path, ...] = ()) -> dict:
    """Read a YAML file and the chain of `base:` files it extends (paths relative to the file)."""
    path = Path(path).resolve()
    if path in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path))
        raise ConfigError(f"`base:` inheritance cycle: {cycle}")
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    bases = base if isinstance(base, list) else [base]
    merged: dict = {}
    for b in bases:
        if not isinstance(b, str):
            raise ConfigError(f"{path}: `base:` must be a path or a list of paths, got {b!r}")
        merged = deep_merge(merged, load_yaml_with_bases(path.parent / b, (*_chain, path)))
    return deep_merge(merged, data)


# --------------------------------------------------------------------------------------------------
# dict <-> TrainConfig
# --------------------------------------------------------------------------------------------------


def config_from_dict(data: dict, source: str = "config") -> TrainConfig:
    """Build a validated TrainConfig from nested `{section: {field: value}}`; unknown keys are errors."""
    secs = sections()
    kwargs: dict[str, Any] = {}
    for name, values in data.items():
        if name not in secs:
            raise ConfigError(f"{source}: unknown section '{name}': {suggest(name, list(secs))}")
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{name}' must be a mapping, got {values!r}")
        cls = secs[name]
        hints = _field_types(cls)
        known = [f.name for f in dataclasses.fields(cls)]
        fields_: dict[str, Any] = {}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(
                    f"{source}: unknown key '{name}.{key}': {suggest(f'{name}.{key}', all_keys())}"
                )
            fields_[key] = coerce(value, hints[key], f"{name}.{key}", source)
        try:
            kwargs[name] = cls(**fields_)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    return TrainConfig(**kwargs)


def flatten_keys(data: dict, prefix: str = "") -> dict[str, Any]:
    """`{"optim": {"lr": 1e-3}}` -> `{"optim.lr": 1e-3}`: the dotted keys the command line uses."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically); it re-runs unchanged with `--config`."""
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def load_config(path: str | os.PathLike) -> TrainConfig:
    return config_from_dict(load_yaml_with_bases(path), source=str(path))


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _flag_names() -> dict[str, str]:
    """Every accepted flag -> the dotted key it sets (course flags and `--section.field`)."""
    names = {f"--{key}": key for key in all_keys()}
    names.update(COURSE_FLAGS)
    return names


def build_parser(prog: str = "lmtrain train", description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser whose --help documents every config field from its docstring."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description or "Train a decoder-only language model.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
        epilog=(
            "Precedence: defaults < --config YAML (may extend a `base:` YAML) < command line.\n"
            "Every field also accepts --section.field=value; the course's train.py flags are aliases."
        ),
    )
    parser.add_argument(
        "--config", metavar="YAML", help="YAML config file (its `base:` files are applied first)"
    )
    aliases: dict[str, list[str]] = {}
    for flag, key in COURSE_FLAGS.items():
        aliases.setdefault(key, []).append(flag)
    for section, cls in sections().items():
        group = parser.add_argument_group(section)
        hints = _field_types(cls)
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            tp = hints[f.name]
            default = f.default if f.default is not dataclasses.MISSING else None
            help_text = f"{docs.get(f.name, '')} [{type_name(tp)}; default: {default}]"
            flags = [*aliases.get(key, []), f"--{key}"]
            kwargs: dict[str, Any] = dict(dest=key, default=argparse.SUPPRESS, help=help_text)
            if tp is bool:
                # `--fused-optimizer` alone means true, as in the course; `--optim.fused=false` also works.
                kwargs.update(nargs="?", const="true", metavar="BOOL")
            else:
                kwargs.update(metavar="VALUE")
            group.add_argument(*flags, **kwargs)
    return parser


def parse_args(
    argv: list[str] | None = None, prog: str = "lmtrain train"
) -> tuple[TrainConfig, argparse.Namespace]:
    """Resolve a TrainConfig from defaults, an optional --config YAML and the command line."""
    parser = build_parser(prog)
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        flags = list(_flag_names())
        messages = []
        for token in unknown:
            if token.startswith("-"):
                name = token.split("=", 1)[0]
                messages.append(f"unknown flag '{name}': {suggest(name, flags)}")
            else:
                messages.append(f"unexpected argument '{token}'")
        raise ConfigError("; ".join(messages))
    data: dict = load_yaml_with_bases(ns.config) if getattr(ns, "config", None) else {}
    source = ns.config if getattr(ns, "config", None) else "defaults"
    # Validate the file alone first so its errors name the file.
    config_from_dict(data, source=source)
    for key, value in vars(ns).items():
        if "." not in key:
            continue
        section, name = key.split(".", 1)
        data.setdefault(section, {})
        if data[section] is None:
            data[section] = {}
        data[section][name] = value
    return config_from_dict(data, source="command line"), ns
