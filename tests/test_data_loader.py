"""build_dataloader: shapes, splits, exact resume and sharding, for both pipelines."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lmtrain.config import DataConfig
from lmtrain.data import build_dataloader, load_tokenizer
from lmtrain.errors import UserError

TOK = load_tokenizer("byte")


def make_corpus(path, n_train=40, n_val=6):
    path.mkdir(parents=True, exist_ok=True)
    texts = [f"doc {i}: " + "abcdefg"[: i % 7] * (1 + i % 9) for i in range(n_train + n_val)]
    pq.write_table(pa.table({"text": texts[:n_train]}), path / "train.parquet")
    if n_val:
        pq.write_table(pa.table({"text": texts[n_train:]}), path / "val.parquet")
    return texts


def cfg_for(path, **kw):
    base = dict(dataset=str(path), sequence_length=16, batch_size=2)
    return DataConfig(**{**base, **kw})


@pytest.mark.parametrize("pipeline", ["packed", "padded"])
@pytest.mark.parametrize("masking", [False, True])
def test_batch_contract(tmp_path, pipeline, masking):
    make_corpus(tmp_path)
    cfg = cfg_for(tmp_path, pipeline=pipeline, document_masking=masking)
    batch = next(iter(build_dataloader(cfg, TOK, "train", seed=0)))
    expected = {"input_ids", "labels"} | ({"doc_ids"} if masking else set())
    assert set(batch) == expected
    for key in expected:
        assert batch[key].dtype == torch.long and batch[key].shape == (2, 16)
    real = batch["labels"] != -100
    # Where a label is real it is the next input token (shift by one inside the sample).
    assert torch.equal(batch["labels"][:, :-1][real[:, :-1]], batch["input_ids"][:, 1:][real[:, :-1]])


def test_padded_labels_ignore_padding(tmp_path):
    make_corpus(tmp_path)
    batch = next(
        iter(build_dataloader(cfg_for(tmp_path, pipeline="padded", sequence_length=64), TOK, "train", seed=0))
    )
    pad = batch["input_ids"] == TOK.pad_token_id
    assert pad.any(), "short documents must be padded to the sequence length"
    assert (batch["labels"][pad] == -100).all()
    assert (batch["input_ids"][:, 0] == TOK.bos_token_id).all()


@pytest.mark.parametrize(
    "pipeline, interleave",
    [("packed", 1), ("packed", 3), ("padded", 1)],
    ids=["packed", "packed-k3", "padded"],
)
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_with_the_exact_next_batch(tmp_path, pipeline, interleave, workers):
    make_corpus(tmp_path)
    cfg = cfg_for(tmp_path, pipeline=pipeline, num_workers=workers, interleave=interleave)
    loader = build_dataloader(cfg, TOK, "train", seed=3)
    it = iter(loader)
    for _ in range(7):  # crosses an epoch boundary for the padded pipeline (20 batches/epoch) later
        next(it)
    buf = io.BytesIO()
    torch.save(loader.state_dict(), buf)
    expected = [next(it) for _ in range(25)]
    resumed = build_dataloader(cfg, TOK, "train", seed=3)
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    got = [b for _, b in zip(range(25), resumed)]
    for a, b in zip(expected, got):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


def test_train_reshuffles_each_epoch_and_seed_matters(tmp_path):
    make_corpus(tmp_path, n_train=8)
    cfg = cfg_for(tmp_path, pipeline="padded", batch_size=8)
    it = iter(build_dataloader(cfg, TOK, "train", seed=0))
    e0, e1 = next(it)["input_ids"], next(it)["input_ids"]  # one batch per epoch
    assert sorted(map(tuple, e0.tolist())) == sorted(map(tuple, e1.tolist()))
    assert not torch.equal(e0, e1)
    other = next(iter(build_dataloader(cfg, TOK, "train", seed=1)))["input_ids"]
    assert not torch.equal(e0, other)


@pytest.mark.parametrize("pipeline", ["packed", "padded"])
def test_val_is_finite_deterministic_and_reiterable(tmp_path, pipeline):
    make_corpus(tmp_path)
    val = build_dataloader(cfg_for(tmp_path, pipeline=pipeline), TOK, "val", seed=0)
    first, second = list(val), list(val)
    assert len(first) == len(second) > 0
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, second))
    other_seed = list(build_dataloader(cfg_for(tmp_path, pipeline=pipeline), TOK, "val", seed=5))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, other_seed))


def test_val_is_none_without_a_validation_split(tmp_path):
    make_corpus(tmp_path, n_val=0)
    assert build_dataloader(cfg_for(tmp_path), TOK, "val", seed=0) is None
    assert build_dataloader(cfg_for(tmp_path / "train.parquet"), TOK, "val", seed=0) is None


def test_state_of_other_pipeline_or_workers_is_refused(tmp_path):
    make_corpus(tmp_path)
    packed = build_dataloader(cfg_for(tmp_path), TOK, "train", seed=0)
    padded = build_dataloader(cfg_for(tmp_path, pipeline="padded"), TOK, "train", seed=0)
    with pytest.raises(UserError, match="pipeline"):
        padded.load_state_dict(packed.state_dict())
    two = build_dataloader(cfg_for(tmp_path, num_workers=2), TOK, "train", seed=0)
    with pytest.raises(UserError, match="num_workers"):
        two.load_state_dict(packed.state_dict())
    interleaved = build_dataloader(cfg_for(tmp_path, interleave=4), TOK, "train", seed=0)
    with pytest.raises(UserError, match="data.interleave=1, this run has 4"):
        interleaved.load_state_dict(packed.state_dict())


def test_padded_ranks_get_disjoint_documents(tmp_path):
    make_corpus(tmp_path)
    cfg = cfg_for(tmp_path, pipeline="padded", batch_size=4, shuffle=True)
    rows = []
    for rank in range(2):
        loader = build_dataloader(cfg, TOK, "train", seed=0, rank=rank, world_size=2)
        rows.append({tuple(r) for b, _ in zip(loader, range(5)) for r in b["input_ids"].tolist()})
    assert len(rows[0]) == len(rows[1]) == 20 and not rows[0] & rows[1]


def test_bad_inputs(tmp_path):
    make_corpus(tmp_path, n_train=3)
    with pytest.raises(UserError, match="does not exist"):
        build_dataloader(cfg_for(tmp_path / "missing"), TOK, "train", seed=0)
    with pytest.raises(UserError, match="larger than"):
        build_dataloader(cfg_for(tmp_path, pipeline="padded", batch_size=4), TOK, "train", seed=0)
    with pytest.raises(UserError, match="one batch needs"):
        next(iter(build_dataloader(cfg_for(tmp_path, batch_size=64), TOK, "train", seed=0)))
    with pytest.raises(UserError, match="sequence_length"):
        DataConfig(dataset=str(tmp_path), sequence_length=1)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(UserError, match="unknown file type"):
        build_dataloader(cfg_for(tmp_path / "x.txt"), TOK, "train", seed=0)


def test_course_parquet_dataset_and_collator(tmp_path):
    from lmtrain.data import CollatorForCLM, ParquetDataset

    make_corpus(tmp_path)
    ds = ParquetDataset(str(tmp_path / "train.parquet"), TOK, sequence_length=32, training_samples=100)
    assert len(ds) == 100 and torch.equal(ds[40]["input_ids"], ds[0]["input_ids"])  # repeats the file
    item = ds[1]
    text = "doc 1: aa"  # make_corpus: "abcdefg"[: i % 7] * (1 + i % 9)
    assert item["input_ids"].shape == (33,) and item["length"] == 1 + len(text)
    batch = CollatorForCLM(32, TOK.pad_token_id)([ds[0], item])
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 32)
    n = len(text)
    assert batch["labels"][1, :n].tolist() == list(text.encode())
    assert (batch["labels"][1, n:] == -100).all()
    assert TOK.decode(batch["input_ids"][1, : n + 1].tolist()) == "<s>" + text


def test_pretokenized_files_are_preferred_and_checked_against_the_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models

    from lmtrain.data.prepare import main as prepare_main

    (tmp_path / "c.txt").write_text("<|endoftext|>".join(f"text number {i}" for i in range(30)))
    out = tmp_path / "c"
    prepare_main(["--source", str(tmp_path / "c.txt"), "--out", str(out), "--pretokenize"])
    (out / "train.parquet").unlink()  # only the token files can serve the packed pipeline now
    batch = next(iter(build_dataloader(cfg_for(out), TOK, "train", seed=0)))
    assert TOK.bos_token_id in batch["input_ids"]
    other = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "<pad>": 2, "[UNK]": 3}, unk_token="[UNK]"))
    other.save(str(tmp_path / "small.json"))
    with pytest.raises(UserError, match="vocabulary of 259"):
        build_dataloader(cfg_for(out), load_tokenizer(str(tmp_path / "small.json")), "train", seed=0)


@pytest.mark.parametrize("pipeline", ["packed", "padded"])
def test_jsonl_and_token_file_datasets(tmp_path, pipeline):
    import json

    from lmtrain.data.sources import write_token_file

    texts = [f"line {i} " + "z" * (i % 11) for i in range(30)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    write_token_file(tmp_path / "t", [list(t.encode()) for t in texts], vocab_size=len(TOK))
    for dataset in (tmp_path / "d.jsonl", tmp_path / "t.tokens.bin"):
        loader = build_dataloader(cfg_for(dataset, pipeline=pipeline), TOK, "train", seed=0)
        batch = next(iter(loader))
        assert batch["input_ids"].shape == (2, 16)
        text = TOK.decode(batch["input_ids"][0].tolist())
        assert "line " in text
        assert build_dataloader(cfg_for(dataset, pipeline=pipeline), TOK, "val", seed=0) is None


def test_pretokenized_files_are_matched_to_their_tokenizer_by_fingerprint_not_size(tmp_path):
    """A tokenizer of the same size whose ids mean other bytes is refused (not trained on silently)."""
    import json

    from transformers import PreTrainedTokenizerFast

    from lmtrain.data.prepare import main as prepare_main
    from lmtrain.data.tokenizers import tokenizer_fingerprint

    (tmp_path / "c.txt").write_text("<|endoftext|>".join(f"text number {i}" for i in range(30)))
    out = tmp_path / "c"
    prepare_main(["--source", str(tmp_path / "c.txt"), "--out", str(out), "--pretokenize"])
    meta = json.loads((out / "train.tokens.json").read_text())
    assert meta["tokenizer_fingerprint"] == tokenizer_fingerprint(TOK)
    spec = json.loads(TOK.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    a, b = (
        next(k for k, v in vocab.items() if v == ord("a")),
        next(k for k, v in vocab.items() if v == ord("b")),
    )
    vocab[a], vocab[b] = vocab[b], vocab[a]  # the same 259 tokens, two ids swapped
    (tmp_path / "swapped.json").write_text(json.dumps(spec))
    swapped = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "swapped.json"), bos_token="<s>",
                                      eos_token="</s>", pad_token="<pad>")  # fmt: skip
    assert len(swapped) == len(TOK) and tokenizer_fingerprint(swapped) != tokenizer_fingerprint(TOK)
    assert build_dataloader(cfg_for(out), TOK, "train", seed=0) is not None
    with pytest.raises(UserError, match="tokenized by another tokenizer of the same size 259"):
        build_dataloader(cfg_for(out), swapped, "train", seed=0)
