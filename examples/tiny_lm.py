"""A small language model whose training loop has six planted inefficiencies for `lmtrain doctor` to find.

    python examples/tiny_lm.py --profile-out runs/lm_planted.json && lmtrain doctor runs/lm_planted.json
    python examples/tiny_lm.py --fixed --profile-out runs/lm_fixed.json && lmtrain doctor runs/lm_fixed.json

Plain PyTorch; runs on a CPU in seconds (on a GPU when there is one). The planted version:

1. data-loader wait: each sample is tokenized in `__getitem__`, in the training process (num_workers=0);
   fixed: the corpus is tokenized once and samples are slices of one tensor.
2. host-device syncs: `loss.item()` and `print(loss)` every step; fixed: the loss is summed on the device
   and read every `--log-every` steps.
3. fp32 matmuls: no autocast; fixed: torch.autocast(bfloat16).
4. repeated work: the causal mask and the sinusoidal position table are rebuilt in every forward; fixed:
   the table is a buffer built once and attention uses `is_causal=True`.
5. tiny ops: attention loops over the heads in Python; fixed: all heads in one scaled_dot_product_attention.
6. recompilations: the compiled loss (torch.compile, dynamic=False) sees batches padded to their longest
   document, a new length almost every step; fixed: every batch is a block of `--seq-len` tokens.
"""

from __future__ import annotations

import argparse
import math
import random
from collections import Counter

import torch
import torch.nn as nn
import torch.nn.functional as F
from shared import Block, example_parser, fused_attention, report, run_steps
from torch.utils.data import DataLoader, Dataset

# ----------------------------------------------------------------------------- data


def synthetic_corpus(n_docs: int, seed: int) -> list[str]:
    """Documents of 64-400 characters made of pseudo-words (a stand-in for real text)."""
    rng = random.Random(seed)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8)))
        for _ in range(500)
    ]
    docs = []
    for _ in range(n_docs):
        text = ""
        target = rng.randint(64, 400)
        while len(text) < target:
            text += rng.choice(words) + rng.choice("  ,.")
        docs.append(text[:target])
    return docs


def merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


class ByteBPE:
    """Byte-level BPE in pure Python, the way a first implementation looks: merges applied one at a time."""

    def __init__(self, docs: list[str], n_merges: int = 192, sample: int = 24):
        seqs = [list(doc.encode()) for doc in docs[:sample]]
        self.ranks: dict[tuple[int, int], int] = {}
        for new_id in range(256, 256 + n_merges):
            counts = Counter(p for s in seqs for p in zip(s, s[1:]))
            if not counts:
                break
            pair = max(counts, key=counts.get)
            self.ranks[pair] = new_id
            seqs = [merge(s, pair, new_id) for s in seqs]
        self.pad_id = 256 + len(self.ranks)
        self.vocab_size = self.pad_id + 1

    def encode(self, text: str) -> list[int]:
        ids = list(text.encode())
        while len(ids) > 1:
            pair = min(zip(ids, ids[1:]), key=lambda p: self.ranks.get(p, 1 << 30))
            if pair not in self.ranks:
                break
            ids = merge(ids, pair, self.ranks[pair])
        return ids


class DocumentDataset(Dataset):
    """Planted: tokenizes one document per item, every epoch, in the process that trains."""

    def __init__(self, docs: list[str], tokenizer: ByteBPE):
        self.docs, self.tokenizer = docs, tokenizer

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor(self.tokenizer.encode(self.docs[i]))


def pad_to_longest(batch: list[torch.Tensor], pad_id: int) -> torch.Tensor:
    """Planted: the batch length is its longest document's, so it changes from batch to batch."""
    out = torch.full((len(batch), max(len(t) for t in batch)), pad_id)
    for row, t in zip(out, batch):
        row[: len(t)] = t
    return out


class BlockDataset(Dataset):
    """Fixed: the corpus is tokenized once; an item is a slice of `seq_len + 1` tokens."""

    def __init__(self, docs: list[str], tokenizer: ByteBPE, seq_len: int):
        self.tokens = torch.tensor([t for doc in docs for t in tokenizer.encode(doc)])
        self.seq_len = seq_len

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.tokens[i * self.seq_len : (i + 1) * self.seq_len + 1]


# ----------------------------------------------------------------------------- model


def sinusoidal_table(seq_len: int, dim: int) -> torch.Tensor:
    """(T, C) position encodings of "Attention is all you need"."""
    inv_freq = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))  # (C/2,)
    angles = torch.arange(seq_len)[:, None] * inv_freq[None, :]  # (T, C/2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)  # (T, C)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, fixed: bool):
        super().__init__()
        self.n_heads, self.fixed = n_heads, fixed
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (
            self.qkv(x).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        )  # (B, H, T, D)
        if self.fixed:
            y = fused_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        else:
            # Planted: a mask rebuilt every call and one small matmul/softmax chain per head.
            mask = torch.tril(torch.ones(T, T, device=x.device))
            heads = []
            for h in range(self.n_heads):
                scores = q[:, h] @ k[:, h].transpose(-2, -1) / math.sqrt(C // self.n_heads)  # (B, T, T)
                scores = scores.masked_fill(mask == 0, float("-inf"))
                heads.append(F.softmax(scores, dim=-1) @ v[:, h])  # (B, T, D)
            y = torch.stack(heads, dim=1)  # (B, H, T, D)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class TinyLM(nn.Module):
    def __init__(self, vocab_size: int, dim: int, n_layers: int, n_heads: int, max_len: int, fixed: bool):
        super().__init__()
        self.dim, self.fixed = dim, fixed
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(Block(dim, Attention(dim, n_heads, fixed)) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        # Fixed: built once; a buffer moves with .to(device) and is not a parameter.
        self.register_buffer("positions", sinusoidal_table(max_len, dim), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        if self.fixed:
            pos = self.positions[:T]
        else:
            pos = sinusoidal_table(T, self.dim).to(idx.device)  # planted: the same table every step
        x = self.embed(idx) + pos  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))  # (B, T, V)


# ----------------------------------------------------------------------------- training


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Cross-entropy in fp32 over the non-padding positions; (B, T, V), (B, T) -> ()."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=pad_id)


def build_parser() -> argparse.ArgumentParser:
    p = example_parser(__doc__)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128, help="block length of the fixed version")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument(
        "--compile-backend", default="aot_eager", help="torch.compile backend (inductor needs a C++ compiler)"
    )
    return p


def main(argv: list[str] | None = None) -> tuple[float, float]:
    """Train; return the mean (wall, CPU) seconds of a step after the first two."""
    args = build_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    docs = synthetic_corpus(2 * args.batch_size * max(args.steps, 1), args.seed)
    tokenizer = ByteBPE(docs)
    if args.fixed:
        data = BlockDataset(docs, tokenizer, args.seq_len)
        loader = DataLoader(
            data, batch_size=args.batch_size, shuffle=True, drop_last=True, pin_memory=device.type == "cuda"
        )
    else:
        data = DocumentDataset(docs, tokenizer)
        loader = DataLoader(
            data,
            batch_size=args.batch_size,
            shuffle=True,
            collate_fn=lambda b: pad_to_longest(b, tokenizer.pad_id),
        )
    model = TinyLM(tokenizer.vocab_size, args.dim, args.layers, args.heads, 512, args.fixed).to(device)
    loss_fn = torch.compile(next_token_loss, backend=args.compile_backend, dynamic=False)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, foreach=True)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.fixed)

    loss_sum = torch.zeros((), device=device)

    def train_step(step: int, batch: torch.Tensor) -> None:
        batch = batch.to(device, non_blocking=args.fixed)
        x, y = batch[:, :-1], batch[:, 1:]
        with amp:
            logits = model(x)
        loss = loss_fn(logits, y, tokenizer.pad_id)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if args.fixed:
            loss_sum.add_(loss.detach())
            if (step + 1) % args.log_every == 0:
                print(f"step {step + 1}: mean loss {loss_sum.item() / args.log_every:.3f}")
                loss_sum.zero_()
        else:
            print(f"step {step + 1}: loss {loss.item():.3f}", loss)  # planted: a sync and a tensor print

    return run_steps(loader, train_step, args.steps, device, args.profile_out, args.lockstep)


if __name__ == "__main__":
    report(main())
