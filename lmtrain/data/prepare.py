"""`lmtrain prepare`: build a corpus directory (train/val parquet, tokenizer, optional token files).

    lmtrain prepare --source stdlib --out data/stdlib --tokenizer byte --pretokenize

Sources: `stdlib` (every .py file of the running Python's standard library, sorted, site-packages
excluded and test/ included: about 1,800 documents, 31 MB, identical for the same Python version), a
directory (`--glob`), a JSONL file (`--text-field`), a parquet file, or a text file split on
`--separator`. Documents are streamed; empty ones are skipped and counted, broken JSONL lines, non-UTF-8
bytes and missing fields are counted and reported with their first line numbers (`--strict` fails at the
first one). The validation split is chosen by a hash of each document's text, so it does not depend on
order or machine. Everything is built in a temporary directory renamed into place at the end: a failure
leaves nothing partial, and re-running with the same arguments on an unchanged source does nothing.

Output: `train.parquet`, `val.parquet` (column `text`), `tokenizer/` (save_pretrained layout),
`prepare.json` (arguments and counts) and, with --pretokenize, `{train,val}.tokens.bin` (uint16 when
the vocabulary fits, else uint32) + `.offsets.npy` + `.tokens.json`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lmtrain.atomic import share_directory
from lmtrain.data.sources import write_token_file
from lmtrain.data.tokenizers import (
    BOS,
    SPECIAL_TOKENS,
    hf_byte_level_bpe,
    load_tokenizer,
    tokenizer_fingerprint,
)
from lmtrain.errors import UserError
from lmtrain.log import Ticker
from lmtrain.runlock import DirectoryLock

ROWS_PER_GROUP = 1024
MAX_REPORTED_LINES = 5


@dataclass
class SourceStats:
    """What was read and what was skipped (with the first few line numbers or file names of each kind)."""

    documents: int = 0
    bytes: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    where: dict[str, list] = field(default_factory=dict)

    def skip(self, kind: str, location, strict: bool, message: str) -> None:
        if strict:
            raise UserError(f"{message} (--strict stops at the first bad record; drop it to skip and count)")
        self.skipped[kind] = self.skipped.get(kind, 0) + 1
        spots = self.where.setdefault(kind, [])
        if len(spots) < MAX_REPORTED_LINES:
            spots.append(location)

    def summary(self) -> str:
        parts = [
            f"{n} {kind} (first: {', '.join(map(str, self.where[kind]))})" for kind, n in self.skipped.items()
        ]
        return "skipped " + "; ".join(parts) if parts else "nothing skipped"


# --------------------------------------------------------------------------------------------------
# Sources: each yields document texts and records what it skipped.
# --------------------------------------------------------------------------------------------------


def stdlib_files() -> list[Path]:
    """The standard library's .py files, sorted by relative path; site-packages/dist-packages excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p
        for p in root.rglob("*.py")
        if p.is_file() and not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _text_or_skip(data: bytes, where, stats: SourceStats, strict: bool) -> str | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        stats.skip("non-UTF-8", where, strict, f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})")
        return None
    if not text.strip():
        stats.skip("empty", where, False, "")
        return None
    return text


def iter_files(files: list[Path], stats: SourceStats, strict: bool) -> Iterator[str]:
    for path in files:
        text = _text_or_skip(path.read_bytes(), path, stats, strict)
        if text is not None:
            yield text


def iter_jsonl(path: Path, text_field: str, stats: SourceStats, strict: bool) -> Iterator[str]:
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                stats.skip("non-UTF-8 lines", lineno, strict, f"{where}: not valid UTF-8 ({exc.reason})")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                stats.skip("malformed JSON lines", lineno, strict, f"{where}: not valid JSON ({exc.msg})")
                continue
            value = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(value, str):
                what = (
                    "has no"
                    if not isinstance(record, dict) or text_field not in record
                    else "has a non-string"
                )
                stats.skip(
                    f"lines without a string {text_field!r}",
                    lineno,
                    strict,
                    f"{where}: {what} field {text_field!r} (choose the field with --text-field)",
                )
                continue
            if not value.strip():
                stats.skip("empty", lineno, False, "")
                continue
            yield value


def iter_parquet(path: Path, column: str, stats: SourceStats, strict: bool) -> Iterator[str]:
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise UserError(f"{path} is not a readable parquet file: {exc}") from exc
    schema = pf.schema_arrow
    if column not in schema.names:
        raise UserError(
            f"parquet file {path} has no column {column!r}; its columns are {schema.names}. "
            f"Pass the text column with --text-field"
        )
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise UserError(
            f"column {column!r} of {path} holds {kind} values, expected strings (one document per row)"
        )
    row = 0
    for batch in pf.iter_batches(columns=[column], batch_size=ROWS_PER_GROUP):
        for value in batch.column(0).to_pylist():
            row += 1
            if value is None:
                stats.skip("null rows", row, strict, f"{path}: row {row} of column {column!r} is null")
            elif not value.strip():
                stats.skip("empty", row, False, "")
            else:
                yield value


def iter_separated(path: Path, separator: str, stats: SourceStats, strict: bool) -> Iterator[str]:
    """Split a text file on `separator` while streaming it in 4 MB chunks."""
    sep = separator.encode("utf-8")
    pending, index = b"", 0
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(1 << 22)
            pending += chunk
            parts = pending.split(sep)
            pending = parts.pop() if chunk else b""
            if not chunk:
                parts = parts + ([] if not pending else [pending])
            for part in parts:
                index += 1
                text = _text_or_skip(part, f"{path} document {index}", stats, strict)
                if text is not None:
                    yield text
            if not chunk:
                return


def open_source(args, stats: SourceStats) -> tuple[Iterator[str], dict]:
    """The document iterator of --source and a fingerprint that changes when the source does."""
    if args.source == "stdlib":
        files = stdlib_files()
        return iter_files(files, stats, args.strict), {"python": sys.version.split()[0], "files": len(files)}
    src = Path(args.source)
    if not src.exists():
        raise UserError(
            f"--source {src} does not exist: pass `stdlib`, a directory, a .jsonl, .parquet or text file"
        )
    if src.is_dir():
        files = sorted((p for p in src.glob(args.glob) if p.is_file()), key=lambda p: p.as_posix())
        if not files:
            raise UserError(f"--source directory {src} has no files matching --glob {args.glob!r}")
        fp = {"files": len(files), "bytes": sum(p.stat().st_size for p in files)}
        fp["mtime"] = max(p.stat().st_mtime_ns for p in files)
        return iter_files(files, stats, args.strict), fp
    st = src.stat()
    fp = {"bytes": st.st_size, "mtime": st.st_mtime_ns}
    if src.suffix == ".jsonl":
        return iter_jsonl(src, args.text_field, stats, args.strict), fp
    if src.suffix == ".parquet":
        return iter_parquet(src, args.text_field, stats, args.strict), fp
    return iter_separated(src, args.separator, stats, args.strict), fp


def in_val(text: str, fraction: float) -> bool:
    """Deterministic split: a document goes to val when a hash of its text falls below `fraction`."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2**64


# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------


def parquet_texts(path: Path) -> Iterator[str]:
    for batch in pq.ParquetFile(path).iter_batches(columns=["text"], batch_size=ROWS_PER_GROUP):
        yield from batch.column(0).to_pylist()


def build_tokenizer(spec: str, train_parquet: Path, impl: str, workdir: Path):
    """`byte`, `bpe:VOCAB` (trained on the train split) or a name/path passed to load_tokenizer."""
    if not spec.startswith("bpe:"):
        return load_tokenizer(spec)
    try:
        vocab_size = int(spec.split(":", 1)[1])
    except ValueError:
        raise UserError(f"--tokenizer {spec!r}: expected bpe:VOCAB with an integer vocabulary size") from None
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise UserError(f"--tokenizer {spec}: a byte-level BPE needs a vocabulary of at least 259")
    if impl == "lmtrain":
        from lmtrain.tokenizer import Tokenizer, train_bpe  # the project's own BPE, imported only when asked

        corpus = workdir / "bpe-corpus.txt"
        with open(corpus, "w", encoding="utf-8") as fh:
            for text in parquet_texts(
                train_parquet
            ):  # documents separated by a special token: no merges across
                fh.write(text)
                fh.write(BOS)
        vocab, merges = train_bpe(str(corpus), vocab_size, SPECIAL_TOKENS)
        Tokenizer(vocab, merges, SPECIAL_TOKENS).save(str(workdir / "bpe.json"))
        corpus.unlink()
        tok = load_tokenizer(str(workdir / "bpe.json"))
        _prepend_bos(tok.backend_tokenizer, tok.bos_token_id)
        return tok
    from transformers import PreTrainedTokenizerFast

    core, trainer = hf_byte_level_bpe(vocab_size, SPECIAL_TOKENS)
    core.train_from_iterator(_counted(parquet_texts(train_parquet), "counting words of"), trainer)
    _prepend_bos(core, core.token_to_id(BOS))
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token="</s>", pad_token="<pad>")


def _counted(texts: Iterator[str], doing: str) -> Iterator[str]:
    """`texts`, with a progress line every few seconds and one when they run out (the merges follow)."""
    ticker, n = Ticker(), 0
    for n, text in enumerate(texts, 1):
        if ticker.due():
            say(f"prepare: tokenizer: {doing} {n:,} documents ({ticker.elapsed():.0f} s)")
        yield text
    say(f"prepare: tokenizer: {n:,} documents read in {ticker.elapsed():.1f} s; computing the merges ...")


def _prepend_bos(core, bos_id: int) -> None:
    """Make `tokenizer(text)` start with BOS, as Llama-style tokenizers do (the pipelines add it themselves)."""
    from tokenizers import processors

    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )


def tokenize_split(parquet: Path, tokenizer, batch_docs: int = 256, label: str = "") -> Iterator:
    """Token ids per document; with a `label`, a progress line every few seconds."""
    texts: list[str] = []
    ticker, done = Ticker(), 0
    for text in parquet_texts(parquet):
        texts.append(text)
        if len(texts) == batch_docs:
            yield from tokenizer(texts, add_special_tokens=False)["input_ids"]
            done += len(texts)
            texts = []
            if label and ticker.due():
                say(f"prepare: {label}: {done:,} documents tokenized ({ticker.elapsed():.0f} s)")
    if texts:
        yield from tokenizer(texts, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lmtrain prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, help="stdlib, a directory, or a .jsonl/.parquet/text file")
    p.add_argument("--out", required=True, help="output directory, e.g. data/stdlib")
    p.add_argument(
        "--tokenizer", default="byte", help="byte, bpe:VOCAB, a hub name, directory or tokenizer.json"
    )
    p.add_argument("--bpe-impl", choices=["hf", "lmtrain"], default="hf", help="trainer used for bpe:VOCAB")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents in val.parquet")
    p.add_argument("--pretokenize", action="store_true", help="also write flat token files (fastest loading)")
    p.add_argument("--max-documents", type=int, default=None, help="stop after this many documents")
    p.add_argument("--glob", default="**/*", help="files of a directory source, e.g. '**/*.md'")
    p.add_argument("--text-field", default="text", help="JSONL field or parquet column holding the text")
    p.add_argument("--separator", default="<|endoftext|>", help="document separator of a text file source")
    p.add_argument("--strict", action="store_true", help="fail at the first bad record instead of skipping")
    p.add_argument("--force", action="store_true", help="rebuild even if --out is up to date")
    args = p.parse_args(argv)
    if not 0 <= args.val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.max_documents is not None and args.max_documents < 1:
        raise UserError(f"--max-documents must be >= 1, got {args.max_documents}")
    return args


def _progress(enabled: bool):
    if not enabled:
        return None
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]prepare"),
        BarColumn(),
        TextColumn("{task.completed} documents"),
        TextColumn("{task.fields[mb]:.1f} MB, {task.fields[rate]:.1f} MB/s"),
        TimeElapsedColumn(),
        transient=True,
    )


def prepare(args: argparse.Namespace, progress: bool | None = None) -> dict:
    """Build args.out (see the module docstring) under a lock; returns the prepare.json contents."""
    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file in the way, permissions
        raise UserError(f"--out {out}: cannot create the directory {out.parent} ({exc.strerror})") from exc
    # Two builds of one --out would both succeed and one would silently replace the other.
    with DirectoryLock(out.parent / f".{out.name}.lock", f"--out {out}"):
        return _prepare_locked(args, out, progress)


def _prepare_locked(args: argparse.Namespace, out: Path, progress: bool | None) -> dict:
    import time

    stats = SourceStats()
    docs, fingerprint = open_source(args, stats)
    recorded = {
        k: getattr(args, k)
        for k in ("source", "tokenizer", "bpe_impl", "val_fraction", "pretokenize", "max_documents", "glob")
    }
    recorded |= {k: getattr(args, k) for k in ("text_field", "separator", "strict")}
    recorded["source_fingerprint"] = fingerprint
    meta_path = out / "prepare.json"
    if meta_path.is_file() and not args.force:
        try:
            previous = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            previous = {}
        if previous.get("args") == recorded:
            previous["up_to_date"] = True
            return previous
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not meta_path.is_file())):
        raise UserError(
            f"--out {out} exists and was not written by `lmtrain prepare` (no prepare.json); it would be "
            f"replaced, so choose another --out or remove it yourself"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    share_directory(tmp)  # mkdtemp creates 0700; the corpus is meant to be shared
    try:
        info = _build(args, docs, stats, tmp, recorded, progress, time)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def _build(args, docs, stats: SourceStats, tmp: Path, recorded: dict, progress, time) -> dict:
    schema = pa.schema([("text", pa.string())])
    writers = {s: pq.ParquetWriter(tmp / f"{s}.parquet", schema) for s in ("train", "val")}
    rows: dict[str, list[str]] = {"train": [], "val": []}
    counts = {"train": 0, "val": 0}
    show = sys.stderr.isatty() if progress is None else progress
    bar = _progress(show)
    start = time.perf_counter()
    ticker = Ticker()  # without a terminal: a line every few seconds instead of the bar
    try:
        if bar is not None:
            bar.start()
            task = bar.add_task("prepare", total=args.max_documents, mb=0.0, rate=0.0)
        for text in docs:
            split = "val" if in_val(text, args.val_fraction) else "train"
            rows[split].append(text)
            counts[split] += 1
            stats.documents += 1
            stats.bytes += len(text.encode("utf-8", "surrogatepass"))
            if len(rows[split]) == ROWS_PER_GROUP:
                writers[split].write_table(pa.table({"text": rows[split]}, schema=schema))
                rows[split] = []
            if bar is not None and stats.documents % 16 == 0:
                mb = stats.bytes / 1e6
                bar.update(task, completed=stats.documents, mb=mb, rate=mb / (time.perf_counter() - start))
            elif bar is None and ticker.due():
                say(
                    f"prepare: read {stats.documents:,} documents, {stats.bytes / 1e6:.1f} MB ({ticker.elapsed():.0f} s)"
                )
            if args.max_documents is not None and stats.documents >= args.max_documents:
                break
    finally:
        if bar is not None:
            bar.stop()
        for split, writer in writers.items():
            if rows[split]:
                writer.write_table(pa.table({"text": rows[split]}, schema=schema))
            writer.close()
    if stats.documents == 0:
        raise UserError(
            f"--source {args.source} produced no documents ({stats.summary()}); nothing was written"
        )
    if counts["val"] == 0 and args.val_fraction > 0 and counts["train"] >= 2:
        # Too few documents for the hash to pick any: move the last train document so val is never empty.
        train = pq.read_table(tmp / "train.parquet")
        pq.write_table(train.slice(train.num_rows - 1), tmp / "val.parquet")
        pq.write_table(train.slice(0, train.num_rows - 1), tmp / "train.parquet")
        counts = {"train": counts["train"] - 1, "val": 1}
    if counts["val"] == 0:
        (tmp / "val.parquet").unlink()
    say(
        f"prepare: read {stats.documents:,} documents, {stats.bytes / 1e6:.1f} MB in {ticker.elapsed():.1f} s"
    )
    if args.tokenizer.startswith("bpe:"):
        say(f"prepare: training the {args.tokenizer} tokenizer ({args.bpe_impl}) on the train split ...")
    t_tok = time.perf_counter()
    tokenizer = build_tokenizer(args.tokenizer, tmp / "train.parquet", args.bpe_impl, tmp)
    tokenizer.save_pretrained(str(tmp / "tokenizer"))
    if args.tokenizer.startswith("bpe:"):
        say(f"prepare: tokenizer trained in {time.perf_counter() - t_tok:.1f} s")
    for leftover in ("bpe.json",):
        (tmp / leftover).unlink(missing_ok=True)
    info = {
        "args": recorded,
        "documents": counts,
        "bytes": stats.bytes,
        "skipped": stats.skipped,
        "skipped_where": {k: [str(x) for x in v] for k, v in stats.where.items()},
        "vocab_size": len(tokenizer),
    }
    if args.pretokenize:
        info["tokens"] = {}
        for split in ("train", "val"):
            if counts[split]:
                t_split = time.perf_counter()
                say(f"prepare: tokenizing the {split} split ({counts[split]:,} documents) ...")
                meta = write_token_file(
                    tmp / split,
                    tokenize_split(tmp / f"{split}.parquet", tokenizer, label=split),
                    len(tokenizer),
                    {"tokenizer_fingerprint": tokenizer_fingerprint(tokenizer)},
                )
                info["tokens"][split] = meta["num_tokens"]
                say(
                    f"prepare: {split}: {meta['num_tokens']:,} tokens in {time.perf_counter() - t_split:.1f} s"
                )
    (tmp / "prepare.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def say(line: str) -> None:
    """A progress line on stderr, flushed at once (stdout carries the result)."""
    print(line, file=sys.stderr, flush=True)


def _swap_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    info = prepare(args)
    if info.get("up_to_date"):
        print(f"{args.out} is up to date (same arguments and source; --force rebuilds it)")
        return 0
    docs = info["documents"]
    line = f"{args.out}: {docs['train']} train + {docs['val']} val documents, {info['bytes'] / 1e6:.1f} MB"
    if "tokens" in info:
        line += ", tokens " + ", ".join(f"{k} {v:,}" for k, v in info["tokens"].items())
    print(line)
    skipped = SourceStats(skipped=info["skipped"], where=info["skipped_where"]).summary()
    print(f"vocabulary {info['vocab_size']}; {skipped}")
    return 0
