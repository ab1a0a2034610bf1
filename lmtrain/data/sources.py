"""Random-access document sources: parquet, JSONL and pre-tokenized token files.

Each source has `len(source)` documents and `source.documents(indices)` -> one 1-D int64 numpy array of
token ids per index (no BOS/EOS added; the datasets add separators). Text sources tokenize on demand in
batches, so that the Rust tokenizer can use every core.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from lmtrain.atomic import shared_file_mode
from lmtrain.errors import UserError

TOKENS_SUFFIX, OFFSETS_SUFFIX, META_SUFFIX = ".tokens.bin", ".offsets.npy", ".tokens.json"


def atomic_write_bytes(path: Path, write) -> None:
    """Call `write(fh)` on a temp file beside `path`, then rename it over `path` (no partial file)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.chmod(tmp, shared_file_mode())  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _encode(tokenizer, texts: list[str]) -> list[np.ndarray]:
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [np.asarray(x, dtype=np.int64) for x in ids]


class ParquetTexts:
    """Documents from the text column of a parquet file, tokenized when they are requested."""

    def __init__(self, path: str | os.PathLike, tokenizer, column: str = "text"):
        self.path, self.tokenizer = Path(path), tokenizer
        self.column = read_parquet_column(self.path, column)

    def __len__(self) -> int:
        return len(self.column)

    def texts(self, indices) -> list[str]:
        return self.column.take(np.asarray(indices, dtype=np.int64)).to_pylist()

    def documents(self, indices) -> list[np.ndarray]:
        return _encode(self.tokenizer, self.texts(indices))


def read_parquet_column(path: Path, column: str = "text"):
    """The string column `column` of a parquet file, checked; the error lists the columns that exist."""
    import pyarrow as pa

    if not path.is_file():
        raise UserError(f"parquet file {path} does not exist")
    try:
        schema = pq.read_schema(path)
    except Exception as exc:
        raise UserError(f"{path} is not a readable parquet file: {exc}") from exc
    if column not in schema.names:
        raise UserError(
            f"parquet file {path} has no column {column!r}; its columns are {schema.names}. "
            f"Training reads the column {column!r}: rename the text column, or build a dataset directory "
            f"with `lmtrain prepare --source {path} --text-field NAME --out DIR` and train on DIR"
        )
    if not (
        pa.types.is_string(schema.field(column).type) or pa.types.is_large_string(schema.field(column).type)
    ):
        raise UserError(
            f"column {column!r} of {path} holds {schema.field(column).type}, expected strings (one document per row)"
        )
    col = pq.read_table(path, columns=[column]).column(column).combine_chunks()
    if col.null_count:
        raise UserError(
            f"column {column!r} of {path} has {col.null_count} null values; expected a string per row"
        )
    return col


class JsonlDataset:
    """Random access into a JSONL file through an index of line byte offsets.

    The index (non-blank lines only) is built once with a vectorised newline scan and cached beside the
    file as `<file>.index.npy` (written atomically; rebuilt when the file's size or mtime changes).
    Lines are parsed and tokenized only when requested; a broken line raises a UserError naming it.
    """

    def __init__(self, path: str | os.PathLike, tokenizer=None, text_field: str = "text"):
        self.path, self.tokenizer, self.text_field = Path(path), tokenizer, text_field
        if not self.path.is_file():
            raise UserError(f"JSONL file {self.path} does not exist")
        self.index = self._load_or_build_index()  # (N, 3) int64: byte start, byte end, 1-based line
        self._fh = None

    @property
    def index_path(self) -> Path:
        return self.path.with_name(self.path.name + ".index.npy")

    def _load_or_build_index(self) -> np.ndarray:
        st = self.path.stat()
        stamp = np.array([[st.st_size, st.st_mtime_ns, -1]], dtype=np.int64)
        try:
            cached = np.load(self.index_path)
            if cached.ndim == 2 and cached.shape[1] == 3 and (cached[0] == stamp[0]).all():
                return cached[1:]
        except (OSError, ValueError):
            pass
        index = build_line_index(self.path)
        try:
            atomic_write_bytes(self.index_path, lambda fh: np.save(fh, np.concatenate([stamp, index])))
        except OSError:
            pass  # a read-only directory only costs rebuilding the index next time
        return index

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self):  # DataLoader workers reopen the file instead of sharing a handle
        return {**self.__dict__, "_fh": None}

    def text(self, i: int) -> str:
        if self._fh is None:
            self._fh = open(self.path, "rb")
        start, end, line = (int(x) for x in self.index[i])
        self._fh.seek(start)
        raw = self._fh.read(end - start)
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise UserError(
                f"{self.path}:{line}: not valid UTF-8 ({exc.reason} at byte {exc.start})"
            ) from exc
        except json.JSONDecodeError as exc:
            raise UserError(
                f"{self.path}:{line}: not valid JSON ({exc.msg}); fix or remove the line"
            ) from exc
        if not isinstance(record, dict) or not isinstance(record.get(self.text_field), str):
            raise UserError(f"{self.path}:{line}: expected an object with a string field {self.text_field!r}")
        return record[self.text_field]

    def texts(self, indices) -> list[str]:
        return [self.text(int(i)) for i in indices]

    def documents(self, indices) -> list[np.ndarray]:
        assert self.tokenizer is not None, "JsonlDataset needs a tokenizer to return tokens"
        return _encode(self.tokenizer, self.texts(indices))


def build_line_index(path: Path, chunk_bytes: int = 1 << 24) -> np.ndarray:
    """(N, 3) int64 rows (start byte, end byte without newline, 1-based line number) of non-blank lines."""
    newlines = []
    with open(path, "rb") as fh:
        base = 0
        while chunk := fh.read(chunk_bytes):
            newlines.append(np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10) + base)
            base += len(chunk)
    ends = np.concatenate(newlines + [np.array([base], dtype=np.int64)]).astype(np.int64)
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    lines = np.arange(1, len(ends) + 1, dtype=np.int64)
    keep = ends - starts > 0
    keep &= ~((ends - starts == 1) & (_bytes_at(path, starts) == 13))  # a lone "\r" is blank too
    return np.stack([starts[keep], ends[keep], lines[keep]], axis=1)


def _bytes_at(path: Path, positions: np.ndarray) -> np.ndarray:
    if len(positions) == 0 or path.stat().st_size == 0:
        return np.zeros(len(positions), dtype=np.uint8)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    return data[np.minimum(positions, len(data) - 1)]


class TokenFile:
    """A pre-tokenized split: `<stem>.tokens.bin` (flat uint16/uint32 ids), `<stem>.offsets.npy` (N+1
    document boundaries) and `<stem>.tokens.json` (dtype, counts). The tokens are memory-mapped."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        stem = str(path)[: -len(TOKENS_SUFFIX)] if str(path).endswith(TOKENS_SUFFIX) else str(path)
        self.path = Path(stem + TOKENS_SUFFIX)
        meta_path, offsets_path = Path(stem + META_SUFFIX), Path(stem + OFFSETS_SUFFIX)
        for p in (self.path, meta_path, offsets_path):
            if not p.is_file():
                raise UserError(
                    f"pre-tokenized dataset {self.path} is incomplete: {p} does not exist (written by "
                    f"`lmtrain prepare --pretokenize`, which produces .tokens.bin, .offsets.npy and .tokens.json)"
                )
        self.meta = json.loads(meta_path.read_text())
        self.tokens = np.memmap(self.path, dtype=np.dtype(self.meta["dtype"]), mode="r")
        self.offsets = np.load(offsets_path)
        if self.offsets[-1] != len(self.tokens):
            raise UserError(
                f"{offsets_path} does not match {self.path}: re-run `lmtrain prepare --pretokenize`"
            )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def documents(self, indices) -> list[np.ndarray]:
        off = self.offsets
        return [self.tokens[off[i] : off[i + 1]] for i in indices]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def write_token_file(stem: Path, docs, vocab_size: int, extra_meta: dict | None = None) -> dict:
    """Write an iterable of 1-D int arrays as a token file (each part atomically); returns the meta."""
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
    offsets = [0]

    def write_tokens(fh):
        for doc in docs:
            arr = np.asarray(doc, dtype=dtype)
            fh.write(arr.tobytes())
            offsets.append(offsets[-1] + len(arr))

    stem = Path(stem)
    atomic_write_bytes(Path(str(stem) + TOKENS_SUFFIX), write_tokens)
    off = np.asarray(offsets, dtype=np.int64)
    atomic_write_bytes(Path(str(stem) + OFFSETS_SUFFIX), lambda fh: np.save(fh, off))
    meta = {
        "dtype": np.dtype(dtype).name,
        "vocab_size": int(vocab_size),
        "num_tokens": int(off[-1]),
        "num_documents": len(off) - 1,
        **(extra_meta or {}),
    }
    data = (json.dumps(meta, indent=2) + "\n").encode()
    atomic_write_bytes(Path(str(stem) + META_SUFFIX), lambda fh: fh.write(data))
    return meta


def open_split(dataset: str, split: str, tokenizer, prefer_tokens: bool = True):
    """The document source of `split` in `dataset`, or None when the dataset has no such split.

    A directory from `lmtrain prepare` has `train`/`val` splits (pre-tokenized files are used when present
    and `prefer_tokens`); a single parquet, JSONL or token file is a train split only.
    """
    path = Path(dataset)
    if path.is_dir():
        tok_stem = path / split
        if prefer_tokens and Path(str(tok_stem) + TOKENS_SUFFIX).is_file():
            return TokenFile(tok_stem)
        parquet = path / f"{split}.parquet"
        if parquet.is_file():
            return ParquetTexts(parquet, tokenizer)
        if split == "train":
            raise UserError(
                f"dataset directory {path} has no train.parquet (nor train{TOKENS_SUFFIX}); build it with "
                f"`lmtrain prepare --source ... --out {path}`"
            )
        return None
    if not path.exists():
        raise UserError(
            f"dataset {path} does not exist: pass a directory written by `lmtrain prepare`, a parquet, "
            f"JSONL or .tokens.bin file (data.dataset / --dataset)"
        )
    if split != "train":
        return None
    name = path.name
    if name.endswith(".parquet"):
        return ParquetTexts(path, tokenizer)
    if name.endswith((".jsonl", ".json")):
        return JsonlDataset(path, tokenizer)
    if name.endswith(TOKENS_SUFFIX):
        return TokenFile(path)
    raise UserError(
        f"dataset {path}: unknown file type; expected .parquet, .jsonl or {TOKENS_SUFFIX} (or a directory "
        f"written by `lmtrain prepare`)"
    )
