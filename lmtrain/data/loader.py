"""`build_dataloader`: the one entry point the trainer uses, with exact resume through state_dict().

loader = build_dataloader(cfg.data, tokenizer, "train", seed=42, rank=rank, world_size=world)
for batch in loader: ...          # {"input_ids": (B, T), "labels": (B, T)[, "doc_ids": (B, T)]}
ckpt["data"] = loader.state_dict()  # plain ints/lists: torch.save-able with weights_only=True
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import DataLoader

from lmtrain.config import DataConfig
from lmtrain.data.datasets import CollatorForCLM, PackedDataset, PaddedDocuments, epoch_order
from lmtrain.data.sources import TokenFile, open_split
from lmtrain.data.tokenizers import tokenizer_fingerprint
from lmtrain.errors import UserError


def build_dataloader(
    cfg: DataConfig, tokenizer, split: str, *, seed: int, rank: int = 0, world_size: int = 1
):
    """A loader over `split` ("train": endless, reshuffled each epoch; "val": one deterministic pass).

    Returns None for "val" when the dataset has no validation split (a single file, or a directory
    prepared with --val-fraction 0). The packed pipeline reads pre-tokenized files when present.
    """
    if split not in ("train", "val"):
        raise UserError(f"split must be 'train' or 'val', got {split!r}")
    if cfg.sequence_length < 2:
        raise UserError(f"data.sequence_length must be >= 2, got {cfg.sequence_length}")
    for name in ("bos_token_id", "pad_token_id"):
        if getattr(tokenizer, name, None) is None:
            raise UserError(f"the tokenizer has no {name}; lmtrain needs BOS and PAD (see load_tokenizer)")
    source = open_split(cfg.dataset, split, tokenizer, prefer_tokens=cfg.pipeline == "packed")
    if source is None:
        return None
    if isinstance(source, TokenFile) and source.meta.get("vocab_size") != len(tokenizer):
        raise UserError(
            f"{source.path} was tokenized with a vocabulary of {source.meta.get('vocab_size')} but the tokenizer "
            f"has {len(tokenizer)}: use the tokenizer saved beside it (leave data.tokenizer empty) or re-run "
            f"`lmtrain prepare --pretokenize` with this tokenizer"
        )
    fingerprint = source.meta.get("tokenizer_fingerprint") if isinstance(source, TokenFile) else None
    if fingerprint is not None and fingerprint != tokenizer_fingerprint(tokenizer):
        raise UserError(
            f"{source.path} was tokenized by another tokenizer of the same size {len(tokenizer)} "
            f"(fingerprint {fingerprint}, this one's is {tokenizer_fingerprint(tokenizer)}): its ids would "
            "mean other tokens. Use the tokenizer saved beside it (leave data.tokenizer empty) or re-run "
            "`lmtrain prepare --pretokenize` with this tokenizer"
        )
    if cfg.num_workers > 0:
        # Each worker tokenizes on one core; this also silences the tokenizers fork warning.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if len(source) == 0:
        raise UserError(f"the {split} split of {cfg.dataset} has no documents")
    train = split == "train"
    if cfg.pipeline == "packed":
        dataset = PackedDataset(
            source,
            sequence_length=cfg.sequence_length,
            batch_size=cfg.batch_size,
            bos_id=tokenizer.bos_token_id,
            pad_id=tokenizer.pad_token_id,
            seed=seed,
            rank=rank,
            world_size=world_size,
            shuffle=cfg.shuffle and train,
            infinite=train,
            mask_bos_labels=cfg.mask_bos_labels,
            document_ids=cfg.document_masking,
            interleave=cfg.interleave,
        )
        return PackedLoader(dataset, cfg.num_workers, rank, world_size)
    dataset = PaddedDocuments(source, cfg.sequence_length, tokenizer.bos_token_id, tokenizer.pad_token_id)
    return PaddedLoader(
        dataset,
        CollatorForCLM(cfg.sequence_length, tokenizer.pad_token_id),
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        seed=seed,
        rank=rank,
        world_size=world_size,
        shuffle=cfg.shuffle and train,
        infinite=train,
        document_ids=cfg.document_masking,
    )


class PackedLoader:
    """Iterates a PackedDataset through a DataLoader and remembers each worker's stream position.

    A DataLoader over an IterableDataset takes batches from its workers in strict rotation, so after n
    batches the next one comes from logical worker n % W. On resume the dataset rotates worker roles
    so that DataLoader worker 0 plays that logical worker, and each worker restarts at its saved position.
    """

    def __init__(self, dataset: PackedDataset, num_workers: int, rank: int, world_size: int):
        self.dataset, self.num_workers = dataset, num_workers
        self.rank, self.world_size = rank, world_size
        W = max(num_workers, 1)
        self.batches = 0
        self.worker_states: list[dict] = [{"epoch": 0, "doc": 0, "offset": 0} for _ in range(W)]

    def __iter__(self):
        W = max(self.num_workers, 1)
        if self.dataset.infinite:
            self.dataset.worker_states = [dict(s) for s in self.worker_states]
            self.dataset.worker_offset = self.batches % W
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=False,
            prefetch_factor=4 if self.num_workers else None,
        )
        for batch in loader:
            worker = batch.pop("_worker")
            state = batch.pop("_state", None)
            if self.dataset.infinite:
                assert worker == self.batches % W, "DataLoader broke worker rotation"
                self.worker_states[worker] = state
                self.batches += 1
            yield batch

    def state_dict(self) -> dict:
        return {
            "pipeline": "packed",
            "batches": self.batches,
            "num_workers": self.num_workers,
            "rank": self.rank,
            "world_size": self.world_size,
            "interleave": self.dataset.interleave,
            "worker_states": [dict(s) for s in self.worker_states],
        }

    def load_state_dict(self, state: dict) -> None:
        _check_state(state, "packed", self.num_workers, self.rank, self.world_size)
        if self.dataset.infinite and state.get("interleave", 1) != self.dataset.interleave:
            raise UserError(
                f"the checkpoint was written with data.interleave={state.get('interleave', 1)}, this run has "
                f"{self.dataset.interleave}: the saved position is inside a block of that many batches, so "
                "resume with the same value"
            )
        self.batches = int(state["batches"])
        self.worker_states = [{k: int(v) for k, v in s.items()} for s in state["worker_states"]]


class PaddedLoader:
    """The course's padded pipeline: per-epoch shuffled document batches, split evenly across ranks."""

    def __init__(
        self,
        dataset,
        collate,
        *,
        batch_size,
        num_workers,
        seed,
        rank,
        world_size,
        shuffle,
        infinite,
        document_ids,
    ):
        self.dataset, self.collate, self.document_ids = dataset, collate, document_ids
        self.batch_size, self.num_workers = batch_size, num_workers
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle, self.infinite = shuffle, infinite
        self.epoch, self.batch_in_epoch = 0, 0
        per_rank = len(dataset) // world_size
        if per_rank == 0 or (infinite and per_rank < batch_size):
            raise UserError(
                f"batch_size {batch_size} is larger than the {per_rank} documents each of the {world_size} "
                f"ranks gets from the dataset ({len(dataset)} documents); lower data.batch_size or add data"
            )

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        order = epoch_order(len(self.dataset), self.seed, epoch, self.shuffle)
        per_rank = len(order) // self.world_size  # equal counts so that DDP ranks step together
        mine = order[self.rank :: self.world_size][:per_rank]
        stop = per_rank - per_rank % self.batch_size if self.infinite else per_rank
        return [mine[i : i + self.batch_size] for i in range(0, stop, self.batch_size)]

    def __iter__(self):
        epoch, start = (self.epoch, self.batch_in_epoch) if self.infinite else (0, 0)
        while True:
            batches = [b.tolist() for b in self.epoch_batches(epoch)[start:]]
            loader = DataLoader(
                self.dataset, batch_sampler=batches, collate_fn=self.collate, num_workers=self.num_workers
            )
            for batch in loader:
                if self.document_ids:  # one document per sample: the model's masks need no change
                    batch["doc_ids"] = torch.zeros_like(batch["input_ids"])
                if self.infinite:
                    self.batch_in_epoch += 1
                yield batch
            if not self.infinite:
                return
            epoch, start = epoch + 1, 0
            self.epoch, self.batch_in_epoch = epoch, 0

    def state_dict(self) -> dict:
        return {
            "pipeline": "padded",
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "num_workers": self.num_workers,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        _check_state(state, "padded", self.num_workers, self.rank, self.world_size)
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])


def _check_state(state: dict, pipeline: str, num_workers: int, rank: int, world_size: int) -> None:
    if state.get("pipeline") != pipeline:
        raise UserError(
            f"the checkpoint's data state is for the {state.get('pipeline')!r} pipeline, this run uses "
            f"{pipeline!r}; resume with the same data.pipeline"
        )
    if pipeline == "packed" and state.get("num_workers") != num_workers:
        raise UserError(
            f"the checkpoint was written with data.num_workers={state.get('num_workers')}, this run has "
            f"{num_workers}: the packed stream is sharded per worker, so resume with the same value"
        )
    if state.get("world_size") != world_size:
        raise UserError(
            f"the checkpoint's data state is for {state.get('world_size')} ranks, this run has {world_size}: "
            f"resume with the same number of processes"
        )
    if state.get("rank", rank) != rank:
        raise UserError(
            f"the data state is rank {state.get('rank')}'s, loaded on rank {rank}: save one per rank"
        )
