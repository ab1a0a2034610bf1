"""Datasets: the packed token stream, the course's padded baseline, and nanoGPT-style random windows.

Packed layout (no padding at all). Each shard sees its documents as one stream
`BOS d0 BOS d1 BOS d2 ...` and cuts it into samples of T tokens *with carry*: sample k has
`input = stream[kT : kT + T]` and `labels = stream[kT + 1 : kT + T + 1]`, so the last label of one sample
is the first input of the next and no token is dropped. Labels are -100 where the input is a BOS
separator (`mask_bos_labels`): the first token of a document is not predicted from the previous one.

Rows of a batch. Cut naively, the B rows of a batch are B consecutive samples of the stream, so a small
batch holds one or two documents and successive gradients are strongly correlated. With
`interleave = K > 1` (training only) the stream is read in blocks of K batches (K * B samples) and batch j
of a block takes samples j, j + K, j + 2K, ...: its rows lie K samples apart in the stream and so, for
K * T beyond the typical document length, come from different documents. Every sample is still used
once, in a deterministic order, and resume stays exact (the state is the block's start and the batch
index in it).
"""

from __future__ import annotations

import collections

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from lmtrain.errors import UserError

IGNORE = -100


def epoch_order(num_docs: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The document order of one epoch: a fresh permutation per (seed, epoch), identical on every rank."""
    if not shuffle:
        return np.arange(num_docs, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(num_docs)


class PackedDataset(IterableDataset):
    """Documents packed into (B, T) batches with BOS separators, sharded by rank and DataLoader worker.

    Shard `s = rank * num_workers + worker` of `world_size * num_workers` takes every num_shards-th
    document of the epoch's order, so each document is used exactly once per epoch across all shards.
    `infinite=True` (training) continues the stream into the next epoch (reshuffled); `infinite=False`
    makes one deterministic pass whose last sample is padded (labels -100) and last batch may be short.
    `interleave` (training only) spreads each batch's rows over a block of that many batches.

    Iterating yields dicts with `input_ids`, `labels` (B, T) int64, `doc_ids` (B, T) when
    `document_ids`, and `_worker`/`_state` that `PackedLoader` strips to resume exactly.
    """

    def __init__(
        self,
        source,
        *,
        sequence_length: int,
        batch_size: int,
        bos_id: int,
        pad_id: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        infinite: bool = True,
        mask_bos_labels: bool = True,
        document_ids: bool = False,
        interleave: int = 1,
        docs_per_fetch: int = 64,
    ):
        if sequence_length < 2:
            raise UserError(f"sequence_length must be >= 2 (input and label), got {sequence_length}")
        if interleave < 1:
            raise UserError(f"data.interleave must be >= 1 (1: rows are consecutive samples), got {interleave}")
        assert 0 <= rank < world_size
        self.source, self.T, self.B = source, sequence_length, batch_size
        self.bos_id, self.pad_id = bos_id, pad_id
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle, self.infinite = shuffle, infinite
        self.mask_bos_labels, self.document_ids = mask_bos_labels, document_ids
        self.docs_per_fetch = docs_per_fetch
        self.interleave = interleave if infinite else 1
        # Resume: per logical worker, the stream position of its next block and the batch index in it;
        # and the worker rotation that makes DataLoader worker 0 produce the batch that is due next (see
        # PackedLoader).
        self.worker_states: list[dict] | None = None
        self.worker_offset = 0

    def _shard(self) -> tuple[int, int, int]:
        info = get_worker_info()
        num_workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        logical = (worker + self.worker_offset) % num_workers
        shard = self.rank * num_workers + logical
        num_shards = self.world_size * num_workers
        if len(self.source) < num_shards:
            raise UserError(
                f"the dataset has {len(self.source)} documents, fewer than the {num_shards} shards "
                f"(world_size {self.world_size} x num_workers {num_workers}); use fewer workers or more data"
            )
        return logical, shard, num_shards

    def shard_documents(self, epoch: int, shard: int, num_shards: int) -> np.ndarray:
        return epoch_order(len(self.source), self.seed, epoch, self.shuffle)[shard::num_shards]

    def __iter__(self):
        logical, shard, num_shards = self._shard()
        state = {"epoch": 0, "doc": 0, "offset": 0, "batch": 0}
        if self.worker_states is not None:
            state = {"batch": 0, **self.worker_states[logical]}
        epoch, doc, offset, skip = state["epoch"], state["doc"], state["offset"], state["batch"]
        K, B, T = self.interleave, self.B, self.T
        assert 0 <= skip < K, f"batch index {skip} outside a block of {K}"
        block_state = {"epoch": epoch, "doc": doc, "offset": offset}
        need = K * B * T + 1
        buf = np.empty(0, dtype=np.int64)
        base = 0  # stream position of buf[0], counted from the start of this iteration
        # Where each fetched document starts: (stream position, epoch, doc position, offset of that
        # position inside the document's BOS + tokens segment), to turn a stream position into a state.
        segs: collections.deque[tuple[int, int, int, int]] = collections.deque()
        docs = self.shard_documents(epoch, shard, num_shards)
        yielded_this_epoch = doc > 0 or offset > 0
        while True:
            while len(buf) < need:
                if doc >= len(docs):
                    if not self.infinite:
                        break
                    if not yielded_this_epoch:
                        what = "one batch" if K == 1 else f"one block of {K} interleaved batches"
                        raise UserError(
                            f"{what} needs {need} tokens (data.interleave {K} x batch_size {B} x "
                            f"sequence_length {T} + 1) but shard {shard}/{num_shards} of the dataset holds only "
                            f"{len(buf)} in a whole epoch; lower data.interleave, data.batch_size or "
                            f"data.sequence_length, use fewer workers, or use more data"
                        )
                    epoch, doc, yielded_this_epoch = epoch + 1, 0, False
                    docs = self.shard_documents(epoch, shard, num_shards)
                    continue
                take = docs[doc : doc + self.docs_per_fetch]
                fetched = self.source.documents(take)
                grown = np.empty(len(buf) + sum(len(t) + 1 for t in fetched) - offset, dtype=np.int64)
                grown[: len(buf)] = buf
                pos = len(buf)
                for j, toks in enumerate(fetched):  # one copy: BOS and tokens straight into place
                    skip_tokens = offset if j == 0 else 0
                    segs.append((base + pos, epoch, doc + j, skip_tokens))
                    if skip_tokens == 0:
                        grown[pos] = self.bos_id
                        grown[pos + 1 : pos + 1 + len(toks)] = toks
                        pos += len(toks) + 1
                    else:  # resuming inside this document
                        rest = toks[skip_tokens - 1 :]
                        grown[pos : pos + len(rest)] = rest
                        pos += len(rest)
                assert pos == len(grown)
                buf, offset, doc = grown, 0, doc + len(take)
            if len(buf) < need:  # finite pass: the tail becomes one padded, partial batch
                if len(buf) >= 2:
                    yield self._partial_batch(buf, logical)
                return
            block = buf[:need]
            consumed = K * B * T
            buf, base = buf[consumed:], base + consumed
            # The stream position of buf[0] (the first input of the next block), for exact resume.
            while len(segs) > 1 and segs[1][0] <= base:
                segs.popleft()
            s0, e0, d0, o0 = segs[0]
            next_block_state = {"epoch": e0, "doc": d0, "offset": o0 + base - s0}
            yielded_this_epoch = True
            for j in range(skip, K):
                # Row r of batch j is sample r * K + j of the block: (B, T + 1) tokens, with carry.
                after = {**next_block_state, "batch": 0} if j + 1 == K else {**block_state, "batch": j + 1}
                yield self._batch(block, (np.arange(B) * K + j) * T, logical, after)
            skip, block_state = 0, next_block_state

    def _batch(
        self, tokens: np.ndarray, starts: np.ndarray, logical: int, state: dict | None, valid: int = -1
    ) -> dict:
        """Inputs and labels of the rows tokens[s : s + T + 1] for s in `starts` (with carry: the last label
        of a row is the first input of a sample that starts T later); labels past flat position `valid`
        of the (R, T) labels are ignored."""
        rows = tokens[starts[:, None] + np.arange(self.T + 1)[None, :]]  # (R, T + 1)
        window = torch.from_numpy(rows)
        inputs = window[:, :-1].clone()  # (B, T)
        labels = window[:, 1:].clone()  # (B, T)
        if valid >= 0:
            labels.view(-1)[valid:] = IGNORE
        is_bos = inputs == self.bos_id
        if self.mask_bos_labels:
            labels[is_bos] = IGNORE
        out = {"input_ids": inputs, "labels": labels}
        if self.document_ids:
            count = is_bos.long().cumsum(dim=1)  # (B, T)
            out["doc_ids"] = count - count[:, :1]
        out["_worker"] = logical
        if state is not None:
            out["_state"] = state
        return out

    def _partial_batch(self, buf: np.ndarray, logical: int) -> dict:
        T = self.T
        n_rows = -(-(len(buf) - 1) // T)
        window = np.full(n_rows * T + 1, self.pad_id, dtype=np.int64)
        window[: len(buf)] = buf
        return self._batch(window, np.arange(n_rows) * T, logical, None, valid=len(buf) - 1)


# --------------------------------------------------------------------------------------------------
# The course's padded baseline: one document per sample, padded to sequence_length + 1.
# --------------------------------------------------------------------------------------------------


class PaddedDocuments(Dataset):
    """Map-style: item i is `[BOS] + tokens(doc i)`, truncated and padded to sequence_length + 1."""

    def __init__(self, source, sequence_length: int, bos_id: int, pad_id: int):
        if sequence_length < 2:
            raise UserError(f"sequence_length must be >= 2 (input and label), got {sequence_length}")
        self.source, self.sequence_length = source, sequence_length
        self.bos_id, self.pad_id = bos_id, pad_id

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, idx: int) -> dict:
        toks = self.source.documents([idx])[0][: self.sequence_length]
        ids = np.full(self.sequence_length + 1, self.pad_id, dtype=np.int64)
        ids[0] = self.bos_id
        ids[1 : 1 + len(toks)] = toks
        return {"input_ids": torch.from_numpy(ids), "length": 1 + len(toks)}


class ParquetDataset(PaddedDocuments):
    """The course's dataset: documents of a parquet `text` column, each padded to sequence_length + 1."""

    def __init__(
        self, parquet_file: str, tokenizer, sequence_length: int, training_samples: int | None = None
    ):
        from lmtrain.data.sources import ParquetTexts

        super().__init__(
            ParquetTexts(parquet_file, tokenizer),
            sequence_length,
            tokenizer.bos_token_id,
            tokenizer.pad_token_id,
        )
        self.training_samples = training_samples

    def __len__(self) -> int:
        # The course repeats the file to reach `training_samples`; by default one pass.
        return self.training_samples or len(self.source)

    def __getitem__(self, idx: int) -> dict:
        return super().__getitem__(idx % len(self.source))


class CollatorForCLM:
    """Stack padded items into inputs/labels shifted by one; labels are -100 on padding.

    Padding is recognised by position (`length` of each item), not by value, so a tokenizer whose PAD
    equals EOS still learns to predict EOS where it is real text.
    """

    def __init__(self, sequence_length: int, pad_token_id: int):
        self.sequence_length, self.pad_token_id = sequence_length, pad_token_id

    def __call__(self, examples: list[dict]) -> dict:
        ids = torch.stack([ex["input_ids"] for ex in examples])  # (B, T + 1)
        assert ids.shape[1] == self.sequence_length + 1
        inputs, labels = ids[:, :-1].clone(), ids[:, 1:].clone()  # (B, T)
        lengths = torch.tensor([ex["length"] for ex in examples])  # (B,)
        positions = torch.arange(1, self.sequence_length + 1)  # label j is token j + 1
        labels[positions[None, :] >= lengths[:, None]] = IGNORE
        return {"input_ids": inputs, "labels": labels}


# --------------------------------------------------------------------------------------------------
# nanoGPT-style random windows over one flat token array.
# --------------------------------------------------------------------------------------------------


def _check_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UserError(f"invalid device {device!r}: expected 'cpu', 'cuda', 'cuda:N' or 'mps'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but CUDA is not available on this machine; use 'cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"device {device!r}: only {torch.cuda.device_count()} CUDA devices are visible")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {device!r} requested but MPS is not available; use 'cpu'")
    return dev


def get_batch(
    tokens: np.ndarray,
    batch_size: int,
    context_length: int,
    device: str | torch.device = "cpu",
    generator: np.random.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_size` uniformly random windows of `tokens` (1-D, may be a memmap): inputs and next tokens."""
    dev = _check_device(device)
    if tokens.ndim != 1:
        raise UserError(f"get_batch expects a 1-D token array, got shape {tokens.shape}")
    if len(tokens) < context_length + 1:
        raise UserError(
            f"the token array has {len(tokens)} tokens, too few for one window of context_length "
            f"{context_length} + 1"
        )
    rng = generator if generator is not None else np.random.default_rng()
    starts = rng.integers(0, len(tokens) - context_length, size=batch_size)  # (B,)
    idx = starts[:, None] + np.arange(context_length + 1)[None, :]  # (B, T + 1)
    window = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
    x, y = window[:, :-1], window[:, 1:]
    if dev.type == "cuda":
        return x.pin_memory().to(dev, non_blocking=True), y.pin_memory().to(dev, non_blocking=True)
    return x.to(dev), y.to(dev)


class RandomWindowDataset(IterableDataset):
    """Endless random (B, T) windows of a memory-mapped token file, nanoGPT-style (no epochs)."""

    def __init__(self, tokens: np.ndarray, batch_size: int, context_length: int, seed: int = 0):
        self.tokens, self.batch_size, self.context_length, self.seed = (
            tokens,
            batch_size,
            context_length,
            seed,
        )

    def __iter__(self):
        info = get_worker_info()
        rng = np.random.default_rng([self.seed, 0 if info is None else info.id])
        while True:
            x, y = get_batch(self.tokens, self.batch_size, self.context_length, "cpu", rng)
            yield {"input_ids": x, "labels": y}
