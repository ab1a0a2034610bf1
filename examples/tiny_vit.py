"""A small vision transformer on synthetic images, with six planted inefficiencies for `lmtrain doctor`.

    python examples/tiny_vit.py --profile-out runs/vit_planted.json && lmtrain doctor runs/vit_planted.json
    python examples/tiny_vit.py --fixed --profile-out runs/vit_fixed.json && lmtrain doctor runs/vit_fixed.json

Plain PyTorch; runs on a CPU in seconds (on a GPU when there is one). The planted version:

1. data-loader wait: every image is drawn, cropped, flipped and normalized with PIL and NumPy in
   `__getitem__`, in the training process; fixed: images are made once as one uint8 tensor and the batch
   is flipped and normalized on the device.
2. host-device syncs: accuracy with `.item()` and the indices of misclassified images with `nonzero()` and
   `.tolist()` every step; fixed: correct predictions are counted on the device and read every N steps.
3. fp32 matmuls: no autocast; fixed: torch.autocast(bfloat16).
4. tiny ops: patches are cut with a Python loop over the patch grid; fixed: one strided Conv2d.
5. repeated work: the 2-D sin-cos position table is rebuilt in every forward; fixed: a buffer built once.
6. memory growth: the attention maps of every step are kept for a plot after training; fixed: none kept
   (attention runs in scaled_dot_product_attention).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from shared import Block, example_parser, fused_attention, report, run_steps
from torch.utils.data import DataLoader, Dataset, TensorDataset

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

# ----------------------------------------------------------------------------- data


def draw_image(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """(H, W, 3) uint8: a bright square whose position and colour depend on the class, on noise."""
    img = rng.integers(0, 96, (size, size, 3), dtype=np.uint8)
    side = size // 3
    y, x = divmod(label % 4, 2)
    oy, ox = y * (size - side), x * (size - side)
    img[oy : oy + side, ox : ox + side, label % 3] = 255
    return img


class AugmentingDataset(Dataset):
    """Planted: draws and augments one image per item with PIL and NumPy, in the process that trains."""

    def __init__(self, n: int, size: int, n_classes: int, seed: int):
        self.n, self.size, self.n_classes, self.seed = n, size, n_classes, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        rng = np.random.default_rng(self.seed + i)
        label = int(rng.integers(self.n_classes))
        img = Image.fromarray(draw_image(rng, label, self.size + 4))
        left, top = rng.integers(0, 5, 2)
        img = img.crop((left, top, left + self.size, top + self.size)).resize(
            (self.size, self.size), Image.BILINEAR
        )
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        pixels = (np.asarray(img, dtype=np.float64) / 255.0 - MEAN) / STD  # (H, W, 3)
        return torch.from_numpy(pixels.transpose(2, 0, 1).copy()).float(), label


def pregenerated(n: int, size: int, n_classes: int, seed: int) -> TensorDataset:
    """Fixed: all images drawn once, kept as uint8 (B, 3, H, W)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(n_classes, size=n)
    images = np.stack([draw_image(rng, int(c), size) for c in labels]).transpose(0, 3, 1, 2)
    return TensorDataset(torch.from_numpy(images.copy()), torch.from_numpy(labels))


def augment_on_device(images: torch.Tensor) -> torch.Tensor:
    """Fixed: flip half the batch and normalize, batched: uint8 (B, 3, H, W) -> float (B, 3, H, W)."""
    x = images.float() / 255.0
    flip = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5
    x = torch.where(flip, x.flip(-1), x)
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


# ----------------------------------------------------------------------------- model


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid*grid, C) 2-D sin-cos position table (MAE/ViT style): half the channels per axis."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4) / (dim // 4))  # (C/4,)
    ys, xs = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij"
    )
    out_y, out_x = torch.outer(ys.flatten(), omega), torch.outer(xs.flatten(), omega)  # (N, C/4) each
    return torch.cat([out_y.sin(), out_y.cos(), out_x.sin(), out_x.cos()], dim=1)  # (N, C)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, fixed: bool):
        super().__init__()
        self.n_heads, self.fixed = n_heads, fixed
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.kept_maps: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = (
            self.qkv(x).view(B, N, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        )  # (B, H, N, D)
        if self.fixed:
            y = fused_attention(q, k, v)  # (B, H, N, D)
        else:
            att = F.softmax(q @ k.transpose(-2, -1) * (C // self.n_heads) ** -0.5, dim=-1)  # (B, H, N, N)
            self.kept_maps.append(att)  # planted: every step's maps stay alive until the end
            y = att @ v
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


class TinyViT(nn.Module):
    def __init__(
        self, image: int, patch: int, dim: int, n_layers: int, n_heads: int, n_classes: int, fixed: bool
    ):
        super().__init__()
        self.patch, self.grid, self.dim, self.fixed = patch, image // patch, dim, fixed
        self.to_patch = nn.Linear(3 * patch * patch, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(Block(dim, Attention(dim, n_heads, fixed)) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)
        self.register_buffer("positions", sincos_2d(self.grid, dim), persistent=False)

    def patches(self, img: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, 3*P*P)"""
        B, p = img.shape[0], self.patch
        if self.fixed:
            # A strided conv with to_patch's weights is the same linear map on every patch, in one op.
            w = self.to_patch.weight.view(self.dim, 3, p, p)
            return F.conv2d(img, w, self.to_patch.bias, stride=p).flatten(2).transpose(1, 2)  # (B, N, C)
        cut = [img[:, :, i * p : (i + 1) * p, j * p : (j + 1) * p].reshape(B, -1)  # planted: one op per patch
               for i in range(self.grid) for j in range(self.grid)]  # fmt: skip
        return self.to_patch(torch.stack(cut, dim=1))  # (B, N, C)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.patches(img)  # (B, N, C)
        pos = (
            self.positions if self.fixed else sincos_2d(self.grid, self.dim).to(img.device)
        )  # planted: rebuilt
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x + pos], dim=1)  # (B, 1+N, C)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x[:, 0]))  # (B, classes)


# ----------------------------------------------------------------------------- training


def build_parser() -> argparse.ArgumentParser:
    p = example_parser(__doc__)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--classes", type=int, default=10)
    return p


def main(argv: list[str] | None = None) -> tuple[float, float]:
    """Train; return the mean (wall, CPU) seconds of a step after the first two."""
    args = build_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    n_images = args.batch_size * max(args.steps, 1)
    if args.fixed:
        data = pregenerated(n_images, args.image_size, args.classes, args.seed)
    else:
        data = AugmentingDataset(n_images, args.image_size, args.classes, args.seed)
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        pin_memory=args.fixed and device.type == "cuda")  # fmt: skip
    model = TinyViT(args.image_size, args.patch, args.dim, args.layers, args.heads, args.classes, args.fixed)
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.fixed)

    correct, seen, hard_examples = torch.zeros((), device=device, dtype=torch.long), [0], []

    def train_step(step: int, batch) -> None:
        images = batch[0].to(device, non_blocking=args.fixed)
        labels = batch[1].to(device, non_blocking=args.fixed)
        if args.fixed:
            images = augment_on_device(images)
        with amp:
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        pred = logits.argmax(-1)
        if args.fixed:
            correct.add_((pred == labels).sum())
            seen[0] += len(labels)
            if (step + 1) % args.log_every == 0:
                print(f"step {step + 1}: accuracy {correct.item() / seen[0]:.3f}")
                correct.zero_()
                seen[0] = 0
        else:  # planted: three syncs every step
            accuracy = (pred == labels).float().mean().item()
            hard_examples.extend((pred != labels).nonzero().squeeze(1).tolist())
            print(f"step {step + 1}: loss {loss.item():.3f} accuracy {accuracy:.3f}")

    return run_steps(loader, train_step, args.steps, device, args.profile_out, args.lockstep)


if __name__ == "__main__":
    report(main())
