"""The main job: build the embedded corpus, train the tiny preset on CPU, evaluate, sample.

    python -m lmtrain.main_job --training.steps 50

(`make train ARGS="--training.steps 50"` runs the same.) Extra arguments are training flags on top of
`lmtrain/configs/tiny-cpu.yaml`. The corpus (`data/stdlib`, Python standard library sources with a
byte-level BPE of 8192 tokens) is built once and reused while its `prepare.json` matches. The run leaves
`runs/tiny-cpu-<timestamp>/` with config.yaml, metrics.jsonl, train.log, tokenizer/, checkpoints/,
loss.png and summary.json, and prints the final losses next to the unigram entropy of the training
tokens (the loss of the best model that ignores context) and a generated sample.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from lmtrain.atomic import atomic_write_text
from lmtrain.errors import UserError

CONFIG = Path(__file__).resolve().parent / "configs" / "tiny-cpu.yaml"
CORPUS_ARGS = ["--source", "stdlib", "--tokenizer", "bpe:8192", "--pretokenize"]
PROMPT = "def "


def prepare_corpus(out: str) -> None:
    """`lmtrain prepare` into `out`; it returns at once when `out/prepare.json` matches these arguments."""
    from lmtrain.data.prepare import main as prepare

    print(f"corpus {out}: building it, or checking that it is up to date ...", flush=True)
    code = prepare([*CORPUS_ARGS, "--out", out])
    if code:
        raise UserError(f"building the corpus in {out} failed (exit code {code}); see the messages above")


def unigram_entropy(dataset: str, tokenizer) -> tuple[float, int]:
    """Entropy in nats per token of the training split's token frequencies, and the token count."""
    import numpy as np

    from lmtrain.data import TokenFile, open_split

    source = open_split(dataset, "train", tokenizer)
    counts = np.zeros(len(tokenizer), dtype=np.int64)
    if isinstance(source, TokenFile):  # pre-tokenized: one pass over the memory-mapped ids
        counts += np.bincount(source.tokens, minlength=len(counts))[: len(counts)]
    else:
        chunk = 256
        for start in range(0, len(source), chunk):
            for doc in source.documents(range(start, min(start + chunk, len(source)))):
                counts += np.bincount(np.asarray(doc, dtype=np.int64), minlength=len(counts))[: len(counts)]
    total = int(counts.sum())
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum()), total


def sample(run_dir: Path, prompt: str = PROMPT, max_new_tokens: int = 80, seed: int = 0) -> str:
    """Top-k sample from the run's newest checkpoint."""
    import torch

    from lmtrain.checkpoint import load_for_inference
    from lmtrain.data import load_tokenizer
    from lmtrain.generate import generate
    from lmtrain.model import Transformer, TransformerModelArgs

    args, state = load_for_inference(run_dir)
    model = Transformer(TransformerModelArgs(**args))
    model.load_state_dict(state)
    model.float().eval()
    tokenizer = load_tokenizer(str(run_dir / "tokenizer"))
    ids = [tokenizer.bos_token_id, *tokenizer.encode(prompt, add_special_tokens=False)]
    gen = torch.Generator().manual_seed(seed)
    out = generate(model, ids, max_new_tokens, temperature=0.8, top_k=40, generator=gen)
    return tokenizer.decode(out[1:].tolist(), skip_special_tokens=True)


def closing_lines(summary: dict, entropy: float, vocab_size: int, job_seconds: float) -> list[str]:
    """The job's closing note: losses (rounded) next to the entropy, throughput, times."""
    from lmtrain.log import round_or_none as r

    n_mean = summary.get("final_train_loss_avg_steps") or 0
    val = summary.get("final_val_loss")
    below = f" ({entropy - val:.2f} nats below the unigram entropy)" if val is not None else ""
    mfu = (
        f"MFU {100 * summary['mfu']:.1f}% of {summary['peak_tflops']:.3g} TFLOP/s ({summary['peak_source']})"
    )
    if summary["mfu"] > 1:
        mfu += " - above 100%: the peak was measured on a busy machine; see lmtrain.metrics to measure again"
    return [
        f"run directory        {summary['run_dir']}",
        f"steps                {summary['steps']} ({summary['exit_reason']})",
        f"unigram entropy      {entropy:.3f} nats/token (a model that ignores context)",
        f"initial train loss   {r(summary.get('initial_train_loss'), 3)} (uniform: {math.log(vocab_size):.3f})",
        f"final train loss     {r(summary.get('final_train_loss_avg20'), 3)} (mean of the last {n_mean} steps; "
        f"last step {r(summary.get('final_train_loss'), 3)})",
        f"final val loss       {r(val, 3)}{below}",
        f"throughput           {summary['tokens_per_s']:,.0f} tokens/s, {mfu}",
        f"training time        {summary['wall_time_s']:.0f} s; whole job {job_seconds:.0f} s",
    ]


def main(argv: list[str] | None = None) -> int:
    from lmtrain.config import parse_args

    job_start = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, _ = parse_args(["--config", str(CONFIG), *argv], prog="python -m lmtrain.main_job")
    from lmtrain.data import resolve_tokenizer  # after parsing: `--help` answers without torch
    from lmtrain.train import exit_code, train

    if cfg.data.dataset == "data/stdlib" and not cfg.data.tokenizer:
        prepare_corpus(cfg.data.dataset)
    tokenizer = resolve_tokenizer(cfg.data)
    entropy, n_tokens = unigram_entropy(cfg.data.dataset, tokenizer)
    print(f"training corpus: {n_tokens:,} tokens, unigram entropy {entropy:.3f} nats/token", flush=True)
    print(f"training {cfg.training.steps} steps (a line every {cfg.logging.frequency}) ...", flush=True)

    summary = train(cfg)
    run_dir = Path(summary["run_dir"])
    summary["unigram_entropy"] = entropy
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")

    print()
    for line in closing_lines(summary, entropy, len(tokenizer), time.perf_counter() - job_start):
        print(line)
    if summary["exit_reason"] == "completed":
        print(f"\nsample (top-k 40, T=0.8) after {PROMPT!r}:\n{sample(run_dir)}", flush=True)
    return exit_code(summary)


if __name__ == "__main__":
    from lmtrain.cli import run_user_facing

    raise SystemExit(run_user_facing(main, sys.argv[1:]))
