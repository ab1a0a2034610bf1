"""python -m lmtrain.profiling.smoke --steps 4 --nvtx --run-dir /tmp/smoke

A few training steps of a very small Llama-style model on random tokens, driven through the profiling
step hooks exactly as the trainer drives them. Used to check NVTX ranges under `nsys profile
--trace=nvtx,osrt` and the torch.profiler window on a CPU-only machine:

    nsys profile --trace=nvtx,osrt -o /tmp/smoke python -m lmtrain.profiling.smoke --steps 3 --nvtx
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(steps: int, run_dir: Path, *, nvtx: bool = False, torch_profile: bool = False, profile: bool = False,
        window: tuple[int, int] = (2, 3), dim: int = 64, n_layers: int = 2, seq: int = 32) -> None:  # fmt: skip
    import torch

    from lmtrain.config import ProfilingConfig
    from lmtrain.model import Transformer, TransformerModelArgs
    from lmtrain.profiler import build_step_hooks

    torch.manual_seed(0)
    cfg = ProfilingConfig(profile=profile, profile_step_start=window[0], profile_step_end=window[1], nvtx=nvtx,
                          torch_profile=torch_profile)  # fmt: skip
    hooks = build_step_hooks(cfg, run_dir, torch.device("cpu"))
    args = TransformerModelArgs(dim=dim, n_layers=n_layers, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32,
                                ffn_dim_multiplier=None, seq_len=seq)  # fmt: skip
    model = Transformer(args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    try:
        for step in range(1, steps + 1):
            hooks.on_step_start(step)
            tokens = torch.randint(0, 256, (2, seq + 1))
            with hooks.forward():
                logits = model(tokens[:, :-1])
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
            with hooks.backward():
                loss.backward()
            with hooks.optimizer():
                opt.step()
                opt.zero_grad(set_to_none=True)
            hooks.on_step_end(step)
    finally:
        hooks.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lmtrain.profiling.smoke", description=__doc__.split("\n\n", 1)[1]
    )
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--run-dir", type=Path, default=Path("runs/profiling-smoke"))
    p.add_argument("--nvtx", action="store_true")
    p.add_argument("--torch-profile", action="store_true")
    p.add_argument("--profile", action="store_true")
    a = p.parse_args(argv)
    run(a.steps, a.run_dir, nvtx=a.nvtx, torch_profile=a.torch_profile, profile=a.profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
