"""`lmtrain export-hf`: write a run's latest checkpoint as a transformers `LlamaForCausalLM` directory.

lmtrain export-hf --run runs/tiny-cpu --out exports/tiny-cpu-hf

The result (config.json, model.safetensors, tokenizer files) loads with
`transformers.LlamaForCausalLM.from_pretrained(DIR)` and gives the same logits as the lmtrain model.
Only the Llama architecture exports (rmsnorm, swiglu, rope, pre-norm sequential blocks); the other
ablation switches have no LlamaForCausalLM equivalent and are refused with the switch named.

The one non-trivial step is RoPE. Meta rotates interleaved channel pairs (0,1), (2,3), ... of each
head; Hugging Face rotates (j, j + head_dim/2) ("rotate_half"). Attention scores only see q.k, so
permuting the rows of wq and wk within each head, channel 2j -> j and 2j+1 -> j + head_dim/2, turns one
convention into the other exactly; v, wo and everything else map unchanged.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from lmtrain.atomic import share_directory
from lmtrain.errors import UserError
from lmtrain.model import Transformer, TransformerModelArgs, clean_state_dict_keys


def check_exportable(args: TransformerModelArgs) -> None:
    """A UserError for every switch LlamaForCausalLM cannot represent. An explicit d_ff is its
    intermediate_size; dropout acts in training only, so the exported model computes the same logits."""
    llama_switches = (
        ("norm", "rmsnorm"),
        ("mlp", "swiglu"),
        ("pos", "rope"),
        ("norm_position", "pre"),
        ("parallel_block", False),
    )
    for switch, llama in llama_switches:
        value = getattr(args, switch)
        if value != llama:
            raise UserError(
                f"model.{switch}={_as_flag(value)} cannot be exported as LlamaForCausalLM, which only "
                f"has {switch}={_as_flag(llama)}; only runs with the Llama architecture (rmsnorm, swiglu, "
                "rope, pre-norm sequential blocks) export"
            )


def _as_flag(value) -> str:
    """A switch value as the command line writes it (`true`, not `True`)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def interleaved_to_half_split(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Permute the output rows of wq or wk (n_heads * head_dim, dim) from Meta's to HF's RoPE layout."""
    rows, cols = weight.shape
    head_dim = rows // n_heads
    # (heads, pair i, member a, dim) -> (heads, member a, pair i, dim): row 2i + a becomes a * hd/2 + i.
    return weight.view(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_config(args: TransformerModelArgs, **token_ids):
    from transformers import LlamaConfig

    check_exportable(args)
    return LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads,
        head_dim=args.head_dim,
        hidden_act="silu",
        max_position_embeddings=args.seq_len,
        rms_norm_eps=args.norm_eps,
        rope_theta=args.rope_theta,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        **token_ids,
    )


def to_hf_state_dict(
    state_dict: dict[str, torch.Tensor], args: TransformerModelArgs
) -> dict[str, torch.Tensor]:
    """lmtrain (Meta-layout) state dict -> LlamaForCausalLM state dict."""
    check_exportable(args)
    sd = clean_state_dict_keys(state_dict)
    out = {
        "model.embed_tokens.weight": sd["tok_embeddings.weight"],
        "model.norm.weight": sd["norm.weight"],
        "lm_head.weight": sd["output.weight"],
    }
    for i in range(args.n_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        out[dst + "self_attn.q_proj.weight"] = interleaved_to_half_split(
            sd[src + "attention.wq.weight"], args.n_heads
        )
        out[dst + "self_attn.k_proj.weight"] = interleaved_to_half_split(
            sd[src + "attention.wk.weight"], args.n_kv_heads
        )
        out[dst + "self_attn.v_proj.weight"] = sd[src + "attention.wv.weight"]
        out[dst + "self_attn.o_proj.weight"] = sd[src + "attention.wo.weight"]
        out[dst + "mlp.gate_proj.weight"] = sd[src + "feed_forward.w1.weight"]
        out[dst + "mlp.up_proj.weight"] = sd[src + "feed_forward.w3.weight"]
        out[dst + "mlp.down_proj.weight"] = sd[src + "feed_forward.w2.weight"]
        out[dst + "input_layernorm.weight"] = sd[src + "attention_norm.weight"]
        out[dst + "post_attention_layernorm.weight"] = sd[src + "ffn_norm.weight"]
    assert len(out) == len(sd), "every lmtrain parameter maps to exactly one HF parameter"
    return {k: v.contiguous() for k, v in out.items()}


def to_hf_model(model: Transformer, **token_ids):
    """An in-memory LlamaForCausalLM with the weights of `model` (same logits, up to float rounding)."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM(hf_config(model.args, **token_ids))
    hf.load_state_dict(to_hf_state_dict(model.state_dict(), model.args), strict=True)
    return hf.to(next(model.parameters()).dtype).eval()


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    dtype: str = "fp32",
    force: bool = False,
    step: int | None = None,
) -> Path:
    """Write the run's newest readable checkpoint (or that of `step`) and tokenizer to out_dir as a Hugging
    Face Llama directory. The directory appears complete or not at all (written beside it, then renamed)."""
    from lmtrain.generate import load_run_model, load_run_tokenizer

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file, not a directory: choose a directory path")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise UserError(f"--out {out_dir} exists and is not empty: choose a new directory or pass --force")
    parent = next((p for p in out_dir.absolute().parents if p.exists()), Path("/"))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(
            f"--out {out_dir}: cannot write in {parent} (not a writable directory); choose a directory "
            "you can write to"
        )
    _, model, _ = load_run_model(run_dir, step)
    check_exportable(model.args)
    tok = load_run_tokenizer(run_dir)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    hf = to_hf_model(model, **ids).to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    except OSError as exc:  # read-only file system, permissions
        raise UserError(f"--out {out_dir}: cannot write in {out_dir.parent} ({exc.strerror})") from exc
    share_directory(tmp)  # an export is meant to be shared: mkdir's mode, not mkdtemp's 0700
    try:
        hf.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def main(argv: list[str]) -> int:
    from lmtrain.arguments import export_hf_parser

    parser = export_hf_parser()
    opts = parser.parse_args(argv)
    if not Path(opts.run).is_dir():
        raise UserError(f"--run {opts.run}: no such directory")
    out = export_run(opts.run, opts.out, dtype=opts.dtype, force=opts.force, step=opts.step)
    print(f"wrote {out} (LlamaForCausalLM.from_pretrained('{out}'))")
    return 0
