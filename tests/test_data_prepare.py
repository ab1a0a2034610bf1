"""`lmtrain prepare`: every source kind, the deterministic split, token files, caching, bad input."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmtrain.cli import main as lmtrain_main
from lmtrain.data import TokenFile, load_tokenizer
from lmtrain.data.prepare import main as prepare_main
from lmtrain.data.prepare import stdlib_files
from lmtrain.errors import UserError


def texts_of(path):
    return pq.read_table(path).column("text").to_pylist()


def run(*argv):
    return prepare_main([str(a) for a in argv])


def test_jsonl_source_counts_and_reports_bad_lines(tmp_path, capsys):
    src = tmp_path / "c.jsonl"
    lines = [
        json.dumps({"text": "first document"}).encode(),
        b"{broken json",
        json.dumps({"other": "no text"}).encode(),
        b'{"text": "caf\xe9 in latin-1"}',
        json.dumps({"text": "   "}).encode(),
        json.dumps({"text": 7}).encode(),
        b"",
    ] + [json.dumps({"text": f"doc {i}"}).encode() for i in range(30)]
    src.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    assert run("--source", src, "--out", out, "--val-fraction", "0.2") == 0
    info = json.loads((out / "prepare.json").read_text())
    assert info["documents"]["train"] + info["documents"]["val"] == 31
    assert info["skipped"] == {
        "malformed JSON lines": 1,
        "lines without a string 'text'": 2,
        "non-UTF-8 lines": 1,
        "empty": 1,
    }
    assert info["skipped_where"]["lines without a string 'text'"] == ["3", "6"]
    assert "malformed JSON lines (first: 2)" in capsys.readouterr().out
    everything = texts_of(out / "train.parquet") + texts_of(out / "val.parquet")
    assert sorted(everything) == sorted(["first document"] + [f"doc {i}" for i in range(30)])


def test_strict_fails_at_first_bad_line_and_writes_nothing(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(UserError, match=r"c.jsonl:2: not valid JSON"):
        run("--source", src, "--out", tmp_path / "out", "--strict")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["c.jsonl"]  # no temp directory left behind


def test_split_is_deterministic_and_independent_of_order(tmp_path):
    docs = [f"document number {i} " * 3 for i in range(200)]
    (tmp_path / "a.txt").write_text("<|endoftext|>".join(docs))
    (tmp_path / "b.txt").write_text("<|endoftext|>".join(reversed(docs)))
    run("--source", tmp_path / "a.txt", "--out", tmp_path / "A", "--val-fraction", "0.1")
    run("--source", tmp_path / "b.txt", "--out", tmp_path / "B", "--val-fraction", "0.1")
    val_a, val_b = texts_of(tmp_path / "A" / "val.parquet"), texts_of(tmp_path / "B" / "val.parquet")
    assert sorted(val_a) == sorted(val_b) and 5 <= len(val_a) <= 40
    assert not set(val_a) & set(texts_of(tmp_path / "A" / "train.parquet"))


def test_text_file_with_custom_separator_and_empty_documents(tmp_path):
    (tmp_path / "t.txt").write_text("alpha|||beta|||   |||gamma")
    run("--source", tmp_path / "t.txt", "--out", tmp_path / "o", "--separator", "|||", "--val-fraction", "0")
    assert texts_of(tmp_path / "o" / "train.parquet") == ["alpha", "beta", "gamma"]
    assert not (tmp_path / "o" / "val.parquet").exists()
    assert json.loads((tmp_path / "o" / "prepare.json").read_text())["skipped"] == {"empty": 1}


def test_directory_glob_pretokenize_and_rerun_is_cached(tmp_path, capsys):
    src = tmp_path / "notes"
    (src / "sub").mkdir(parents=True)
    (src / "a.md").write_text("# A\nhello")
    (src / "sub" / "b.md").write_text("# B\nworld ✓")
    (src / "skip.txt").write_text("not markdown")
    out = tmp_path / "o"
    args = ["--source", src, "--out", out, "--glob", "**/*.md", "--pretokenize", "--val-fraction", "0.5"]
    assert run(*args) == 0
    tok = load_tokenizer(str(out / "tokenizer"))
    all_docs = {}
    for split in ("train", "val"):
        tf = TokenFile(out / f"{split}.tokens.bin")
        assert tf.meta["dtype"] == "uint16"
        for text, ids in zip(texts_of(out / f"{split}.parquet"), tf.documents(range(len(tf)))):
            assert tok.decode(ids.tolist()) == text
            all_docs[text] = ids
    assert set(all_docs) == {"# A\nhello", "# B\nworld ✓"}
    before = (out / "prepare.json").stat().st_mtime_ns
    capsys.readouterr()
    assert run(*args) == 0
    assert "up to date" in capsys.readouterr().out
    assert (out / "prepare.json").stat().st_mtime_ns == before


def test_parquet_source_and_bpe_tokenizer(tmp_path):
    texts = [f"the quick brown fox {i} jumps over the lazy dog" for i in range(50)]
    pq.write_table(pa.table({"body": texts, "n": list(range(50))}), tmp_path / "in.parquet")
    out = tmp_path / "o"
    run(
        "--source",
        tmp_path / "in.parquet",
        "--out",
        out,
        "--text-field",
        "body",
        "--tokenizer",
        "bpe:300",
        "--pretokenize",
    )
    tok = load_tokenizer(str(out / "tokenizer"))
    assert len(tok) == 300 and tok.bos_token_id is not None and tok.pad_token_id is not None
    ids = tok("the quick brown fox", add_special_tokens=False)["input_ids"]
    assert len(ids) < len("the quick brown fox")  # merges were learned
    assert tok.decode(ids) == "the quick brown fox"
    tf = TokenFile(out / "train.tokens.bin")
    assert int(tf.lengths().sum()) == len(tf.tokens)


def test_large_vocabulary_uses_uint32(tmp_path):
    from lmtrain.data.sources import write_token_file

    meta = write_token_file(tmp_path / "x", [np.array([70000, 1]), np.array([5])], vocab_size=70001)
    tf = TokenFile(tmp_path / "x.tokens.bin")
    assert meta["dtype"] == "uint32" and [d.tolist() for d in tf.documents([0, 1])] == [[70000, 1], [5]]


@pytest.mark.slow
def test_stdlib_source_is_sorted_and_excludes_site_packages(tmp_path):
    files = stdlib_files()
    assert len(files) > 500
    assert all("site-packages" not in f.parts for f in files)
    import sysconfig
    from pathlib import Path

    rel = [f.relative_to(Path(sysconfig.get_paths()["stdlib"])).as_posix() for f in files]
    assert rel == sorted(rel) and all(r.endswith(".py") for r in rel)
    out = tmp_path / "std"
    assert run("--source", "stdlib", "--out", out, "--max-documents", "20", "--val-fraction", "0.1") == 0
    info = json.loads((out / "prepare.json").read_text())
    assert info["documents"]["train"] + info["documents"]["val"] == 20


@pytest.mark.parametrize(
    "setup, argv, message",
    [
        (lambda p: None, ["--source", "{p}/missing.jsonl"], "does not exist"),
        (lambda p: (p / "d").mkdir(), ["--source", "{p}/d", "--glob", "*.md"], "no files matching"),
        (
            lambda p: pq.write_table(pa.table({"body": ["x"]}), p / "a.parquet"),
            ["--source", "{p}/a.parquet"],
            r"no column 'text'; its columns are \['body'\]",
        ),
        (
            lambda p: pq.write_table(pa.table({"text": [1, 2]}), p / "a.parquet"),
            ["--source", "{p}/a.parquet"],
            "expected strings",
        ),
        (lambda p: (p / "e.jsonl").write_text("\n\n"), ["--source", "{p}/e.jsonl"], "produced no documents"),
        (
            lambda p: (p / "e.txt").write_text("x"),
            ["--source", "{p}/e.txt", "--tokenizer", "bpe:12"],
            "at least 259",
        ),
        (
            lambda p: (p / "e.txt").write_text("x"),
            ["--source", "{p}/e.txt", "--val-fraction", "1.5"],
            "val-fraction",
        ),
        # Fails after the parquet files are written (tokenizer step): the temp directory must go too.
        (
            lambda p: (p / "e.txt").write_text("x"),
            ["--source", "{p}/e.txt", "--tokenizer", "{p}/no/tok"],
            "does not exist",
        ),
    ],
)
def test_bad_sources_fail_clearly_and_write_nothing(tmp_path, setup, argv, message):
    setup(tmp_path)
    before = set(tmp_path.rglob("*"))
    argv = [a.format(p=tmp_path) for a in argv] + ["--out", str(tmp_path / "out")]
    with pytest.raises(UserError, match=message):
        prepare_main(argv)
    assert set(tmp_path.rglob("*")) == before


def test_cli_prints_user_error_without_traceback(tmp_path, capsys):
    assert lmtrain_main(["prepare", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --source") and "Traceback" not in err


def test_failed_rebuild_keeps_the_previous_output(tmp_path):
    (tmp_path / "a.txt").write_text("one<|endoftext|>two")
    out = tmp_path / "o"
    run("--source", tmp_path / "a.txt", "--out", out, "--val-fraction", "0")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(UserError):
        run("--source", tmp_path / "a.txt", "--out", out, "--tokenizer", tmp_path / "missing", "--force")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "o"]


def test_refuses_to_replace_a_directory_it_did_not_write(tmp_path):
    (tmp_path / "a.txt").write_text("one<|endoftext|>two")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.md").write_text("keep me")
    with pytest.raises(UserError, match="was not written by `lmtrain prepare`"):
        run("--source", tmp_path / "a.txt", "--out", tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.md").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "mine"]
