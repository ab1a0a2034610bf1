"""Tokenizer loading: the built-in byte tokenizer, local files, hub names offline, missing specials."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from lmtrain.config import DataConfig
from lmtrain.data import load_tokenizer, resolve_tokenizer
from lmtrain.errors import UserError


def test_byte_tokenizer_round_trips_any_text_and_has_specials():
    tok = load_tokenizer("byte")
    text = "héllo\n\tworld ✓ \x00"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))  # id == byte value
    assert tok.decode(ids) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (256, 257, 258)
    assert tok(text)["input_ids"][0] == tok.bos_token_id  # default call prepends BOS, like Llama
    assert len(tok) == 259


def test_directory_and_tokenizer_json_load_the_same_tokenizer(tmp_path):
    load_tokenizer("byte").save_pretrained(tmp_path / "tok")
    from_dir = load_tokenizer(str(tmp_path / "tok"))
    from_json = load_tokenizer(str(tmp_path / "tok" / "tokenizer.json"))
    for tok in (from_dir, from_json):
        assert tok("ab", add_special_tokens=False)["input_ids"] == [97, 98]
        assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (256, 257, 258)


def test_tokenizer_without_bos_is_refused(tmp_path):
    core = Tokenizer(models.WordLevel(vocab={"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UserError, match="no BOS, EOS"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))


def test_missing_paths_fail_clearly(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither tokenizer.json"):
        load_tokenizer(str(tmp_path / "empty"))


@pytest.mark.slow
def test_hub_name_offline_fails_with_advice(tmp_path):
    # A fresh interpreter so that HF_HUB_OFFLINE is read at import time, and an empty cache.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    code = (
        "from lmtrain.data import load_tokenizer\n"
        "from lmtrain.errors import UserError\n"
        "try:\n    load_tokenizer('unsloth/Mistral-Nemo-Base-2407-bnb-4bit')\n"
        "except UserError as e:\n    print('USERERROR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert "USERERROR" in out.stdout, out.stderr
    assert "HF_HUB_OFFLINE" in out.stdout and "local directory" in out.stdout


def test_resolve_tokenizer_prefers_config_then_saved_then_errors(tmp_path):
    assert resolve_tokenizer(DataConfig(dataset=str(tmp_path), tokenizer="byte")).bos_token_id == 257
    with pytest.raises(UserError, match="no tokenizer saved beside the dataset"):
        resolve_tokenizer(DataConfig(dataset=str(tmp_path)))
    with pytest.raises(UserError, match="does not exist"):
        resolve_tokenizer(DataConfig(dataset=str(tmp_path / "missing")))
    load_tokenizer("byte").save_pretrained(tmp_path / "tokenizer")
    assert resolve_tokenizer(DataConfig(dataset=str(tmp_path))).pad_token_id == 256
    # A file inside the prepared directory finds the same tokenizer.
    (tmp_path / "train.parquet").write_bytes(b"")
    assert resolve_tokenizer(DataConfig(dataset=str(tmp_path / "train.parquet"))).eos_token_id == 258
