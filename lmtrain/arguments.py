"""Command-line parsers of the commands whose modules import torch, kept in a torch-free module.

    python -c "from lmtrain.arguments import generate_parser; generate_parser().print_help()"

`lmtrain generate --help` (and `params`, `export-hf`) prints from here without importing torch, so help
answers at once; the commands themselves parse their arguments with the same parsers.
"""

from __future__ import annotations

import argparse
import dataclasses


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
    return p


def export_hf_parser(prog: str = "lmtrain export-hf") -> argparse.ArgumentParser:
    p = _new(prog, "Export a run's latest checkpoint as a transformers LlamaForCausalLM directory.")
    p.add_argument("--run", required=True, help="run directory (with checkpoints/ and tokenizer/)")
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="dtype of the saved weights")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out directory")
    return p


# ModelConfig fields that `lmtrain params` accepts as overrides of the preset.
PARAMS_CHOICES = {"norm": ("rmsnorm", "layernorm"), "mlp": ("swiglu", "gelu"), "pos": ("rope", "learned")}
PARAMS_TYPES = {"multiple_of": int, "ffn_dim_multiplier": float, "norm_eps": float, "rope_theta": float}


def params_overrides() -> list[dataclasses.Field]:
    from lmtrain.config import ModelConfig

    return [f for f in dataclasses.fields(ModelConfig) if f.name not in ("preset", "vocab_size", "seq_len")]


def params_parser(prog: str = "lmtrain params") -> argparse.ArgumentParser:
    p = _new(prog, "Exact parameter count, training FLOPs per token and memory estimate of a model.")
    p.add_argument("--preset", default="llama3-8b", help="a model preset (`--list` shows them all)")
    p.add_argument("--vocab-size", type=int, default=128256, help="vocabulary size")
    p.add_argument("--seq-len", type=int, default=2048, help="sequence length T")
    p.add_argument("--list", action="store_true", help="list the presets and exit")
    for f in params_overrides():
        flag = "--" + f.name.replace("_", "-")
        if f.name in PARAMS_CHOICES:
            p.add_argument(flag, choices=PARAMS_CHOICES[f.name], help="override the preset's value")
        else:
            p.add_argument(flag, type=PARAMS_TYPES.get(f.name, int), help="override the preset's value")
    return p
