"""Training-step throughput: lmtrain's model and step against transformers' LlamaForCausalLM, same run.

    lmtrain bench train --steps 5 --rounds 5

Both models have the tiny shapes (4 layers, dim 256, 4 heads with 2 key/value heads, SwiGLU 768,
vocab 8192), batch 8 x 256 tokens, fp32 and the same AdamW (foreach). lmtrain's step computes the output
projection and the loss fused, chunk by chunk (`training.loss_chunk`, lmtrain.losses); transformers'
computes full logits, then F.cross_entropy. The GEMMs are the same and take two thirds of either step.
Rounds alternate between the two so that a busy machine slows both alike; the median round counts. Then:
MFU of a larger model (dim 512) against the matmul peak measured here, and the share of a real
`lmtrain.train` step spent outside forward, backward and optimizer (data wait, logging, metrics).
The last line is `lmtrain/hf train tokens/s ratio: X`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lmtrain.config import OptimizerConfig
from lmtrain.hooks import StepHooks
from lmtrain.metrics import measure_peak_tflops, mfu
from lmtrain.model import Transformer, TransformerModelArgs
from lmtrain.optim import build_optimizer
from lmtrain.precision import LossScaler
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
    opt = build_optimizer(model, OptimizerConfig(lr=1e-3, fused=False), "cpu")

    def step(batch):
        logits = model(input_ids=batch["input_ids"]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def tokens_per_s(step, batch, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        step(batch)
    return batch["input_ids"].numel() * steps / (time.perf_counter() - t0)


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
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per implementation")
    p.add_argument("--overhead-steps", type=int, default=12, help="steps of the real loop for the overhead")
    a = p.parse_args(argv)

    args = TransformerModelArgs(**SHAPES, seq_len=SEQ)
    batch = random_batch(args.vocab_size, BATCH, SEQ)
    impls = {"lmtrain": ours(args), "hf": hf(args)}
    for step in impls.values():  # warm-up: allocation, first-call overheads
        step(batch)
    rates: dict[str, list[float]] = {name: [] for name in impls}
    for _ in range(a.rounds):
        for name, step in impls.items():
            rates[name].append(tokens_per_s(step, batch, a.steps))
    med = {name: statistics.median(r) for name, r in rates.items()}
    print(
        f"threads {torch.get_num_threads()}, batch {BATCH} x {SEQ}, fp32, {a.rounds} rounds x {a.steps} steps"
    )
    print(f"{'implementation':<16}{'median tokens/s':>16}{'rounds':>40}")
    for name in impls:
        print(f"{name:<16}{med[name]:>16.0f}{'  '.join(f'{r:.0f}' for r in rates[name]):>40}")

    big = TransformerModelArgs(**{**SHAPES, "dim": 512, "n_heads": 8, "n_kv_heads": 4}, seq_len=SEQ)
    big_step = ours(big)
    small_batch = random_batch(big.vocab_size, 4, SEQ)
    big_step(small_batch)
    big_tps = tokens_per_s(big_step, small_batch, a.steps)
    peak = measure_peak_tflops(torch.device("cpu"), torch.float32, size=1024, seconds=1.0)
    fpt = model_flops_per_token(big, SEQ)
    print(
        f"dim-512 model: {big_tps:.0f} tokens/s x {fpt / 1e6:.1f} MFLOP/token = "
        f"{big_tps * fpt / 1e9:.2f} GFLOP/s; measured fp32 matmul peak {peak * 1e3:.1f} GFLOP/s; "
        f"MFU {100 * mfu(fpt, big_tps, peak):.1f}%"
    )
    overhead, dataset = loop_overhead(a.overhead_steps)
    print(f"loop overhead outside forward/backward/optimizer (train() on {dataset}): {100 * overhead:.2f}%")
    print(f"lmtrain/hf train tokens/s ratio: {med['lmtrain'] / med['hf']:.2f}")
    return 0
