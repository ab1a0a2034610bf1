"""Three batching strategies for variable-length documents, timed with a small GPT-2-like model.

    lmtrain bench batching --batches 2 --rounds 9 --batch-size 8

Strategies: pad every batch to max_length (640), pad to the longest document of a random batch, and
the bucket sampler for k = 1, 5, 10, 20, 50, 640. The model is an embedding, a learned positional
encoding and one `nn.TransformerDecoderLayer` (hidden 1024, 8 heads, causal, cross-attending to its own
input), run forward only. The strategies alternate batch by batch (`lmtrain.rounds.interleave`), after
an untimed warm-up round; in every round, and in every run, a strategy reads the same batches: the
first --batches of its epoch with seed --seed. Each batch is also timed on its own (synchronising when on a GPU) for
the per-batch statistics.
Document lengths are synthetic (log-normal, median ~150 tokens, truncated to 640) with random token ids:
the forward cost depends on shapes only. Prints a rich table, writes a CSV, then shows that the sampler's
per-batch cost stays flat from 10^4 to 10^6 documents. The last line is the speed-up of the
bucket sampler at --headline-k over padding to max_length, with its spread over rounds and its CPU-time ratio.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from lmtrain.data.batching import BucketBatchSampler, pad_to_longest, pad_to_max_length
from lmtrain.errors import UserError
from lmtrain.rounds import interleave

MAX_LENGTH = 640
REPO = Path(__file__).resolve().parents[1]


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 1024, dim: int = 1024, heads: int = 8, max_length: int = MAX_LENGTH):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_length, dim)
        self.block = nn.TransformerDecoderLayer(dim, heads, dim_feedforward=4 * dim, batch_first=True)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        x = self.tok(ids) + self.pos(torch.arange(T, device=ids.device))  # (B, T, dim)
        causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).triu(1)  # True: may not attend
        x = self.block(
            x, x, tgt_mask=causal, tgt_is_causal=True, tgt_key_padding_mask=pad, memory_key_padding_mask=pad
        )
        return self.head(x)  # (B, T, vocab)


def synthetic_lengths(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(mean=5.0, sigma=0.9, size=n).astype(np.int64), 2, MAX_LENGTH)


def strategy_batches(name: str, lengths: np.ndarray, batch_size: int, k: int | None, seed: int):
    if name == "bucket":
        yield from BucketBatchSampler(lengths, batch_size, k, seed=seed)
        return
    order = np.random.default_rng(seed).permutation(len(lengths))
    for i in range(0, len(order), batch_size):
        yield order[i : i + batch_size].tolist()


def strategy(model, docs, lengths, name, k, args, device, stats: dict):
    """A contender's stream: forward passes over one strategy's epoch (seed `args.seed`, so the same
    batches every round), yielding each batch's real (non-padding) tokens and recording per-batch
    times. Batches differ in cost (their lengths), so a round that read the next batches instead would
    move the ratio with the batches it happened to get."""
    collate = (lambda b: pad_to_max_length(b, MAX_LENGTH)) if name == "max_length" else pad_to_longest

    def batches():
        for idx in strategy_batches(name, lengths, args.batch_size, k, args.seed):
            batch = collate([docs[j] for j in idx])
            ids = batch["input_ids"].to(device)
            pad = torch.arange(ids.shape[1])[None, :] >= torch.as_tensor(lengths[idx])[:, None]  # (B, L)
            pad = pad.to(device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.no_grad():
                model(ids, pad)
            if device.type == "cuda":
                torch.cuda.synchronize()
            stats["times"].append(time.perf_counter() - start)
            stats["tokens"] += ids.numel()
            stats["real"] += int(lengths[idx].sum())
            yield int(lengths[idx].sum())

    return batches


def summary(stats: dict) -> dict:
    times = stats["times"]
    return {
        "min": min(times),
        "max": max(times),
        "mean": statistics.mean(times),
        "median": statistics.median(times),
        "padding": 1 - stats["real"] / stats["tokens"],
        "tokens_per_s": stats["real"] / sum(times),
        "batches": len(times),
    }


def sampler_cost(batch_size: int, k: int) -> list[str]:
    """Mean seconds and elementary steps per batch of the bucket sampler for 10^4 and 10^6 documents."""
    lines = []
    for n in (10_000, 1_000_000):
        t0 = time.perf_counter()
        sampler = BucketBatchSampler(synthetic_lengths(n, seed=1), batch_size, k)
        build = time.perf_counter() - t0
        it, ops = iter(sampler), []
        t0 = time.perf_counter()
        for _ in range(500):
            next(it)
            ops.append(sampler.last_batch_ops)
        per_batch = (time.perf_counter() - t0) / 500
        lines.append(
            f"sampler n={n:>9,}: __init__ {build:6.2f} s, per batch {per_batch * 1e6:7.1f} us, "
            f"max steps per batch {max(ops)}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lmtrain bench batching", description=__doc__.split("\n\n")[0])
    p.add_argument("--documents", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=2, help="batches per strategy and round (default 2)")
    p.add_argument("--rounds", type=int, default=9, help="alternating rounds (default 9)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--ks", default="1,5,10,20,50,640")
    p.add_argument("--headline-k", type=int, default=5, help="the bucket k of the last line (default 5)")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", default=str(REPO / "runs" / "bench-batching.csv"))
    args = p.parse_args(argv)
    if min(args.rounds, args.batches, args.batch_size) < 1 or args.batches * args.batch_size > args.documents:
        raise UserError(
            f"--rounds, --batches and --batch-size must be >= 1 and --batches x --batch-size at most "
            f"--documents, got {args.rounds}, {args.batches}, {args.batch_size} and {args.documents}"
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    model = TinyGPT(dim=args.dim).to(device).eval()
    lengths = synthetic_lengths(args.documents, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    docs = [torch.randint(0, 1024, (int(n),), generator=gen) for n in lengths]
    runs = [("max_length", None), ("longest", None)] + [("bucket", int(k)) for k in args.ks.split(",")]
    names = [name if k is None else f"bucket k={k}" for name, k in runs]
    headline = f"bucket k={args.headline_k}"
    if headline not in names:
        raise UserError(f"--headline-k {args.headline_k} is not among --ks {args.ks}: add it to --ks")
    stats = {label: {"times": [], "tokens": 0, "real": 0} for label in names}
    contenders = {
        label: strategy(model, docs, lengths, name, k, args, device, stats[label])
        for label, (name, k) in zip(names, runs)
    }
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    result = interleave(
        contenders, items=args.batches, rounds=args.rounds, unit="token", warmup=args.warmup, sync=sync
    )
    for s in stats.values():  # per-batch statistics of the timed rounds only
        del s["times"][: args.warmup * args.batches]
    rows = [{"strategy": label, **summary(stats[label])} for label in names]
    table = Table(title=f"forward time per batch, B={args.batch_size}, {device.type}, dim {args.dim}")
    for col in ("strategy", "min ms", "max ms", "mean ms", "median ms", "padding", "tokens/s"):
        table.add_column(col, justify="left" if col == "strategy" else "right")
    for r in rows:
        table.add_row(
            r["strategy"],
            *(f"{r[key] * 1e3:.1f}" for key in ("min", "max", "mean", "median")),
            f"{r['padding']:.1%}",
            f"{r['tokens_per_s']:,.0f}",
        )
    Console(width=110).print(table)
    out = Path(args.csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}")
    for line in sampler_cost(args.batch_size, 20):
        print(line)
    result.print_table("useful tokens/s per strategy", baseline="max_length")
    best = max(names[2:], key=result.median_rate)
    print(f"fastest bucketed run: {best} ({result.ratio(best, 'max_length')[0]:.2f}x max_length)")
    # The headline names one k for every run: the fastest k changes from run to run where two are close.
    print(result.headline(headline, "max_length", f"{headline}/max_length useful tokens/s ratio"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
