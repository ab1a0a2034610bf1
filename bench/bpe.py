"""Byte-level BPE: lmtrain's trainer and tokenizer against Hugging Face `tokenizers`, in one run.

    lmtrain bench bpe --max-mb 8 --rounds 15

Corpus: the .py files of this Python's standard library (site-packages excluded), sorted by path,
joined with <|endoftext|> into a temporary file, the first `--max-mb` MB (default 8; 0: all, ~32 MB).
Both trainers learn a vocabulary of 8192 from that file (Hugging Face: BpeTrainer, ByteLevel
pre-tokenizer with the GPT-2 regex, the 256-byte initial alphabet, reading the file itself). They train
on one core each (lmtrain without worker processes, Hugging Face with TOKENIZERS_PARALLELISM=false), so
that the ratio compares work per core; on all cores the Hugging Face thread pool's wall time also
measures how free the other cores happen to be (`--parallel-training` trains that way). Encoding throughput is measured with
the tokenizer lmtrain trained, loaded into both libraries from its tokenizer.json, on the first
`--encode-mb` MB of documents (ours: one process; Hugging Face: `encode_batch`, all cores).

The acceptance check trains a vocabulary of 500 on 130 KB of English prose: the licence texts Debian
ships in /usr/share/common-licenses (GPL, LGPL, GFDL, Apache, MPL, Artistic, ...), concatenated in
name order, or the stdlib's comments and docstrings where that folder is missing. Training and
encoding alternate between the two libraries in rounds (`lmtrain.rounds`: per-round ratios, CPU time
of the process and its worker processes per byte beside wall time). The last line is the ratio of
training wall times, lmtrain over Hugging Face (target: <= 3), with its spread and CPU-time ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import sysconfig
import tempfile
import time
from pathlib import Path

EOT = "<|endoftext|>"
ENGLISH_BYTES = 130_000
LICENSES = Path("/usr/share/common-licenses")


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)


def write_stdlib_corpus(path: Path, max_bytes: int | None) -> tuple[int, int]:
    """Join stdlib sources with EOT into `path`; returns (files, bytes)."""
    n_files = written = 0
    with open(path, "w", encoding="utf-8") as out:
        for f in stdlib_files():
            try:
                text = f.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue  # a few test fixtures are deliberately not UTF-8
            piece = (EOT if n_files else "") + text
            size = len(piece.encode("utf-8"))
            if max_bytes is not None and written + size > max_bytes:
                break
            out.write(piece)
            written += size
            n_files += 1
    return n_files, written


def english_text() -> tuple[str, str]:
    """About 130 KB of real English prose and where it came from."""
    if LICENSES.is_dir():
        parts = []
        for p in sorted(LICENSES.iterdir()):
            if p.is_file() and not p.is_symlink():
                parts.append(p.read_text(encoding="utf-8", errors="replace"))
        text = "\n\n".join(parts)
        if len(text.encode()) >= ENGLISH_BYTES:
            raw = text.encode("utf-8")[:ENGLISH_BYTES]
            return raw.decode(
                "utf-8", errors="ignore"
            ), f"{LICENSES} (licence texts, first {ENGLISH_BYTES} bytes)"
    # Fallback: comments and docstrings of the standard library.
    import io
    import tokenize

    chunks, size = [], 0
    for f in stdlib_files():
        try:
            for tok in tokenize.generate_tokens(io.StringIO(f.read_text(encoding="utf-8")).readline):
                if tok.type == tokenize.COMMENT or (
                    tok.type == tokenize.STRING and tok.string.startswith('"""')
                ):
                    chunks.append(tok.string.strip("#\"' "))
                    size += len(chunks[-1].encode())
        except (SyntaxError, UnicodeDecodeError, tokenize.TokenError, OSError):
            continue
        if size >= ENGLISH_BYTES:
            break
    raw = "\n".join(chunks).encode("utf-8")[:ENGLISH_BYTES]
    return raw.decode("utf-8", errors="ignore"), "stdlib comments and docstrings"


def hf_train(path: Path, vocab_size: int, specials: list[str]):
    from lmtrain.data.tokenizers import hf_byte_level_bpe

    tok, trainer = hf_byte_level_bpe(vocab_size, specials)
    tok.train([str(path)], trainer)
    return tok


@contextlib.contextmanager
def tokenizers_parallelism(enabled: bool):
    """Hugging Face tokenizers reads TOKENIZERS_PARALLELISM at each parallel step: set it for a block."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if enabled else "false"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished children (pre-tokenising workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    import tokenizers

    from lmtrain.errors import UserError
    from lmtrain.rounds import compare
    from lmtrain.tokenizer import Tokenizer, train_bpe

    p = argparse.ArgumentParser(prog="lmtrain bench bpe", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--max-mb",
        type=float,
        default=8.0,
        help="use the first N MB of the stdlib corpus; 0: all (default 8)",
    )
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--encode-mb", type=float, default=4.0, help="MB of documents to time encoding on")
    p.add_argument(
        "--parallel-training",
        action="store_true",
        help="train on all cores (lmtrain: --workers processes, default one per core; Hugging Face: its "
        "thread pool) instead of one core each",
    )
    p.add_argument("--workers", type=int, default=None, help="lmtrain pre-tokenisation processes (parallel)")
    p.add_argument(
        "--rounds", type=int, default=15, help="alternating rounds of each comparison (default 15)"
    )
    args = p.parse_args(argv)
    if args.max_mb < 0:
        raise UserError(f"--max-mb {args.max_mb}: expected a size in MB, or 0 for the whole corpus")
    if args.workers is not None and not args.parallel_training:
        raise UserError("--workers applies to --parallel-training only (one core each by default)")

    cores = os.cpu_count()
    with tempfile.TemporaryDirectory(prefix="lmtrain-bench-bpe-") as tmp:
        tmp = Path(tmp)
        corpus = tmp / "stdlib.txt"
        max_bytes = None if args.max_mb == 0 else int(args.max_mb * 1e6)
        n_files, n_bytes = write_stdlib_corpus(corpus, max_bytes)
        print(
            f"corpus: {n_files} stdlib .py files, {n_bytes / 1e6:.1f} MB, vocab {args.vocab_size}, {cores} cores; "
            f"training on {'all cores' if args.parallel_training else 'one core each'}"
        )

        # Alternating rounds (lmtrain.rounds); CPU time includes the pre-tokenising worker processes.
        trained = {}

        workers = args.workers if args.parallel_training else 1

        def train_ours():
            trained["lmtrain"] = train_bpe(corpus, args.vocab_size, [EOT], num_workers=workers)
            return n_bytes

        def train_hf():
            with tokenizers_parallelism(args.parallel_training):
                trained["hf"] = hf_train(corpus, args.vocab_size, [EOT])
            return n_bytes

        training = compare(
            {"lmtrain": train_ours, "hf": train_hf}, rounds=args.rounds, unit="byte", warmup=0,
            cpu_clock=cpu_seconds,
        )  # fmt: skip
        training.print_table("BPE training", baseline="hf")
        vocab, merges = trained["lmtrain"]
        hf_tok = trained["hf"]
        hf_merges = hf_tok.get_vocab_size()
        print(f"       vocab sizes: lmtrain {len(vocab)}, hf {hf_merges}")

        ours = Tokenizer(vocab, merges, [EOT])
        ours.save(tmp / "tokenizer.json")
        hf_same = tokenizers.Tokenizer.from_file(str(tmp / "tokenizer.json"))
        docs, size = [], 0
        for doc in corpus.read_text(encoding="utf-8").split(EOT):
            docs.append(doc)
            size += len(doc.encode("utf-8"))
            if size >= args.encode_mb * 1e6:
                break
        encoded = {}

        def encode_ours():
            encoded["lmtrain"] = [ours.encode(d) for d in docs]
            return size

        def encode_hf():
            encoded["hf"] = [e.ids for e in hf_same.encode_batch(docs, add_special_tokens=False)]
            return size

        encoding = compare(
            {"lmtrain (1 process)": encode_ours, "hf (encode_batch)": encode_hf}, rounds=args.rounds,
            unit="byte", warmup=0,
        )  # fmt: skip
        encoding.print_table(f"encoding {size / 1e6:.1f} MB", baseline="hf (encode_batch)")
        same = encoded["lmtrain"] == encoded["hf"]
        print(f"identical ids: {'yes' if same else 'NO'}")

        text, source = english_text()
        english = tmp / "english.txt"
        english.write_text(text, encoding="utf-8")
        _, t_en = timed(train_bpe, english, 500, [EOT])
        _, t_en_hf = timed(hf_train, english, 500, [EOT])
        verdict = "PASS" if t_en < 1.5 else "FAIL"
        print(f"english: {len(text.encode()) / 1000:.0f} KB from {source}")
        print(f"english vocab 500: lmtrain {t_en:.2f} s (target < 1.5 s: {verdict}), hf {t_en_hf:.2f} s")
    # Time ratios (lmtrain over hf, lower is better): hf's rate over lmtrain's, round by round.
    print(training.headline("hf", "lmtrain", "lmtrain/hf bpe train time ratio"))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
