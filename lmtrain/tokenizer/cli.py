"""`lmtrain tokenizer`: train a byte-level BPE, encode and decode with it.

lmtrain tokenizer train --input corpus.txt --vocab-size 8192 --out tok/ --special-token '<|endoftext|>'
lmtrain tokenizer encode --tokenizer tok/ --text "def main(): pass"
lmtrain tokenizer decode --tokenizer tok/ --ids 1,2,3

`train` writes tok/tokenizer.json (Hugging Face format: `tokenizers.Tokenizer.from_file` and
`transformers.PreTrainedTokenizerFast(tokenizer_file=...)` load it) and GPT-2's tok/vocab.json and
tok/merges.txt.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lmtrain.errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse that reports mistakes as UserError (clean message, exit code 2) instead of exiting."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lmtrain tokenizer", description="Byte-level BPE: train, encode, decode.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a BPE on a UTF-8 text file")
    t.add_argument("--input", required=True, help="UTF-8 text file (documents separated by a special token)")
    t.add_argument("--vocab-size", required=True, type=int, help="total size: special tokens + 256 + merges")
    t.add_argument("--out", required=True, help="directory for tokenizer.json, vocab.json, merges.txt")
    t.add_argument(
        "--special-token",
        action="append",
        default=None,
        help="special token (repeatable); default: <|endoftext|>",
    )
    t.add_argument(
        "--workers", type=int, default=None, help="pre-tokenisation processes (default: all cores)"
    )

    e = sub.add_parser("encode", help="print the ids of a text")
    e.add_argument("--tokenizer", required=True, help="directory written by `train`, or a tokenizer.json")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="text to encode")
    src.add_argument("--file", help="UTF-8 file to encode (streamed)")

    d = sub.add_parser("decode", help="print the text of comma-separated ids")
    d.add_argument("--tokenizer", required=True, help="directory written by `train`, or a tokenizer.json")
    d.add_argument("--ids", required=True, help="comma-separated ids, e.g. 1,2,3")
    return p


def _parse_ids(text: str) -> list[int]:
    ids = []
    for k, part in enumerate(p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            ids.append(int(part))
        except ValueError:
            raise UserError(
                f"--ids: item {k} is {part!r}; expected comma-separated integers like 1,2,3"
            ) from None
    return ids


def main(argv: list[str]) -> int:
    from lmtrain.tokenizer import Tokenizer, train_bpe

    args = _parser().parse_args(argv)
    if args.command == "train":
        specials = ["<|endoftext|>"] if args.special_token is None else args.special_token
        if args.workers is not None and args.workers < 1:
            raise UserError(f"--workers {args.workers}: expected a positive number of processes")
        start = time.perf_counter()
        vocab, merges = train_bpe(args.input, args.vocab_size, specials, num_workers=args.workers)
        tok = Tokenizer(vocab, merges, specials)
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out}: exists and is not a directory; pass a directory path")
        out.mkdir(parents=True, exist_ok=True)
        path = tok.save(out / "tokenizer.json")
        tok.save_gpt2_files(out)
        print(
            f"trained {len(vocab)} tokens ({len(merges)} merges) on {args.input} in "
            f"{time.perf_counter() - start:.2f} s -> {path}, {out / 'vocab.json'}, {out / 'merges.txt'}"
        )
        return 0
    tok = Tokenizer.load(args.tokenizer)
    if args.command == "encode":
        if args.text is not None:
            ids = tok.encode(args.text)
        else:
            try:
                with open(args.file, encoding="utf-8", newline="") as fh:
                    ids = list(tok.encode_iterable(fh))
            except FileNotFoundError:
                raise UserError(f"--file {args.file}: no such file") from None
            except UnicodeDecodeError as exc:
                raise UserError(f"--file {args.file}: not valid UTF-8 ({exc.reason}); re-encode it") from None
        print(",".join(map(str, ids)))
        return 0
    print(tok.decode(_parse_ids(args.ids)))
    return 0
