"""Training-step throughput: lmtrain against transformers' LlamaForCausalLM and a nanoGPT-style GPT.

    lmtrain bench train --steps 1 --rounds 15

lmtrain and transformers run the tiny shapes (4 layers, dim 256, 4 heads with 2 key/value heads,
SwiGLU 768, vocab 8192); the GPT follows nanoGPT's published design at the same width, depth and
vocabulary (learned positions, LayerNorm and Linear biases, GELU MLP of 4 x dim, fused qkv projection,
output head tied to the embedding). Batch 8 x 256 tokens, fp32, the same AdamW (foreach) and gradient
clipping for all. lmtrain's step computes the output projection and the loss fused, chunk by chunk
(`training.loss_chunk`, lmtrain.losses); the others compute full logits, then F.cross_entropy.
The three alternate in rounds (`lmtrain.rounds`), so that a busy machine slows them alike; the table
gives per-round ratios and the CPU-time ratio. Then: MFU of a larger model (dim 512) against the
matmul peak measured here, and the share of a real `lmtrain.train` step spent outside forward,
backward and optimizer (data wait, logging, metrics). The last two lines are the lmtrain/hf and
lmtrain/nanogpt tokens/s ratios.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmtrain.config import OptimizerConfig
from lmtrain.hooks import StepHooks
from lmtrain.model import Transformer, TransformerModelArgs
from lmtrain.optim import build_optimizer
from lmtrain.precision import LossScaler
from lmtrain.rounds import compare
from lmtrain.train import model_flops_per_token, train_step

SHAPES = dict(
    dim=256, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=8192, multiple_of=256, ffn_dim_multiplier=None
)
BATCH, SEQ = 8, 256
NO_AMP = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731


def ours(args: TransformerModelArgs):
    torch.manual_seed(0)
    model = Transformer(args)
    opt = build_optimizer(model, OptimizerConfig(lr=1e-3, fused=False), "cpu")
    scaler = LossScaler()

    def step(batch):
        return train_step(model, opt, scaler, [batch], device=torch.device("cpu"), amp=NO_AMP, max_norm=1.0,
                          hooks=StepHooks()).loss  # fmt: skip

    return step


def hf(args: TransformerModelArgs):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
        max_position_embeddings=args.seq_len, rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta,
        tie_word_embeddings=False, attn_implementation="sdpa",
    )  # fmt: skip
    model = LlamaForCausalLM(config).train()
    return logits_then_loss_step(model, lambda ids: model(input_ids=ids).logits)


def logits_then_loss_step(model: nn.Module, logits_of):
    """The textbook step: full logits, F.cross_entropy, backward, clipping, AdamW (foreach)."""
    opt = build_optimizer(model, OptimizerConfig(lr=1e-3, fused=False), "cpu")

    def step(batch):
        logits = logits_of(batch["input_ids"])  # (B, T, vocab)
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


# --------------------------------------------------------------------------------------------------
# A GPT in nanoGPT's design (written from its description, for this comparison only)
# --------------------------------------------------------------------------------------------------


class GPTBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln_1 = nn.LayerNorm(dim)
        self.c_attn = nn.Linear(dim, 3 * dim)  # q, k and v in one product
        self.c_proj = nn.Linear(dim, dim)
        self.ln_2 = nn.LayerNorm(dim)
        self.c_fc = nn.Linear(dim, 4 * dim)
        self.mlp_proj = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C)
        B, T, C = x.shape
        qkv = self.c_attn(self.ln_1(x)).view(B, T, 3, self.n_heads, C // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
        x = x + self.c_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, vocab: int, seq_len: int, dim: int, n_layers: int, n_heads: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList(GPTBlock(dim, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying, as GPT-2
        for name, p in self.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, vocab)
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def nanogpt(args: TransformerModelArgs):
    torch.manual_seed(0)
    model = GPT(args.vocab_size, args.seq_len, args.dim, args.n_layers, args.n_heads).train()
    return logits_then_loss_step(model, model)


def random_batch(vocab: int, batch: int, seq: int) -> dict:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    return {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}


class PhaseTimer(StepHooks):
    """Wall time inside forward/backward/optimizer versus whole steps (after the first `skip` steps)."""

    def __init__(self, skip: int = 2):
        self.skip, self.inside, self.total, self._t0, self._step = skip, 0.0, 0.0, 0.0, 0

    def on_step_start(self, step: int) -> None:
        self._step, self._t0 = step, time.perf_counter()

    def on_step_end(self, step: int) -> None:
        if step > self.skip:
            self.total += time.perf_counter() - self._t0

    def _phase(self):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                if timer._step > timer.skip:
                    timer.inside += time.perf_counter() - self.t

        return _Ctx()

    forward = backward = optimizer = _phase


def loop_overhead(steps: int) -> tuple[float, str]:
    """Share of real `train()` step time outside forward/backward/optimizer, and which corpus it used."""
    from lmtrain.config import parse_args
    from lmtrain.train import train

    with tempfile.TemporaryDirectory() as tmp:
        dataset = Path("data/stdlib")
        if not (dataset / "prepare.json").is_file():
            import pyarrow as pa
            import pyarrow.parquet as pq

            dataset = Path(tmp) / "corpus"
            dataset.mkdir()
            texts = [
                p.read_text(errors="replace") for p in sorted(Path(torch.__file__).parent.glob("*.py"))[:60]
            ]
            pq.write_table(pa.table({"text": texts}), dataset / "train.parquet")
            tok = ["--data.tokenizer", "byte"]
        else:
            tok = []
        cfg, _ = parse_args([
            "--dataset", str(dataset), *tok, "--model.preset", "tiny", "--sequence-length", str(SEQ),
            "--batch-size", str(BATCH), "--training-steps", str(steps), "--precision.model_dtype", "fp32",
            "--logging.frequency", "1", "--logging.peak_tflops", "1", "--logging.progress", "false",
            "--training.eval_batches", "1", "--training.output_dir", str(Path(tmp) / "run"),
            "--checkpoint.interval", "0",
        ])  # fmt: skip
        timer = PhaseTimer()
        train(cfg, hooks=timer)
    return 1.0 - timer.inside / timer.total, str(dataset)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lmtrain bench train", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1, help="timed steps per contender and round (default 1)")
    p.add_argument("--rounds", type=int, default=15, help="alternating rounds (default 15)")
    p.add_argument("--overhead-steps", type=int, default=12, help="steps of the real loop for the overhead")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default 0: torch's default)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    args = TransformerModelArgs(**SHAPES, seq_len=SEQ)
    batch = random_batch(args.vocab_size, BATCH, SEQ)
    impls = {"lmtrain": ours(args), "hf": hf(args), "nanogpt": nanogpt(args)}

    def contender(step):
        def run():
            for _ in range(a.steps):
                step(batch)
            return batch["input_ids"].numel() * a.steps

        return run

    print(
        f"threads {torch.get_num_threads()}, batch {BATCH} x {SEQ}, fp32, {a.rounds} rounds x {a.steps} steps"
    )
    result = compare({name: contender(step) for name, step in impls.items()}, rounds=a.rounds, unit="token")
    result.print_table("training step tokens/s", baseline="lmtrain")

    # MFU as a per-round ratio: the dim-512 step's FLOP/s over a 1024^3 fp32 matmul's, timed alternately.
    big = TransformerModelArgs(**{**SHAPES, "dim": 512, "n_heads": 8, "n_kv_heads": 4}, seq_len=SEQ)
    big_step, small_batch = ours(big), random_batch(big.vocab_size, 4, SEQ)
    fpt = model_flops_per_token(big, SEQ)
    x, y = torch.randn(1024, 1024), torch.randn(1024, 1024)

    def matmuls():
        for _ in range(20):
            torch.matmul(x, y)
        return 20 * 2.0 * 1024**3

    def big_steps():
        for _ in range(a.steps):
            big_step(small_batch)
        return small_batch["input_ids"].numel() * a.steps * fpt

    flops = compare({"matmul": matmuls, "dim-512 step": big_steps}, rounds=a.rounds, unit="FLOP")
    med, lo, hi = flops.ratio("dim-512 step", "matmul")
    print(
        f"dim-512 model: {flops.median_rate('dim-512 step') / 1e9:.2f} GFLOP/s ({fpt / 1e6:.1f} MFLOP/token); "
        f"fp32 1024^3 matmul {flops.median_rate('matmul') / 1e9:.2f} GFLOP/s; "
        f"MFU against it {100 * med:.1f}% (rounds {100 * lo:.1f}..{100 * hi:.1f}%)"
    )
    overhead, dataset = loop_overhead(a.overhead_steps)
    print(f"loop overhead outside forward/backward/optimizer (train() on {dataset}): {100 * overhead:.2f}%")
    print(result.headline("lmtrain", "hf", "lmtrain/hf train tokens/s ratio"))
    print(result.headline("lmtrain", "nanogpt", "lmtrain/nanogpt train tokens/s ratio"))
    return 0
