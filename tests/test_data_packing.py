"""PackedDataset invariants (hypothesis), sharding across ranks and workers, resume, random windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from lmtrain.data import (
    JsonlDataset,
    PackedDataset,
    RandomWindowDataset,
    TokenFile,
    get_batch,
    load_tokenizer,
)
from lmtrain.data.sources import write_token_file
from lmtrain.errors import UserError

PAD, BOS = 0, 1


class ListSource:
    """Documents held in memory (token ids >= 2, so they never look like PAD or BOS)."""

    def __init__(self, docs):
        self.docs = [np.asarray(d, dtype=np.int64) for d in docs]

    def __len__(self):
        return len(self.docs)

    def documents(self, indices):
        return [self.docs[i] for i in indices]


def packed(docs, **kw):
    args = dict(
        sequence_length=5, batch_size=2, bos_id=BOS, pad_id=PAD, seed=0, infinite=False, docs_per_fetch=3
    )
    return PackedDataset(ListSource(docs), **{**args, **kw})


def stream_of(batches):
    """Rebuild the token stream of one shard from its batches, checking the shift on the way."""
    inputs = torch.cat([b["input_ids"].reshape(-1) for b in batches])
    labels = torch.cat([b["labels"].reshape(-1) for b in batches])
    valid = labels != -100
    n = int(valid.sum())
    assert valid[:n].all() and not valid[n:].any(), "only the padded tail of the last batch is ignored"
    assert torch.equal(labels[: n - 1], inputs[1:n]), "labels are the inputs shifted by one, across samples"
    return torch.cat([inputs[:1], labels[:n]]).tolist()


def split_on_bos(stream):
    assert stream[0] == BOS
    docs, cur = [], []
    for tok in stream[1:]:
        if tok == BOS:
            docs.append(cur)
            cur = []
        else:
            cur.append(tok)
    return docs + [cur]


docs_strategy = st.lists(st.lists(st.integers(2, 50), min_size=0, max_size=23), min_size=4, max_size=30)


@settings(max_examples=60, deadline=None)
@given(
    docs=docs_strategy,
    T=st.integers(2, 9),
    B=st.integers(1, 3),
    world=st.integers(1, 3),
    seed=st.integers(0, 9),
)
def test_every_token_appears_once_in_order_across_shards(docs, T, B, world, seed):
    seen = []
    for rank in range(world):
        ds = packed(
            docs,
            sequence_length=T,
            batch_size=B,
            rank=rank,
            world_size=world,
            seed=seed,
            mask_bos_labels=False,
        )
        batches = list(ds)
        for b in batches:
            assert b["input_ids"].shape[1] == T and b["input_ids"].shape[0] <= B
        assert all(b["input_ids"].shape[0] == B for b in batches[:-1])
        expected = ds.shard_documents(0, rank, world)
        if not batches:  # a stream of one lone BOS holds nothing to predict
            assert len(expected) == 1 and len(docs[expected[0]]) == 0
            seen.extend(expected.tolist())
            continue
        shard_docs = split_on_bos(stream_of(batches))
        assert shard_docs == [docs[i] for i in expected]  # in the shard's order, each token once
        seen.extend(expected.tolist())
    assert sorted(seen) == list(range(len(docs)))  # every document exactly once across the shards


@settings(max_examples=40, deadline=None)
@given(docs=docs_strategy, T=st.integers(2, 9))
def test_bos_masks_and_document_ids(docs, T):
    batches = list(packed(docs, sequence_length=T, mask_bos_labels=True, document_ids=True))
    for i, b in enumerate(batches):
        x, y, d = b["input_ids"], b["labels"], b["doc_ids"]
        assert (y[x == BOS] == -100).all()
        if i < len(batches) - 1:  # only the last batch has a padded tail
            assert torch.equal(y != -100, x != BOS)
        assert (d[:, 0] == 0).all()
        step = torch.diff(d, dim=1)  # (B, T - 1)
        assert torch.equal(step, (x[:, 1:] == BOS).long()), "a new document starts exactly at each BOS"
    unmasked = list(packed(docs, sequence_length=T, mask_bos_labels=False))
    masked = list(packed(docs, sequence_length=T, mask_bos_labels=True))
    for u, m in zip(unmasked, masked):
        keep = u["input_ids"] != BOS
        assert torch.equal(u["labels"][keep], m["labels"][keep])


@settings(max_examples=40, deadline=None)
@given(docs=docs_strategy, T=st.integers(2, 7), stop=st.integers(0, 12), seed=st.integers(0, 5))
def test_resume_from_any_batch_reproduces_the_rest_of_the_stream(docs, T, stop, seed):
    if sum(len(d) + 1 for d in docs) < 2 * T + 1:
        return  # too small for one batch per epoch: covered by the error test
    full = packed(docs, sequence_length=T, seed=seed, infinite=True)
    it = iter(full)
    for _ in range(stop):
        state = next(it)["_state"]
    expected = [next(it) for _ in range(6)]
    resumed = packed(docs, sequence_length=T, seed=seed, infinite=True)
    if stop:
        resumed.worker_states = [state]
    got = [b for b, _ in zip(resumed, range(6))]
    for a, b in zip(expected, got):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


@settings(max_examples=40, deadline=None)
@given(
    docs=docs_strategy, T=st.integers(2, 6), B=st.integers(1, 3), K=st.integers(2, 4), seed=st.integers(0, 3)
)
def test_interleaved_rows_are_the_same_samples_k_apart(docs, T, B, K, seed):
    if sum(len(d) + 1 for d in docs) < K * B * T + 1:
        return  # a block spans more than an epoch: covered by the error test
    plain = packed(docs, sequence_length=T, batch_size=1, seed=seed, infinite=True)
    samples = [b["input_ids"][0] for b, _ in zip(plain, range(3 * K * B))]  # the stream, sample by sample
    mixed = packed(docs, sequence_length=T, batch_size=B, seed=seed, infinite=True, interleave=K)
    for n, batch in zip(range(3 * K), mixed):
        block, j = divmod(n, K)
        for r in range(B):  # row r of batch j of a block is sample r * K + j of that block
            assert torch.equal(batch["input_ids"][r], samples[block * K * B + r * K + j])
        assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1].where(
            batch["labels"][:, :-1] != -100, batch["input_ids"][:, 1:]))  # fmt: skip


@settings(max_examples=40, deadline=None)
@given(docs=docs_strategy, T=st.integers(2, 5), stop=st.integers(0, 10), K=st.integers(1, 4))
def test_interleaved_resume_from_any_batch_inside_a_block(docs, T, stop, K):
    if sum(len(d) + 1 for d in docs) < 2 * K * T + 1:
        return
    full = packed(docs, sequence_length=T, infinite=True, interleave=K)
    it = iter(full)
    for _ in range(stop):
        state = next(it)["_state"]
    expected = [next(it) for _ in range(2 * K + 1)]
    resumed = packed(docs, sequence_length=T, infinite=True, interleave=K)
    if stop:
        resumed.worker_states = [state]
    got = [b for b, _ in zip(resumed, range(2 * K + 1))]
    for a, b in zip(expected, got):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


def test_interleave_does_not_touch_the_validation_pass_and_rejects_nonsense():
    docs = [[i + 2] * 7 for i in range(9)]
    plain = [b["input_ids"] for b in packed(docs, sequence_length=4, infinite=False)]
    mixed = [b["input_ids"] for b in packed(docs, sequence_length=4, infinite=False, interleave=8)]
    assert all(torch.equal(a, b) for a, b in zip(plain, mixed)) and len(plain) == len(mixed)
    with pytest.raises(UserError, match="one block of 16 interleaved batches needs 129 tokens"):
        next(iter(packed(docs, sequence_length=4, infinite=True, interleave=16)))
    with pytest.raises(UserError, match="interleave must be >= 1"):
        packed(docs, interleave=0)


def test_training_stream_reshuffles_each_epoch_and_uses_every_document(tmp_path):
    docs = [[i + 2] * 3 for i in range(12)]
    ds = packed(docs, sequence_length=4, batch_size=1, infinite=True, mask_bos_labels=False)
    stream = []
    for b in ds:
        stream.extend(b["input_ids"][0].tolist())
        if len(stream) >= 2 * 12 * 4:
            break
    per_epoch = [d[0] for d in split_on_bos(stream[: 12 * 4])]
    next_epoch = [d[0] for d in split_on_bos(stream[12 * 4 : 2 * 12 * 4])]
    assert sorted(per_epoch) == list(range(2, 14)) and sorted(next_epoch) == list(range(2, 14))
    assert per_epoch != next_epoch


def test_two_ranks_two_workers_use_every_document_once(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(2, 200, size=rng.integers(0, 40)) for _ in range(37)]
    write_token_file(tmp_path / "train", docs, vocab_size=259)
    source = TokenFile(tmp_path / "train")
    seen = []
    for rank in range(2):
        ds = PackedDataset(
            source,
            sequence_length=8,
            batch_size=2,
            bos_id=BOS,
            pad_id=PAD,
            seed=4,
            rank=rank,
            world_size=2,
            infinite=False,
            mask_bos_labels=False,
        )
        per_worker: dict[int, list] = {0: [], 1: []}
        for b in DataLoader(ds, batch_size=None, num_workers=2):
            per_worker[b.pop("_worker")].append(b)
        for worker, batches in per_worker.items():
            shard = rank * 2 + worker
            order = ds.shard_documents(0, shard, 4)
            assert split_on_bos(stream_of(batches)) == [docs[i].tolist() for i in order]
            seen.extend(order.tolist())
    assert sorted(seen) == list(range(37))


def test_packing_over_jsonl_matches_the_text(tmp_path):
    tok = load_tokenizer("byte")
    texts = ["hello", "wörld", "", "x" * 30]
    import json

    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    src = JsonlDataset(tmp_path / "d.jsonl", tok)
    assert (tmp_path / "d.jsonl.index.npy").is_file()
    ds = PackedDataset(
        src,
        sequence_length=6,
        batch_size=2,
        bos_id=tok.bos_token_id,
        pad_id=tok.pad_token_id,
        shuffle=False,
        infinite=False,
        mask_bos_labels=False,
    )
    stream = []
    for b in ds:
        stream = stream or [b["input_ids"][0, 0].item()]
        labels = b["labels"].reshape(-1)
        stream += labels[labels != -100].tolist()
    text = tok.decode(stream)
    assert text == "<s>" + "<s>".join(texts)


def test_jsonl_index_is_reused_and_rebuilt_when_the_file_changes(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    src = JsonlDataset(path)
    assert len(src) == 2 and src.texts([0, 1]) == ["a", "b"]
    assert JsonlDataset(path).index.tolist() == src.index.tolist()
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"}\n')
    assert JsonlDataset(path).texts([2]) == ["c"]


@pytest.mark.parametrize(
    "line, message",
    [
        (b"{bad", "d.jsonl:2: not valid JSON"),
        (b'{"text": "\xff"}', "d.jsonl:2: not valid UTF-8"),
        (b'{"other": 1}', "d.jsonl:2: expected an object with a string field 'text'"),
    ],
)
def test_jsonl_bad_lines_name_the_line(tmp_path, line, message):
    (tmp_path / "d.jsonl").write_bytes(b'{"text": "ok"}\n' + line + b"\n")
    src = JsonlDataset(tmp_path / "d.jsonl")
    assert src.texts([0]) == ["ok"]
    with pytest.raises(UserError, match=message):
        src.texts([1])


def test_too_many_shards_or_too_small_dataset_fail_clearly():
    with pytest.raises(UserError, match="fewer than the 4 shards"):
        list(packed([[2], [3], [4]], world_size=4, rank=0))
    with pytest.raises(UserError, match="one batch needs"):
        next(iter(packed([[2], [3]], infinite=True)))
    with pytest.raises(UserError, match="sequence_length must be >= 2"):
        packed([[2]], sequence_length=1)


def test_get_batch_random_windows(tmp_path):
    write_token_file(tmp_path / "t", [np.arange(2, 1000)], vocab_size=1000)
    tokens = TokenFile(tmp_path / "t").tokens  # memory-mapped uint16
    x, y = get_batch(tokens, 8, 16, "cpu", np.random.default_rng(0))
    assert x.shape == y.shape == (8, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y - x, torch.ones_like(x))
    starts = {get_batch(tokens, 1, 16, "cpu")[0][0, 0].item() for _ in range(20)}
    assert len(starts) > 1
    with pytest.raises(UserError, match="invalid device"):
        get_batch(tokens, 2, 16, "gpu7")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            get_batch(tokens, 2, 16, "cuda")
    with pytest.raises(UserError, match="too few"):
        get_batch(tokens[:10], 2, 16)
    b = next(iter(RandomWindowDataset(tokens, 4, 8, seed=1)))
    assert b["input_ids"].shape == (4, 8)
