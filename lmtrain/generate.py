"""`lmtrain generate`: sample text from a run's latest checkpoint, with a key/value cache.

lmtrain generate --run runs/tiny-cpu --prompt "def main(" --max-new-tokens 200 --temperature 0.8 --top-k 50

`generate()` is also the library entry point. With `use_cache=True` the prompt is run once (prefill)
and every new token costs one single-token forward pass against the cached keys/values, instead of a
forward pass over the whole sequence so far. Greedy decoding (temperature 0) gives the same tokens
either way; `bench/generate.py` measures the speedup.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn as nn

from lmtrain.errors import UserError
from lmtrain.model import Attention, FeedForward, Transformer, TransformerModelArgs, clean_state_dict_keys

# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------


def _check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise UserError(f"--temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {top_p}")


def sample_next(
    logits: torch.Tensor,  # (B, V) logits of the last position
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:  # (B,) int64
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1) smallest kept logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the more likely ones already cover top_p; the most likely always stays.
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# --------------------------------------------------------------------------------------------------
# Decode-time weight layout
# --------------------------------------------------------------------------------------------------


def _fuse_rows(linears: list[nn.Linear]) -> torch.Tensor:
    """One column-major (sum of outs, in) weight holding the linears' weights stacked by rows; each
    linear's weight becomes its row slice (a view, so no memory is added). Returns the stacked weight."""
    stacked = torch.cat([m.weight.data for m in linears]).t().contiguous().t()  # (out_total, in)
    start = 0
    for m in linears:
        rows = m.weight.shape[0]
        m.weight.data = stacked[start : start + rows]  # strides (1, out_total): column-major rows
        start += rows
    return stacked


def _blocks(threads: int, *out_features: int) -> int:
    """Column blocks for `decode_linear`: one per thread, where every weight's outputs divide evenly."""
    if threads > 1 and all(n % threads == 0 for n in out_features):
        return threads
    return 1


@contextlib.contextmanager
def decode_layout(model: nn.Module):
    """On CPU, lay the weights out for one-token products while decoding; restore them afterwards.

    A single-token step multiplies one row vector by each weight, which is bound by reading the weight
    and by per-product overhead. Three changes, each measured on this CPU path:

    - Column-major weights. With nn.Linear's (out, in) row-major layout, CPU BLAS runs a vector product
      at a fraction of memory bandwidth; with the same (out, in) tensor stored column-major (the
      transpose contiguous), F.linear reads it in the order the product needs. One thread, the tiny
      preset's 32000 x 256 output head: 2.4 ms -> 1.1 ms per token.
    - Fused projections. Attention's wq, wk, wv become row slices of one (q + 2 kv, in) weight
      (`Attention.wqkv`) and SwiGLU's w1, w3 of one (2 hidden, in) weight (`FeedForward.w13`), so a
      token runs four products per layer instead of seven, called as plain F.linear products. On this
      CPU the products themselves gain ~4%; the rest is per-call overhead: the tiny preset's decode
      step goes from 843 to 747 aten ops, and one token's forward from 15% to ~5% slower than a
      hand-written loop without modules (`lmtrain bench generate` compares the two).
    - One block of columns per thread (`lmtrain.model.decode_linear`): a one-row product runs on all
      of torch's threads instead of one, where every output size divides by the thread count.

    Values and shapes of every parameter are unchanged and the storage is swapped in place (one
    matrix extra at a time, not a second copy of the model), so logits differ only by summation order.
    On GPUs the layout is left as it is: cuBLAS has kernels for both operand orders, and no GPU
    measurement here says that a copy would pay.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears or linears[0].weight.device.type != "cpu":
        yield model
        return
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    swiglus = [m for m in model.modules() if isinstance(m, FeedForward)]
    if any(m.wqkv is not None for m in attentions):  # already inside decode_layout: nothing to change
        yield model
        return
    with torch.no_grad():
        for m in attentions:
            m.wqkv = _fuse_rows([m.wq, m.wk, m.wv])
        for m in swiglus:
            m.w13 = _fuse_rows([m.w1, m.w3])
        in_fused = {id(w) for m in attentions for w in (m.wq, m.wk, m.wv)}
        in_fused |= {id(w) for m in swiglus for w in (m.w1, m.w3)}
        for m in linears:
            if id(m) not in in_fused:
                m.weight.data = m.weight.data.t().contiguous().t()  # same (out, in) tensor, column-major
        threads = torch.get_num_threads()
        for m in attentions:
            m.blocks = _blocks(threads, m.wqkv.shape[0], m.wo.weight.shape[0])
        for m in swiglus:
            m.blocks = _blocks(threads, m.w13.shape[0], m.w2.weight.shape[0])
        heads = [m for m in model.modules() if isinstance(m, Transformer)]
        for m in heads:
            m.output_blocks = _blocks(threads, m.output.weight.shape[0])
    try:
        yield model
    finally:
        with torch.no_grad():
            for m in attentions:
                m.wqkv, m.blocks = None, 1
            for m in swiglus:
                m.w13, m.blocks = None, 1
            for m in heads:
                m.output_blocks = 1
            for m in linears:
                m.weight.data = m.weight.data.contiguous()  # separate, row-major again for training


@torch.no_grad()
def generate_stream(
    model: Transformer,
    prompt_ids: torch.Tensor,  # (B, T) int64
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | Sequence[int] | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (next tokens (B,), their logits (B, V)) one step at a time; stops when every row of the
    batch has produced an end token (rows that finished early keep repeating it)."""
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    B, T = prompt_ids.shape
    context = model.args.seq_len
    if T == 0:
        raise UserError("the prompt is empty: give at least one token")
    if T > context:
        raise UserError(
            f"the prompt has {T} tokens, longer than the model's context of {context} (model.seq_len): "
            "shorten the prompt"
        )
    if max_new_tokens == 0:
        return
    device = prompt_ids.device
    end_ids = torch.tensor([] if eos_id is None else [eos_id] if isinstance(eos_id, int) else list(eos_id))
    end_ids = end_ids.to(device=device, dtype=torch.long)
    track_ends = len(end_ids) > 0  # without end tokens there is nothing to track (and no per-token sync)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    # Every token in one preallocated buffer: a step writes one column instead of copying the sequence.
    seq = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=device)  # (B, T + n)
    seq[:, :T] = prompt_ids
    cache = model.new_kv_cache(B) if use_cache else None
    if cache is not None:
        logits = model(prompt_ids, cache=cache, start_pos=0, last_only=True)[:, -1]  # prefill: (B, V)
    else:
        logits = model(prompt_ids, last_only=True)[:, -1]
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        if track_ends:
            nxt = torch.where(finished, end_ids[0], nxt)
        yield nxt, logits
        if step == max_new_tokens - 1:
            return
        if track_ends:
            finished |= torch.isin(nxt, end_ids)
            if bool(finished.all()):
                return
        pos = T + step  # position of the token just sampled
        seq[:, pos] = nxt
        if cache is not None and pos < context:
            logits = model(seq[:, pos : pos + 1], cache=cache, start_pos=pos, last_only=True)[:, -1]
        else:
            # No cache, or the context is full: the window slides, every position shifts, and the
            # cached keys (rotated or position-embedded at their old positions) are no longer valid.
            logits = model(seq[:, max(0, pos + 1 - context) : pos + 1], last_only=True)[:, -1]


def generate(
    model: Transformer,
    prompt_ids: torch.Tensor | Sequence[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | Sequence[int] | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    return_logits: bool = False,
):
    """Prompt followed by up to max_new_tokens sampled tokens: (T + n,) for a list or 1-D prompt,
    (B, T + n) for a batch. temperature 0 is greedy. With return_logits, also the logits that each new
    token was sampled from: (n, V) or (B, n, V)."""
    device = next(model.parameters()).device
    ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
    batched = ids.dim() == 2
    ids = ids if batched else ids[None]  # (B, T)
    was_training = model.training
    model.eval()
    try:
        with decode_layout(model):
            stream = generate_stream(
                model, ids, max_new_tokens, temperature, top_k, top_p, eos_id, use_cache, generator
            )
            # Keep each step's logits only when asked for: 512 steps of a 128K vocabulary are 256 MB.
            steps = [(t, lg if return_logits else None) for t, lg in stream]
    finally:
        model.train(was_training)
    new = torch.stack([t for t, _ in steps], dim=1) if steps else ids[:, :0]  # (B, n)
    out = torch.cat([ids, new], dim=1)
    logits = torch.stack([lg for _, lg in steps], dim=1) if steps and return_logits else None  # (B, n, V)
    if not batched:
        out = out[0]
        logits = None if logits is None else logits[0]
    return (out, logits) if return_logits else out


# --------------------------------------------------------------------------------------------------
# Reading a run
# --------------------------------------------------------------------------------------------------

_CHECKPOINT = re.compile(r"^step-(\d+)\.pt$")


def latest_checkpoint(run_dir: str | Path) -> Path:
    """RUN_DIR/checkpoints/step-XXXXXXXX.pt with the highest step."""
    folder = Path(run_dir) / "checkpoints"
    found = [(int(m.group(1)), p) for p in folder.glob("step-*.pt") if (m := _CHECKPOINT.match(p.name))]
    if not found:
        raise UserError(
            f"no checkpoint in {folder} (expected files named step-XXXXXXXX.pt): pass the directory of a "
            "run that has saved at least one checkpoint"
        )
    return max(found)[1]


def load_run_model(
    run_dir: str | Path, step: int | None = None, device: str | torch.device = "cpu"
) -> tuple[Path, Transformer, dict]:
    """(path, model, checkpoint dict) of the run's newest readable checkpoint, or of `step`.

    As resume does, an unreadable newest checkpoint (a killed copy, a damaged disk) is reported and the
    one before it used; a UserError lists every file and its error when none can be read.
    """
    from lmtrain.checkpoint import candidates

    latest_checkpoint(run_dir)  # the error for a run without any checkpoint
    errors = []
    for _, path in candidates(run_dir, step):
        try:
            return (path, *load_model(path, device))
        except UserError as exc:
            print(f"warning: {exc}; trying the previous checkpoint", file=sys.stderr)
            errors.append(f"  {path.name}: {exc}")
    raise UserError(
        f"none of the {len(errors)} checkpoints of {run_dir} can be loaded:\n" + "\n".join(errors)
    )


def load_state_dict_checked(model: Transformer, state_dict: dict, source: str) -> None:
    """Load a (prefix-free or wrapped) state dict, or raise a UserError naming every key whose presence
    or shape differs, which is what a checkpoint from another model config looks like."""
    state_dict = clean_state_dict_keys(state_dict)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:

        def listed(items: list[str]) -> str:
            return ", ".join(items[:6]) + (f" (+{len(items) - 6} more)" if len(items) > 6 else "")

        parts = [f"missing keys: {listed(missing)}"] if missing else []
        parts += [f"unexpected keys: {listed(unexpected)}"] if unexpected else []
        parts += [f"shape mismatches: {listed(shapes)}"] if shapes else []
        raise UserError(
            f"{source} does not match the model config ({'; '.join(parts)}): it was written by a model "
            "with a different config; use the run's own model_args or the matching checkpoint"
        )
    model.load_state_dict(state_dict)


def load_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, dict]:
    """The model of a checkpoint file, in fp32 on `device`, and the checkpoint dict."""
    try:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise UserError(f"cannot read checkpoint {checkpoint}: {exc}") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise UserError(
            f"checkpoint {checkpoint} has no `model` and `model_args` entries: not an lmtrain checkpoint"
        )
    try:
        args = TransformerModelArgs(**ckpt["model_args"])
    except TypeError as exc:
        raise UserError(
            f"checkpoint {checkpoint}: model_args do not fit this version of lmtrain: {exc}"
        ) from exc
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device=device)
    model.reset_rope()
    load_state_dict_checked(model, ckpt["model"], f"checkpoint {checkpoint}")
    return model.float().eval(), ckpt


def load_run_tokenizer(run_dir: str | Path):
    folder = Path(run_dir) / "tokenizer"
    if not folder.is_dir():
        raise UserError(f"no tokenizer in {folder}: a run saves its tokenizer there (save_pretrained layout)")
    from lmtrain.data.tokenizers import load_tokenizer

    return load_tokenizer(str(folder))


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    from lmtrain.arguments import generate_parser

    return generate_parser()


def main(argv: list[str]) -> int:
    opts = _parser().parse_args(argv)
    _check_sampling(opts.max_new_tokens, opts.temperature, opts.top_k, opts.top_p)
    run_dir = Path(opts.run)
    if not run_dir.is_dir():
        raise UserError(f"--run {run_dir}: no such directory")
    path, model, ckpt = load_run_model(run_dir, opts.step)
    tok = load_run_tokenizer(run_dir)
    # Documents start after a BOS in training (it separates packed documents), so prompts do too.
    prompt = [tok.bos_token_id] + tok.encode(opts.prompt, add_special_tokens=False)
    # The packed pipeline marks a document's end with the next document's BOS; stop at either.
    ends = [i for i in (tok.eos_token_id, tok.bos_token_id) if i is not None]
    print(f"# {path.name} (step {ckpt.get('step', '?')})", file=sys.stderr)
    generator = torch.Generator().manual_seed(opts.seed)
    ids = torch.tensor([prompt])
    stream = generate_stream(
        model, ids, opts.max_new_tokens, opts.temperature, opts.top_k, opts.top_p, ends, not opts.no_cache,
        generator,
    )  # fmt: skip
    with decode_layout(model):
        _print_stream(stream, tok, ends, opts.prompt)
    return 0


def _print_stream(stream, tok, ends: list[int], prompt: str) -> None:
    """Print the new text as it arrives, holding back incomplete UTF-8 characters."""
    new: list[int] = []
    shown = ""
    sys.stdout.write(prompt)
    for nxt, _ in stream:
        token = int(nxt[0])
        if token in ends:
            break
        new.append(token)
        text = tok.decode(new, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue  # an incomplete UTF-8 character: wait for its remaining bytes
        sys.stdout.write(text[len(shown) :])
        sys.stdout.flush()
        shown = text
    sys.stdout.write(tok.decode(new, skip_special_tokens=True)[len(shown) :] + "\n")
