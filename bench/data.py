"""Useful (non-ignored) tokens per second: padded baseline vs packed from parquet vs packed pre-tokenized.

    lmtrain bench data --max-documents 400 --batches 32 --rounds 15

Runs on the stdlib corpus (built with `lmtrain prepare --pretokenize` into --cache if absent, then
reused), in the main process (num_workers=0) so that the three pipelines are compared like for like.
The pipelines alternate batch by batch (`lmtrain.rounds.interleave`), so that every second of a
shared machine's swinging load slows them alike. In every round, and in every run, each pipeline
reads the same batches: the first --batches of a fresh loader with a fixed seed (padded batches cost
more or less with the documents they hold, which would otherwise move the rate with the batches a
round happens to get). Each rate includes opening the loader. The tokenizer runs on one thread
(TOKENIZERS_PARALLELISM=false unless the environment sets it), as it does in each data-loader worker
of a training run, so that the pipelines are compared per core, not by how free the machine's other
cores happen to be. The last line is the ratio of packed-from-parquet to the padded baseline, with its
spread over rounds and its CPU-time ratio.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from lmtrain.config import DataConfig
from lmtrain.data import build_dataloader, load_tokenizer
from lmtrain.data.prepare import parse_args, prepare
from lmtrain.errors import UserError
from lmtrain.rounds import interleave

REPO = Path(__file__).resolve().parents[1]


def pipeline(cfg: DataConfig, tokenizer, counts: dict):
    """The work of one round: batches from a fresh loader (seed 0, so the same batches every round),
    yielding each batch's useful tokens and adding both counts to `counts` (for the share of ignored
    positions)."""

    def batches():
        for batch in build_dataloader(cfg, tokenizer, "train", seed=0):
            labels = batch["labels"]
            useful = int((labels != -100).sum())
            counts["tokens"] += labels.numel()
            counts["useful"] += useful
            yield useful

    return batches


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lmtrain bench data", description=__doc__.split("\n\n")[0])
    p.add_argument("--max-documents", type=int, default=None, help="corpus size (default: all of stdlib)")
    p.add_argument("--cache", default=str(REPO / "data" / "bench-stdlib"), help="where the corpus is built")
    p.add_argument("--tokenizer", default="byte")
    p.add_argument("--sequence-length", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=32, help="batches of one pass (default 32)")
    p.add_argument("--rounds", type=int, default=15, help="alternating rounds (default 15)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.batches < 1:
        raise UserError(f"--rounds and --batches must be >= 1, got {args.rounds} and {args.batches}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # before the tokenizer's first use
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
    counts = {name: {"tokens": 0, "useful": 0} for name in runs}
    streams = {name: pipeline(cfg, tokenizer, counts[name]) for name, cfg in runs.items()}
    print(
        f"B={args.batch_size} T={args.sequence_length}, num_workers=0; per pipeline and round the first "
        f"{args.batches} batches of a fresh loader, the pipelines alternating batch by batch; "
        f"TOKENIZERS_PARALLELISM={os.environ['TOKENIZERS_PARALLELISM']}"
    )
    result = interleave(streams, items=args.batches, rounds=args.rounds, unit="token")
    result.print_table("useful tokens/s", baseline="padded (parquet)")
    for name, c in counts.items():
        print(f"{name:<22} ignored positions {1 - c['useful'] / c['tokens']:6.2%}")
    print(
        result.headline(
            "packed (pretokenized)", "padded (parquet)", "pretokenized/padded useful tokens/s ratio"
        )
    )
    print(result.headline("packed (parquet)", "padded (parquet)", "packed/padded useful tokens/s ratio"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
