"""Batching strategies for variable-length documents (longer ones truncated to `max_length`).

1. `pad_to_max_length`: every batch is (B, max_length), whatever it holds.
2. `pad_to_longest`: collate pads to the longest document of the batch.
3. `BucketBatchSampler(lengths, batch_size, k)`: batches whose lengths differ by at most k, padded to
   their longest; k = max_length puts everything in one bucket, which is strategy 2.

Each collated batch is `input_ids` (B, L) and `labels` (B, L): the next token, -100 on padding and on
the last real token of each document (nothing follows it).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from lmtrain.errors import UserError

IGNORE = -100
MAX_LENGTH = 640


class TruncatedDocuments(Dataset):
    """Item i: the tokens of document i of a source, truncated to `max_length` (at least 2 kept)."""

    def __init__(self, source, max_length: int = MAX_LENGTH):
        if max_length < 2:
            raise UserError(f"max_length must be >= 2 (input and label), got {max_length}")
        self.source, self.max_length = source, max_length

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, idx: int) -> torch.Tensor:
        return torch.as_tensor(np.asarray(self.source.documents([idx])[0][: self.max_length], dtype=np.int64))

    def lengths(self) -> np.ndarray:
        full = self.source.lengths() if hasattr(self.source, "lengths") else None
        if full is None:
            full = np.array([len(d) for d in self.source.documents(range(len(self.source)))])
        return np.minimum(full, self.max_length)


def _pad(docs: list[torch.Tensor], width: int, pad_id: int) -> dict:
    ids = torch.full((len(docs), width), pad_id, dtype=torch.long)  # (B, L)
    labels = torch.full((len(docs), width), IGNORE, dtype=torch.long)  # (B, L)
    for i, doc in enumerate(docs):
        doc = doc[:width]
        ids[i, : len(doc)] = doc
        labels[i, : len(doc) - 1] = doc[1:]
    return {"input_ids": ids, "labels": labels}


def pad_to_max_length(docs: list[torch.Tensor], max_length: int = MAX_LENGTH, pad_id: int = 0) -> dict:
    """Strategy 1: every batch is max_length wide."""
    return _pad(docs, max_length, pad_id)


def pad_to_longest(docs: list[torch.Tensor], pad_id: int = 0) -> dict:
    """Strategy 2 (and 3 with the bucket sampler): as wide as the longest document of the batch."""
    return _pad(docs, max(len(d) for d in docs), pad_id)


class BucketBatchSampler(Sampler[list[int]]):
    """Random batches of indices whose lengths differ by at most k.

    `__init__` puts every index into a hash table keyed by `(length - 1) // k` (O(n)); a bucket spans k
    consecutive lengths, so any two of its lengths differ by at most k - 1. Drawing a batch costs
    O(batch_size + number of buckets), independent of n: a bucket is chosen with probability proportional
    to what it still holds (so every remaining index is equally likely), then batch_size indices are taken
    from it by a lazy Fisher-Yates shuffle (a random pick swapped to the end of the unused part), so no
    per-epoch O(n) shuffle is needed. A bucket's last batch may be short. `last_batch_ops` counts the
    elementary steps of the last batch (buckets scanned + indices drawn) so tests can check the bound.
    """

    def __init__(self, lengths, batch_size: int, k: int, seed: int = 0, max_length: int = MAX_LENGTH):
        if k < 1 or batch_size < 1:
            raise UserError(
                f"BucketBatchSampler needs k >= 1 and batch_size >= 1, got k={k}, batch_size={batch_size}"
            )
        self.batch_size, self.k, self.seed, self.epoch = batch_size, k, seed, 0
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.size == 0:
            raise UserError("BucketBatchSampler got no lengths: the dataset is empty")
        key_type = np.uint16 if max_length <= 1 << 16 else np.int64  # 16-bit keys sort in linear time
        keys = ((np.clip(lengths, 1, max_length) - 1) // k).astype(key_type)  # (n,) bucket of each index
        # The hash table bucket -> indices, built in O(n): numpy's stable sort of 16-bit keys is a radix sort.
        order = np.argsort(keys, kind="stable")
        counts = np.bincount(keys, minlength=int(keys.max()) + 1)
        table = dict(zip(range(len(counts)), np.split(order, np.cumsum(counts)[:-1])))
        self.keys = [key for key, idx in table.items() if len(idx)]
        self.buckets = [table[key].astype(np.int64) for key in self.keys]
        self.n = sum(len(b) for b in self.buckets)
        self.last_batch_ops = 0

    def __len__(self) -> int:
        return sum(-(-len(b) // self.batch_size) for b in self.buckets)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        remaining = [len(b) for b in self.buckets]  # O(number of buckets) per epoch
        total = self.n
        while total:
            r, ops = int(rng.integers(total)), 0
            which = 0
            while r >= remaining[which]:  # weighted choice: O(number of buckets)
                r -= remaining[which]
                which += 1
            ops += which + 1
            bucket, left = self.buckets[which], remaining[which]
            take = min(self.batch_size, left)
            batch = []
            for _ in range(take):  # lazy Fisher-Yates: O(1) per index
                j = int(rng.integers(left))
                left -= 1
                bucket[j], bucket[left] = bucket[left], bucket[j]
                batch.append(int(bucket[left]))
                ops += 1
            remaining[which], total = left, total - take
            self.last_batch_ops = ops
            yield batch
