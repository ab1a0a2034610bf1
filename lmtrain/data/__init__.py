"""Data pipeline: tokenizers, corpora, packed and padded datasets, batching strategies.

from lmtrain.data import build_dataloader, resolve_tokenizer
tok = resolve_tokenizer(cfg.data)
train = build_dataloader(cfg.data, tok, "train", seed=cfg.training.seed, rank=rank, world_size=world)
val = build_dataloader(cfg.data, tok, "val", seed=cfg.training.seed, rank=rank, world_size=world)  # or None
"""

import importlib

# name -> submodule. Imported on first use (PEP 562), so `lmtrain.data.cli` and `lmtrain.data.prepare`
# answer `--help` without importing torch and transformers.
_WHERE = {
    **dict.fromkeys(
        [
            "CollatorForCLM",
            "PackedDataset",
            "PaddedDocuments",
            "ParquetDataset",
            "RandomWindowDataset",
            "get_batch",
        ],
        "datasets",
    ),
    **dict.fromkeys(["PackedLoader", "PaddedLoader", "build_dataloader"], "loader"),
    **dict.fromkeys(["JsonlDataset", "ParquetTexts", "TokenFile", "open_split"], "sources"),
    **dict.fromkeys(["byte_tokenizer", "load_tokenizer", "resolve_tokenizer"], "tokenizers"),
}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'lmtrain.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"lmtrain.data.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


__all__ = [
    "CollatorForCLM",
    "JsonlDataset",
    "PackedDataset",
    "PackedLoader",
    "PaddedDocuments",
    "PaddedLoader",
    "ParquetDataset",
    "ParquetTexts",
    "RandomWindowDataset",
    "TokenFile",
    "build_dataloader",
    "byte_tokenizer",
    "get_batch",
    "load_tokenizer",
    "open_split",
    "resolve_tokenizer",
]

assert sorted(__all__) == sorted(_WHERE)
