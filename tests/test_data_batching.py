"""Batching strategies: padding collates and the bucket sampler's k bound and O(batch) cost."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmtrain.data.batching import BucketBatchSampler, TruncatedDocuments, pad_to_longest, pad_to_max_length
from lmtrain.errors import UserError


def docs(*lengths):
    return [torch.arange(2, 2 + n) for n in lengths]


def test_pad_to_max_length_and_to_longest():
    a = pad_to_max_length(docs(3, 5), max_length=8, pad_id=0)
    b = pad_to_longest(docs(3, 5), pad_id=0)
    assert a["input_ids"].shape == (2, 8) and b["input_ids"].shape == (2, 5)
    for batch in (a, b):
        assert batch["input_ids"][0, :3].tolist() == [2, 3, 4] and (batch["input_ids"][0, 3:] == 0).all()
        assert batch["labels"][0].tolist()[:3] == [3, 4, -100]  # nothing follows the last real token
        assert (batch["labels"][1, :4] == torch.tensor([3, 4, 5, 6])).all()
        assert (
            (batch["labels"] == -100).sum(dim=1) == batch["input_ids"].shape[1] - torch.tensor([2, 4])
        ).all()


def test_truncated_documents_cut_at_max_length():
    class Source:
        def __len__(self):
            return 2

        def documents(self, idx):
            return [np.arange(1000 * (i + 1)) for i in idx]

    ds = TruncatedDocuments(Source(), max_length=640)
    assert len(ds[0]) == 640 and ds.lengths().tolist() == [640, 640]
    with pytest.raises(UserError, match="max_length"):
        TruncatedDocuments(Source(), max_length=1)


@settings(max_examples=50, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 700), min_size=1, max_size=300),
    batch_size=st.integers(1, 17),
    k=st.sampled_from([1, 5, 10, 20, 50, 640]),
    seed=st.integers(0, 3),
)
def test_bucket_batches_respect_k_and_cover_every_index_once(lengths, batch_size, k, seed):
    sampler = BucketBatchSampler(lengths, batch_size, k, seed=seed)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    for b in batches:
        assert 1 <= len(b) <= batch_size
        clipped = [min(lengths[i], 640) for i in b]
        assert max(clipped) - min(clipped) <= k


def test_bucket_order_is_random_per_epoch_and_seeded():
    lengths = np.random.default_rng(0).integers(1, 640, size=500)
    s = BucketBatchSampler(lengths, 8, 10, seed=1)
    first = list(s)
    assert list(BucketBatchSampler(lengths, 8, 10, seed=1)) == first
    s.set_epoch(1)
    assert list(s) != first
    short = [b for b in first if len(b) < 8]
    assert len(short) <= len(s.buckets)  # a short batch only when a bucket runs out


def test_k_640_is_one_bucket_like_pad_to_longest():
    lengths = np.random.default_rng(0).integers(1, 641, size=300)
    s = BucketBatchSampler(lengths, 16, 640)
    assert len(s.buckets) == 1
    batches = list(s)
    assert all(len(b) == 16 for b in batches[:-1])
    spread = [np.ptp(lengths[b]) for b in batches[:-1]]
    assert np.mean(spread) > 300  # random mixes, not sorted by length


def test_per_batch_cost_does_not_grow_with_n():
    rng = np.random.default_rng(0)
    costs = {}
    for n in (10_000, 1_000_000):
        s = BucketBatchSampler(rng.integers(1, 641, size=n), batch_size=32, k=20)
        it = iter(s)
        ops = []
        for _ in range(200):
            next(it)
            ops.append(s.last_batch_ops)
        costs[n] = max(ops)
        assert costs[n] <= 32 + len(s.buckets)  # batch_size draws + one scan over the buckets
    assert len(BucketBatchSampler(np.arange(1, 641), 32, 20).buckets) == 32
    assert costs[1_000_000] <= 32 + 32 and costs[10_000] <= 32 + 32


def test_bad_arguments():
    with pytest.raises(UserError, match="k >= 1"):
        BucketBatchSampler([1, 2], 4, 0)
    with pytest.raises(UserError, match="empty"):
        BucketBatchSampler([], 4, 5)
