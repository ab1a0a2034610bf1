"""Generation speed with and without the key/value cache on the tiny preset (CPU or GPU).

lmtrain bench generate [--new-tokens 512] [--prompt-tokens 16] [--vocab-size 32000] [--device cpu]

Both paths decode greedily from the same randomly initialised model and must produce the same tokens;
the last line is the ratio of their tokens/s, measured in this run.
"""

from __future__ import annotations

import argparse
import time

import torch

from lmtrain.config import ModelConfig
from lmtrain.errors import UserError
from lmtrain.generate import generate
from lmtrain.model import Transformer, model_args_from_config


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lmtrain bench generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    opts = parser.parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.new_tokens < 1 or opts.prompt_tokens < 1:
        raise UserError("--new-tokens and --prompt-tokens must be >= 1")
    seq_len = opts.prompt_tokens + opts.new_tokens
    args = model_args_from_config(
        ModelConfig(preset=opts.preset), vocab_size=opts.vocab_size, seq_len=seq_len
    )
    torch.manual_seed(0)
    model = Transformer(args).to(opts.device).eval()
    prompt = torch.randint(0, opts.vocab_size, (1, opts.prompt_tokens), device=opts.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"{opts.preset}: {n_params / 1e6:.1f}M parameters, {torch.get_num_threads()} threads, {opts.device}"
    )
    print(f"prompt {opts.prompt_tokens} tokens, {opts.new_tokens} new tokens, greedy")

    generate(model, prompt, 8, temperature=0, use_cache=True)  # warm-up: allocator, kernels
    generate(model, prompt, 8, temperature=0, use_cache=False)
    results = {}
    for use_cache in (False, True):
        if opts.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = generate(model, prompt, opts.new_tokens, temperature=0, use_cache=use_cache)
        if opts.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        results[use_cache] = (out, opts.new_tokens / seconds)
        label = "kv cache" if use_cache else "no cache"
        print(f"{label}: {opts.new_tokens / seconds:8.1f} tokens/s ({seconds:.2f} s)")
    if not torch.equal(results[True][0], results[False][0]):
        raise AssertionError("greedy tokens differ with and without the cache")
    print("greedy tokens identical: yes")
    print(f"kv-cache speedup: {results[True][1] / results[False][1]:.2f}")
    return 0
