"""`lmtrain data`: look at a dataset the way the training loop will see it.

    lmtrain data stats --dataset data/stdlib --tokenizer byte --sequence-length 4096 --batch-size 32
    lmtrain data show --dataset data/stdlib --index 0 --tokens 200

`stats` runs both pipelines over the train split and reports, per batch, how many of the B x T tokens
are padding (ignored by the loss) and how many are ignored in all (padding plus masked BOS labels).
`show` prints the first tokens of one training sample of the packed pipeline, decoded.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from typing import TYPE_CHECKING

from lmtrain.errors import UserError
from lmtrain.log import Ticker

if TYPE_CHECKING:
    from lmtrain.config import DataConfig


def pipeline_stats(cfg: DataConfig, tokenizer, max_batches: int, seed: int = 0) -> dict:
    """Padding and ignored-label counts over the first `max_batches` batches of one finite pass."""
    from lmtrain.data.loader import build_dataloader

    loader = build_dataloader(cfg, tokenizer, "train", seed=seed)
    batches = tokens = padding = ignored = 0
    ticker = Ticker()
    for batch in itertools.islice(loader, max_batches):
        if ticker.due():
            print(f"data stats: {cfg.pipeline}: {batches}/{max_batches} batches ({ticker.elapsed():.0f} s)",
                  file=sys.stderr, flush=True)  # fmt: skip
        x, y = batch["input_ids"], batch["labels"]
        batches += 1
        tokens += x.numel()
        ignored += int((y == -100).sum())
        if cfg.pipeline == "padded":
            padding += int((y == -100).sum())  # every ignored label of the padded pipeline is padding
        else:
            padding += int(((y == -100) & (x != tokenizer.bos_token_id)).sum())
    return {"batches": batches, "tokens": tokens, "padding": padding, "ignored": ignored}


def cmd_stats(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from lmtrain.config import DataConfig
    from lmtrain.data.tokenizers import resolve_tokenizer

    base = dict(dataset=args.dataset, tokenizer=args.tokenizer, sequence_length=args.sequence_length)
    cfg = DataConfig(**base, batch_size=args.batch_size)
    tokenizer = resolve_tokenizer(cfg)
    table = Table(title=f"{args.dataset}: B={args.batch_size}, T={args.sequence_length}")
    for col in ("pipeline", "batches", "tokens/batch", "padding/batch", "padding", "ignored"):
        table.add_column(col, justify="left" if col == "pipeline" else "right")
    for pipeline in ("padded", "packed"):
        print(f"data stats: {pipeline}: reading {args.batches} batches ...", file=sys.stderr, flush=True)
        s = pipeline_stats(
            DataConfig(**base, batch_size=args.batch_size, pipeline=pipeline), tokenizer, args.batches
        )
        n = max(s["batches"], 1)
        table.add_row(
            pipeline,
            str(s["batches"]),
            f"{s['tokens'] / n:,.0f}",
            f"{s['padding'] / n:,.0f}",
            f"{s['padding'] / max(s['tokens'], 1):.2%}",
            f"{s['ignored'] / max(s['tokens'], 1):.2%}",
        )
    Console(width=max(Console().width, 100)).print(table)
    print("padding: share of tokens that are padding; ignored: share with label -100 (padding + BOS masks)")
    return 0


def cmd_show(args) -> int:
    from rich.console import Console

    from lmtrain.config import DataConfig
    from lmtrain.data.loader import build_dataloader
    from lmtrain.data.tokenizers import resolve_tokenizer

    cfg = DataConfig(dataset=args.dataset, tokenizer=args.tokenizer, sequence_length=args.sequence_length)
    tokenizer = resolve_tokenizer(cfg)
    loader = build_dataloader(cfg, tokenizer, args.split, seed=args.seed)
    if loader is None:
        raise UserError(f"dataset {args.dataset} has no {args.split} split")
    batch = next(itertools.islice(loader, args.index, None), None)
    if batch is None:
        raise UserError(f"--index {args.index} is past the end of the {args.split} split of {args.dataset}")
    ids = batch["input_ids"][0, : args.tokens].tolist()
    console = Console()
    console.print(f"[bold]sample {args.index}[/bold] ({len(ids)} of {cfg.sequence_length} tokens): {ids}")
    console.print(tokenizer.decode(ids), markup=False, highlight=False)
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lmtrain data", description=__doc__.split("\n\n")[0])
    from lmtrain.arguments import ShowDefaults

    defaults = {"formatter_class": ShowDefaults}
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_text in (("stats", "padding and ignored tokens per batch"), ("show", "decode one sample")):
        s = sub.add_parser(name, help=help_text, description=help_text, **defaults)
        s.add_argument("--dataset", required=True, help="prepared directory, parquet, JSONL or .tokens.bin")
        s.add_argument("--tokenizer", default="", help="default: the one saved beside the dataset")
        s.add_argument("--sequence-length", type=int, default=4096, help="tokens per sample (T)")
    stats = sub.choices["stats"]
    stats.add_argument("--batch-size", type=int, default=32, help="samples per batch (B)")
    stats.add_argument("--batches", type=int, default=20, help="batches measured per pipeline")
    show = sub.choices["show"]
    show.add_argument("--index", type=int, default=0, help="sample number (batch size 1, unshuffled for val)")
    show.add_argument("--tokens", type=int, default=200, help="how many tokens of the sample to print")
    show.add_argument("--split", choices=["train", "val"], default="train", help="which split to read")
    show.add_argument("--seed", type=int, default=0, help="shuffling seed of the train split")
    args = p.parse_args(argv)
    if args.command == "stats":
        if args.batches < 1:
            raise UserError(f"--batches must be >= 1, got {args.batches}")
        return cmd_stats(args)
    if args.index < 0 or args.tokens < 1:
        raise UserError("--index must be >= 0 and --tokens >= 1")
    return cmd_show(args)
