"""Useful (non-ignored) tokens per second: padded baseline vs packed from parquet vs packed pre-tokenized.

    lmtrain bench data --max-documents 400 --seconds 5

Runs on the stdlib corpus (built with `lmtrain prepare --pretokenize` into --cache if absent, then
reused), in the main process (num_workers=0) so that the three pipelines are compared like for like.
The last line is the ratio of packed-from-parquet to the padded baseline.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lmtrain.config import DataConfig
from lmtrain.data import build_dataloader, load_tokenizer
from lmtrain.data.prepare import parse_args, prepare

REPO = Path(__file__).resolve().parents[1]


def measure(cfg: DataConfig, tokenizer, seconds: float, max_batches: int) -> dict:
    loader = iter(build_dataloader(cfg, tokenizer, "train", seed=0))
    next(loader)  # warm-up: file opening, first tokenizer call
    batches = tokens = useful = 0
    start = time.perf_counter()
    while batches < max_batches and time.perf_counter() - start < seconds:
        batch = next(loader)
        labels = batch["labels"]
        batches += 1
        tokens += labels.numel()
        useful += int((labels != -100).sum())
    elapsed = time.perf_counter() - start
    return {"batches": batches, "tokens": tokens, "useful": useful, "seconds": elapsed}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lmtrain bench data", description=__doc__.split("\n\n")[0])
    p.add_argument("--max-documents", type=int, default=None, help="corpus size (default: all of stdlib)")
    p.add_argument("--cache", default=str(REPO / "data" / "bench-stdlib"), help="where the corpus is built")
    p.add_argument("--tokenizer", default="byte")
    p.add_argument("--sequence-length", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seconds", type=float, default=10.0, help="time budget per pipeline")
    p.add_argument("--max-batches", type=int, default=100_000)
    args = p.parse_args(argv)
    cache = Path(args.cache + (f"-{args.max_documents}" if args.max_documents else ""))
    prep = ["--source", "stdlib", "--out", str(cache), "--tokenizer", args.tokenizer, "--pretokenize"]
    if args.max_documents:
        prep += ["--max-documents", str(args.max_documents)]
    t0 = time.perf_counter()
    info = prepare(parse_args(prep), progress=False)
    status = "cached" if info.get("up_to_date") else f"built in {time.perf_counter() - t0:.1f} s"
    print(
        f"corpus {cache}: {info['documents']['train']} train documents, {info['bytes'] / 1e6:.1f} MB ({status})"
    )
    tokenizer = load_tokenizer(str(cache / "tokenizer"))
    shape = dict(sequence_length=args.sequence_length, batch_size=args.batch_size, num_workers=0)
    runs = {
        "padded (parquet)": DataConfig(dataset=str(cache / "train.parquet"), pipeline="padded", **shape),
        "packed (parquet)": DataConfig(dataset=str(cache / "train.parquet"), pipeline="packed", **shape),
        "packed (pretokenized)": DataConfig(dataset=str(cache), pipeline="packed", **shape),
    }
    results = {}
    print(f"B={args.batch_size} T={args.sequence_length}, {args.seconds:g} s per pipeline, num_workers=0")
    for name, cfg in runs.items():
        r = measure(cfg, tokenizer, args.seconds, args.max_batches)
        results[name] = r["useful"] / r["seconds"]
        padding = 1 - r["useful"] / r["tokens"]
        print(
            f"{name:<22} {r['batches']:>6} batches  useful {results[name] / 1e6:8.3f} M tokens/s  "
            f"ignored {padding:6.2%}"
        )
    pre = results["packed (pretokenized)"] / results["padded (parquet)"]
    print(f"pretokenized/padded useful tokens/s ratio: {pre:.1f}")
    ratio = results["packed (parquet)"] / results["padded (parquet)"]
    print(f"packed/padded useful tokens/s ratio: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
