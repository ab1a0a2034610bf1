"""Greedy decoding speed: lmtrain cached vs recompute vs a minimal static-cache loop vs transformers.

    lmtrain bench generate --new-tokens 512 --rounds 15 --recompute-rounds 5 --speedup-threads 1

Four contenders decode greedily from the same randomly initialised tiny model, in alternating rounds
(`lmtrain.rounds`): lmtrain's `generate` with its key/value cache, the same without a cache (the whole
sequence recomputed for every token), a minimal hand-written decode loop on the same weights (a
static cache, no modules, every weight transposed once), and transformers' `generate(use_cache=True)`
on the model exported with `lmtrain.export_hf`. lmtrain cached and the minimal loop alternate token by
token (`lmtrain.rounds.interleave`) in --rounds rounds of --new-tokens each, and lmtrain cached and
transformers (one `generate` call) run by run in --rounds more. lmtrain cached and recompute also
alternate token by token, both at the same position of the sequence, in --recompute-rounds rounds on
--speedup-threads threads (default 1). Recompute spends its time in large products that use every
thread, a cached step in one-row products and small ops, so on several threads their ratio also
measures how free the other cores are. All four must produce the same tokens. The last lines are the
ratios to the minimal loop and to transformers, and the cached/recompute speed-up, each with its
spread over rounds and its CPU-time ratio.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from lmtrain.config import ModelConfig
from lmtrain.errors import UserError
from lmtrain.generate import decode_layout, generate, generate_stream
from lmtrain.model import Transformer, model_args_from_config
from lmtrain.rounds import compare, interleave


class MinimalDecoder:
    """The shortest fast greedy decoder for lmtrain's Llama blocks (RMSNorm, RoPE, SwiGLU, GQA).

    Weights are copied once into (in, out) layout so that every product is `x @ w`; the cache is one
    preallocated (layers, B, n_kv, S, hd) tensor for keys and one for values.
    """

    def __init__(self, model: Transformer):
        a = model.args
        assert (a.norm, a.mlp, a.pos) == ("rmsnorm", "swiglu", "rope"), "Llama blocks only"
        sd = {k: v.detach() for k, v in model.state_dict().items()}
        t = lambda w: w.t().contiguous()  # noqa: E731  (out, in) -> (in, out)
        self.args = a
        self.embed = sd["tok_embeddings.weight"]  # (V, C)
        self.layers = [
            {
                "attn_norm": sd[f"layers.{i}.attention_norm.weight"],
                "wq": t(sd[f"layers.{i}.attention.wq.weight"]),
                "wk": t(sd[f"layers.{i}.attention.wk.weight"]),
                "wv": t(sd[f"layers.{i}.attention.wv.weight"]),
                "wo": t(sd[f"layers.{i}.attention.wo.weight"]),
                "ffn_norm": sd[f"layers.{i}.ffn_norm.weight"],
                "w1": t(sd[f"layers.{i}.feed_forward.w1.weight"]),
                "w2": t(sd[f"layers.{i}.feed_forward.w2.weight"]),
                "w3": t(sd[f"layers.{i}.feed_forward.w3.weight"]),
            }
            for i in range(a.n_layers)
        ]
        self.norm = sd["norm.weight"]
        self.head = t(sd["output.weight"])  # (C, V)
        self.rotation = torch.complex(model.freqs_cos, model.freqs_sin)  # (S, hd/2)

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.args.norm_eps) * w

    def _rope(self, x: torch.Tensor, pos: int) -> torch.Tensor:  # (B, T, H, hd)
        rot = self.rotation[pos : pos + x.shape[1], None, :]  # (T, 1, hd/2)
        return torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * rot).flatten(-2)

    def _forward(self, tokens: torch.Tensor, pos: int, k_cache, v_cache) -> torch.Tensor:
        a, (B, T) = self.args, tokens.shape
        h = self.embed[tokens]  # (B, T, C)
        for i, w in enumerate(self.layers):
            x = self._rms(h, w["attn_norm"])
            q = self._rope((x @ w["wq"]).view(B, T, a.n_heads, a.head_dim), pos).transpose(1, 2)
            k = self._rope((x @ w["wk"]).view(B, T, a.n_kv_heads, a.head_dim), pos).transpose(1, 2)
            k_cache[i, :, :, pos : pos + T] = k
            v_cache[i, :, :, pos : pos + T] = (
                (x @ w["wv"]).view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
            )
            keys, values = k_cache[i, :, :, : pos + T], v_cache[i, :, :, : pos + T]  # (B, n_kv, S, hd)
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=T > 1, enable_gqa=True)
            h = h + out.transpose(1, 2).reshape(B, T, a.dim) @ w["wo"]
            x = self._rms(h, w["ffn_norm"])
            h = h + (F.silu(x @ w["w1"]) * (x @ w["w3"])) @ w["w2"]
        return self._rms(h[:, -1], self.norm) @ self.head  # (B, V)

    @torch.no_grad()
    def stream(self, prompt: torch.Tensor, new_tokens: int) -> Iterator[torch.Tensor]:
        """Greedy continuation of prompt (B, T), one step at a time: `new_tokens` tokens (B,)."""
        a, (B, T) = self.args, prompt.shape
        assert T + new_tokens <= a.seq_len, "the context is full"
        shape = (a.n_layers, B, a.n_kv_heads, T + new_tokens, a.head_dim)
        k_cache = torch.zeros(shape, dtype=self.embed.dtype, device=self.embed.device)
        v_cache = torch.zeros_like(k_cache)
        out = torch.empty(B, T + new_tokens, dtype=torch.long, device=prompt.device)
        out[:, :T] = prompt
        logits = self._forward(prompt, 0, k_cache, v_cache)  # prefill, with the prompt's causal mask
        for pos in range(T, T + new_tokens):
            out[:, pos] = logits.argmax(-1)
            yield out[:, pos]
            if pos + 1 < T + new_tokens:
                logits = self._forward(out[:, pos : pos + 1], pos, k_cache, v_cache)

    def __call__(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy continuation of prompt (B, T) by `new_tokens` tokens: (B, T + new_tokens)."""
        return with_prompt(prompt, list(self.stream(prompt, new_tokens)))


def with_prompt(prompt: torch.Tensor, tokens: list[torch.Tensor]) -> torch.Tensor:
    """The prompt (B, T) followed by the tokens, each (B,): (B, T + len(tokens))."""
    return torch.cat([prompt, torch.stack(tokens, dim=1)], dim=1)


def lmtrain_stream(
    model: Transformer, prompt: torch.Tensor, new_tokens: int, use_cache: bool = True
) -> Iterator[torch.Tensor]:
    """lmtrain's greedy decoding one step at a time (`generate` without collecting the steps)."""
    with decode_layout(model):
        for token, _ in generate_stream(model, prompt, new_tokens, temperature=0, use_cache=use_cache):
            yield token


def hf_decoder(model: Transformer):
    """transformers' greedy `generate(use_cache=True)` on the exported model: prompt -> (B, T + n)."""
    from lmtrain.export_hf import to_hf_model

    hf = to_hf_model(model)
    hf.generation_config.eos_token_id = None  # a random model must not stop early

    @torch.no_grad()
    def decode(prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        return hf.generate(
            prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
            attention_mask=torch.ones_like(prompt), pad_token_id=0,
        )  # fmt: skip

    return decode


def decoders(model: Transformer) -> dict:
    """name -> (prompt (B, T), new tokens) -> (B, T + n) greedy tokens, for the four contenders."""
    return {
        "lmtrain cached": lambda p, n: generate(model, p, n, temperature=0, use_cache=True),
        "lmtrain recompute": lambda p, n: generate(model, p, n, temperature=0, use_cache=False),
        "minimal loop": MinimalDecoder(model),
        "transformers": hf_decoder(model),
    }


def first_difference(a: torch.Tensor, b: torch.Tensor) -> int | None:
    """Index of the first differing token of two (B, L) outputs, or None when equal."""
    if a.shape == b.shape and torch.equal(a, b):
        return None
    n = min(a.shape[-1], b.shape[-1])
    diff = (a[..., :n] != b[..., :n]).any(0).nonzero()
    return int(diff[0]) if len(diff) else n


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lmtrain bench generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=512, help="tokens decoded per run (default 512)")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="random prompt length (default 16)")
    parser.add_argument("--vocab-size", type=int, default=32000, help="(default 32000)")
    parser.add_argument("--preset", default="tiny", help="model preset (default tiny)")
    parser.add_argument("--device", default="cpu", help="(default cpu)")
    parser.add_argument("--rounds", type=int, default=15, help="rounds of the cached decoders (default 15)")
    parser.add_argument(
        "--recompute-rounds", type=int, default=5, help="rounds of cached against recompute (default 5)"
    )
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default 0: torch's default)")
    parser.add_argument(
        "--speedup-threads",
        type=int,
        default=1,
        help="CPU threads of the cached against recompute rounds (default 1; 0: those of --threads)",
    )
    opts = parser.parse_args(argv)
    if opts.threads < 0 or opts.speedup_threads < 0:
        raise UserError(
            f"--threads and --speedup-threads must be >= 0 (0: the default), got {opts.threads} and "
            f"{opts.speedup_threads}"
        )
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if min(opts.new_tokens, opts.prompt_tokens, opts.rounds, opts.recompute_rounds) < 1:
        raise UserError("--new-tokens, --prompt-tokens, --rounds and --recompute-rounds must be >= 1")
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

    outputs = {}

    def contender(name, decode):
        def run():
            outputs[name] = decode(prompt, opts.new_tokens)
            return opts.new_tokens

        return run

    decoding = decoders(model)
    for decode in decoding.values():  # warm-up on 8 tokens: allocator, kernels, first calls
        decode(prompt, min(8, opts.new_tokens))
    sync = torch.cuda.synchronize if opts.device.startswith("cuda") else None
    # Three comparisons. lmtrain and the minimal loop alternate token by token, so that both run through
    # the same seconds of a load that swings within one run; transformers' `generate` is one call, so
    # it alternates with lmtrain run by run; then cached against recompute (ten times longer) in fewer
    # rounds, so that the close ratios get the most rounds.
    streamed: dict[str, list[torch.Tensor]] = {}

    def token_stream(name, start):
        def begin():
            tokens = streamed[name] = []
            for token in start(prompt, opts.new_tokens):
                tokens.append(token)
                yield 1

        return begin

    per_token = interleave(
        {
            "lmtrain cached": token_stream("lmtrain cached", lambda p, n: lmtrain_stream(model, p, n)),
            "minimal loop": token_stream("minimal loop", decoding["minimal loop"].stream),
        },
        items=opts.new_tokens,
        rounds=opts.rounds,
        unit="token",
        warmup=0,
        sync=sync,
    )
    per_token.print_table(
        f"cached greedy decoding, {opts.new_tokens} new tokens, alternating token by token",
        baseline="minimal loop",
    )
    names = ("lmtrain cached", "transformers")
    contenders = {n: contender(n, decoding[n]) for n in names}
    result = compare(contenders, rounds=opts.rounds, unit="token", warmup=0, sync=sync)
    result.print_table(f"cached greedy decoding, {opts.new_tokens} new tokens", baseline="transformers")

    # Cached against recompute, token by token at the same position: a recompute step costs ten cached
    # ones, and timing the two as whole runs one after the other let a load change between them decide
    # the ratio. Both run inside one decode layout, as `generate` runs each of them; it is entered here,
    # after setting the threads (its column blocks follow the thread count), so that the streams' own
    # `decode_layout` finds it in place whichever of them starts first.
    threads = torch.get_num_threads()
    speedup_threads = opts.speedup_threads or threads
    torch.set_num_threads(speedup_threads)
    try:
        with decode_layout(model):
            speedup = interleave(
                {
                    "lmtrain cached": token_stream(
                        "lmtrain cached", lambda p, n: lmtrain_stream(model, p, n)
                    ),
                    "lmtrain recompute": token_stream(
                        "lmtrain recompute", lambda p, n: lmtrain_stream(model, p, n, use_cache=False)
                    ),
                },
                items=opts.new_tokens,
                rounds=opts.recompute_rounds,
                unit="token",
                warmup=0,
                sync=sync,
            )
    finally:
        torch.set_num_threads(threads)
    outputs.update({name: with_prompt(prompt, tokens) for name, tokens in streamed.items()})
    speedup.print_table(
        f"cache against recompute, {opts.new_tokens} new tokens, {speedup_threads} thread(s), "
        "alternating token by token",
        baseline="lmtrain recompute",
    )
    reference = outputs["lmtrain cached"]
    for name, out in outputs.items():
        where = first_difference(reference, out)
        if where is not None:
            raise AssertionError(f"greedy tokens of {name} differ from lmtrain cached at position {where}")
    print("greedy tokens identical across the four: yes")
    print(
        per_token.headline("lmtrain cached", "minimal loop", "lmtrain cached / minimal loop tokens/s ratio")
    )
    print(result.headline("lmtrain cached", "transformers", "lmtrain cached / transformers tokens/s ratio"))
    print(speedup.headline("lmtrain cached", "lmtrain recompute", "kv-cache speedup"))
    return 0
