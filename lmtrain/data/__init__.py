"""Data pipeline: tokenizers, corpora, packed and padded datasets, batching strategies.

from lmtrain.data import build_dataloader, resolve_tokenizer
tok = resolve_tokenizer(cfg.data)
train = build_dataloader(cfg.data, tok, "train", seed=cfg.training.seed, rank=rank, world_size=world)
val = build_dataloader(cfg.data, tok, "val", seed=cfg.training.seed, rank=rank, world_size=world)  # or None
"""

from lmtrain.data.datasets import (
    CollatorForCLM,
    PackedDataset,
    PaddedDocuments,
    ParquetDataset,
    RandomWindowDataset,
    get_batch,
)
from lmtrain.data.loader import PackedLoader, PaddedLoader, build_dataloader
from lmtrain.data.sources import JsonlDataset, ParquetTexts, TokenFile, open_split
from lmtrain.data.tokenizers import byte_tokenizer, load_tokenizer, resolve_tokenizer

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
