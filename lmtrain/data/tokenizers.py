"""Tokenizers: the built-in byte tokenizer, local files and directories, and hub names.

Every tokenizer returned here is a Hugging Face fast tokenizer whose `bos_token_id`, `eos_token_id` and
`pad_token_id` are set: the packed pipeline separates documents with BOS and the padded pipeline pads
with PAD, so a tokenizer without them cannot be used (a missing PAD falls back to EOS, as is usual for
Llama-style tokenizers that ship without one).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # transformers is imported where a tokenizer is built: `--help` must not wait for it
    from transformers import PreTrainedTokenizerFast

    from lmtrain.config import DataConfig
from lmtrain.errors import UserError

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = [PAD, BOS, EOS]


def _with_specials(tok, source: str) -> PreTrainedTokenizerFast:
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token  # Llama/Mistral ship without PAD; padded positions are masked anyway
    missing = [name for name in ("bos", "eos", "pad") if getattr(tok, f"{name}_token_id") is None]
    if missing:
        raise UserError(
            f"tokenizer {source!r} has no {', '.join(t.upper() for t in missing)} token: lmtrain separates "
            f"documents with BOS and pads with PAD. Use a tokenizer that defines them (`byte`, `bpe:VOCAB` "
            f"in `lmtrain prepare`), or add them to its special_tokens_map / tokenizer_config.json"
        )
    return tok


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens (id == byte value) followed by <pad>=256, <s>=257, </s>=258; needs no files.

    Built as a byte-level BPE without merges, so every UTF-8 byte is one token and any text round-trips.
    Calling it with `add_special_tokens=True` (the default) prepends <s>, like Llama and Mistral.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_to_char = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins, unordered
    # ByteLevel maps byte b to a fixed printable character; recover that mapping to give byte b id b.
    mapping = _gpt2_bytes_to_unicode()
    assert set(mapping.values()) == set(byte_to_char)
    vocab = {mapping[b]: b for b in range(256)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIAL_TOKENS)  # ids 256, 257, 258 in this order
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 257)]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (256, 257, 258)
    return tok


def hf_byte_level_bpe(vocab_size: int, special_tokens: list[str]):
    """An untrained Hugging Face byte-level BPE (GPT-2 pre-tokenisation, no prefix space) and its trainer.

    All 256 byte symbols are in the initial alphabet, so no text is ever unknown. Train it with
    `core.train_from_iterator(texts, trainer)` or `core.train(files, trainer)`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return core, trainer


def _gpt2_bytes_to_unicode() -> dict[int, str]:
    # The byte -> printable character table of GPT-2's byte-level BPE (also what `tokenizers` uses):
    # printable Latin-1 bytes map to themselves, the rest to code points from 256 upwards.
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerFast:
    """`byte`, a save_pretrained directory, a tokenizer.json file, or a Hugging Face hub name."""
    if not name_or_path:
        raise UserError("no tokenizer given: pass `byte`, a directory, a tokenizer.json or a hub name")
    if name_or_path == "byte":
        return byte_tokenizer()
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(name_or_path)
    if path.is_file():
        if path.suffix != ".json":
            raise UserError(f"tokenizer file {path} is not a tokenizer.json; pass the file or its directory")
        try:
            tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
            raise UserError(f"cannot read tokenizer file {path}: {exc}") from exc
        _guess_specials(tok)
        return _with_specials(tok, str(path))
    if path.is_dir():
        if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
            raise UserError(
                f"tokenizer directory {path} has neither tokenizer.json nor tokenizer_config.json "
                f"(expected a `save_pretrained` layout)"
            )
        try:
            tok = AutoTokenizer.from_pretrained(str(path))
        except Exception as exc:
            raise UserError(f"cannot load the tokenizer in directory {path}: {exc}") from exc
        if not tok.is_fast:
            raise UserError(
                f"tokenizer in {path} is not a fast (Rust) tokenizer; save it with tokenizer.json"
            )
        _guess_specials(tok)
        return _with_specials(tok, str(path))
    if name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/").split("/", 1)[-1]:
        raise UserError(f"tokenizer path {name_or_path} does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else f"{exc}"
        raise UserError(
            f"cannot load tokenizer {name_or_path!r} from the Hugging Face hub ({why}). Without network, "
            f"pass a local directory or tokenizer.json (`--tokenizer path/to/tokenizer`), or download it "
            f"once elsewhere and run with HF_HUB_OFFLINE=1 and that cache (HF_HOME)"
        ) from exc
    return _with_specials(tok, name_or_path)


def _guess_specials(tok) -> None:
    # A bare tokenizer.json does not say which of its special tokens is BOS/EOS/PAD; recognise the
    # common spellings so that files written by `tokenizers` alone load without extra config.
    vocab = tok.get_vocab()
    for attr, names in (
        ("bos_token", (BOS, "<|begin_of_text|>", "<|startoftext|>", "<bos>")),
        ("eos_token", (EOS, "<|end_of_text|>", "<|endoftext|>", "<eos>")),
        ("pad_token", (PAD, "<|pad|>", "<|padding|>")),
    ):
        if getattr(tok, attr) is None:
            for name in names:
                if name in vocab:
                    setattr(tok, attr, name)
                    break


def dataset_tokenizer_dir(dataset: str) -> Path:
    """Where `lmtrain prepare` saves the tokenizer for a dataset (a directory or a file inside one)."""
    path = Path(dataset)
    base = path if path.is_dir() else path.parent
    return base / "tokenizer"


def resolve_tokenizer(cfg: DataConfig) -> PreTrainedTokenizerFast:
    """`cfg.tokenizer` if set, else the tokenizer `lmtrain prepare` saved beside the dataset."""
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    if not Path(cfg.dataset).exists():
        raise UserError(
            f"dataset {cfg.dataset} does not exist: pass a directory written by `lmtrain prepare`, a parquet, "
            f"JSONL or .tokens.bin file (data.dataset / --dataset)"
        )
    saved = dataset_tokenizer_dir(cfg.dataset)
    if saved.is_dir():
        return load_tokenizer(str(saved))
    raise UserError(
        f"data.tokenizer is empty and there is no tokenizer saved beside the dataset ({saved} does not "
        f"exist): set --data.tokenizer (e.g. `byte`, a directory or a hub name), or build the dataset "
        f"with `lmtrain prepare --out DIR --tokenizer ...`"
    )


# Text whose ids depend on the vocabulary, the merges and the pre-tokenizer: letters, digits, spaces,
# punctuation, code, non-ASCII and emoji.
_FINGERPRINT_PROBE = (
    "The quick brown fox jumps over the lazy dog. 0123456789 3.14159 1,000,000\n"
    "def main(argv):\n    return {'a': [1, 2]}  # done\n\tx != y && z <= w\n"
    "Grüße, naïve café; 日本語 한국어 Ελληνικά русский 🙂👍🏽 it's we'll DON'T"
)


def tokenizer_fingerprint(tok) -> str:
    """A short hash that tells tokenizers apart: its vocabulary (token -> id) and the ids of a probe text.
    Two tokenizers of the same size but other tokens, ids or merges get different fingerprints."""
    import hashlib
    import json

    vocab = sorted(tok.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8"))
    digest.update(json.dumps(tok.encode(_FINGERPRINT_PROBE, add_special_tokens=False)).encode())
    return digest.hexdigest()[:16]
