"""Command-line parsers of the commands whose modules import torch, kept in a torch-free module.

    python -c "from lmtrain.arguments import generate_parser; generate_parser().print_help()"

`lmtrain generate --help` (and `params`, `export-hf`) prints from here without importing torch, so help
answers at once; the commands themselves parse their arguments with the same parsers.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any


class ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, except the non-values (None, False, '') that say "not set"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, ""):
            return action.help or ""
        return super()._get_help_string(action)


def _new(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser whose --help shows every default."""
    return argparse.ArgumentParser(
        prog=prog, description=description, allow_abbrev=False, formatter_class=ShowDefaults
    )


def _add_step(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--step", type=int, default=None, help="the checkpoint of this step (default: the newest readable)"
    )


def generate_parser(prog: str = "lmtrain generate") -> argparse.ArgumentParser:
    p = _new(prog, "Sample text from a run's latest checkpoint, with a key/value cache.")
    p.add_argument("--run", required=True, help="run directory (with checkpoints/ and tokenizer/)")
    p.add_argument("--prompt", default="", help="text to continue (empty: the start of a document)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens only")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the smallest set of mass p")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence for every token")
    _add_step(p)
    return p


def export_hf_parser(prog: str = "lmtrain export-hf") -> argparse.ArgumentParser:
    p = _new(prog, "Export a run's latest checkpoint as a transformers LlamaForCausalLM directory.")
    p.add_argument("--run", required=True, help="run directory (with checkpoints/ and tokenizer/)")
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="dtype of the saved weights")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out directory")
    _add_step(p)
    return p


def params_overrides() -> list[dataclasses.Field]:
    """ModelConfig fields that `lmtrain params` accepts as overrides of the preset."""
    from lmtrain.config import ModelConfig

    return [f for f in dataclasses.fields(ModelConfig) if f.name not in ("preset", "vocab_size", "seq_len")]


# The vocabulary a preset is usually trained with, when --vocab-size is not given.
NATIVE_VOCAB = {"llama3-8b": 128256, "gpt2-small": 50257, "gpt2-medium": 50257, "gpt2-large": 50257,
                "gpt2-xl": 50257}  # fmt: skip
DEFAULT_VOCAB = 128256


def _bool(text: str) -> bool:
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


def _override_type(f: dataclasses.Field) -> dict[str, Any]:
    """argparse keywords for a ModelConfig field, from its annotation (Optional[int], Literal[...])."""
    from lmtrain.config import ModelConfig

    hint = typing.get_type_hints(ModelConfig)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    inner = args[0]
    if typing.get_origin(inner) is typing.Literal:
        return dict(choices=typing.get_args(inner))
    if inner is bool:
        return dict(type=_bool, metavar="BOOL")
    return dict(type=inner if inner in (int, float, str) else str)


def _csv(kind):
    def parse(text: str):
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError("expected at least one value")
        return values

    return parse


class _DefaultsFormatter(argparse.HelpFormatter):
    """Shows a flag's default after its help, unless there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def params_parser(prog: str = "lmtrain params") -> argparse.ArgumentParser:
    from lmtrain.config import TrainingConfig
    from lmtrain.hardware import DEVICE_MEMORY_MIB, PRECISIONS, STRATEGIES

    parser = argparse.ArgumentParser(
        prog=prog,
        description="Exact parameter count, training FLOPs per token (per matmul and per part), training "
        "memory per GPU, the largest batch that fits a device, AdamW FLOPs and the wall-clock time of a "
        "run. Give --presets or --sweep-seq for one table across model sizes or context lengths.",
        formatter_class=_DefaultsFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--preset", default="llama3-8b", help="a model preset (`--list` shows them all)")
    parser.add_argument("--vocab-size", type=int, help="vocabulary size (default: the preset's own, "
                        f"{', '.join(f'{k} {v}' for k, v in NATIVE_VOCAB.items())}; else {DEFAULT_VOCAB})")  # fmt: skip
    parser.add_argument("--seq-len", type=int, default=2048, help="sequence length T")
    parser.add_argument("--list", action="store_true", help="list the presets and exit")
    g = parser.add_argument_group("tables across sizes or context lengths")
    g.add_argument(
        "--presets", type=_csv(str), help="comma-separated presets, e.g. gpt2-small,gpt2-xl,llama3-8b"
    )
    g.add_argument(
        "--sweep-seq", type=_csv(int), help="comma-separated sequence lengths, e.g. 1024,4096,16384"
    )
    m = parser.add_argument_group("training memory")
    m.add_argument("--batch-size", type=int, default=1, help="sequences per GPU (micro-batch)")
    m.add_argument("--precision", default="bf16", choices=PRECISIONS,
                   help="bf16/fp32/fp16: weights, gradients and AdamW moments in that dtype; amp-*: fp32 "
                   "master weights with autocast")  # fmt: skip
    m.add_argument("--strategy", default="single", choices=STRATEGIES, help="single process, DDP or FSDP2")
    m.add_argument("--gpus", type=int, default=1, help="data-parallel processes (one per GPU)")
    m.add_argument("--loss-chunk", type=int, default=TrainingConfig.loss_chunk,
                   help="tokens per chunk of the fused head + loss (0: plain logits)")  # fmt: skip
    m.add_argument("--fused-optimizer", action="store_true", help="fused AdamW (no per-parameter temporary)")
    m.add_argument(
        "--gradient-as-bucket-view", action="store_true", help="DDP: gradients live in the buckets"
    )
    m.add_argument(
        "--device", help=f"device whose memory and peak to plan for: {', '.join(DEVICE_MEMORY_MIB)}"
    )
    m.add_argument("--memory-gib", type=float, help="device memory in GiB (overrides --device's)")
    t = parser.add_argument_group("wall-clock estimate (tokens = steps x batch size x seq len x gpus)")
    t.add_argument("--tokens", type=float, help="training tokens, e.g. 15e12")
    t.add_argument("--steps", type=int, help="optimizer steps (with --batch-size, --seq-len, --gpus)")
    t.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation, 0..1")
    t.add_argument("--peak-tflops", type=float, help="peak TFLOP/s per GPU (default: --device's, bf16)")
    o = parser.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    o.add_argument("--markdown", action="store_true", help="print markdown tables instead of rich ones")
    o.add_argument(
        "--plot",
        metavar="PNG",
        help="with --presets or --sweep-seq: also draw the FLOPs shares as stacked bars",
    )
    o.add_argument("--calibrate", action="store_true",
                   help="measure the peak memory of real CPU training steps of small models (single process "
                   "and 2-rank gloo DDP/FSDP) against the estimate, and print the table (about a minute)")  # fmt: skip
    overrides = parser.add_argument_group("model fields (override the preset)")
    for f in params_overrides():
        overrides.add_argument(
            "--" + f.name.replace("_", "-"), help="override the preset", **_override_type(f)
        )
    return parser
