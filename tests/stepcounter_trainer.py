"""A torch-free stand-in for `lmtrain.train` with the same launcher contract, for the Slurm mechanics tests.

    python tests/stepcounter_trainer.py RUN_DIR STEPS SECONDS_PER_STEP

Counts STEPS steps (sleeping SECONDS_PER_STEP each); on SIGUSR1/SIGUSR2/SIGTERM it saves its state at
the next step boundary and exits 85 (EXIT_REQUEUE); started again it resumes from the saved state.
At the end it writes RUN_DIR/summary.json with a `final_train_loss` that depends on every step, the
restart counts it ran under and the torch.distributed variables it saw.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path


def main() -> int:
    run_dir, steps, dt = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    rank = int(os.environ.get("RANK", "0"))
    state_path = run_dir / f"state-{rank}.json"
    state = (
        json.loads(state_path.read_text()) if state_path.exists() else {"step": 0, "acc": 1.0, "segments": []}
    )
    state["segments"].append(int(os.environ.get("SLURM_RESTART_COUNT", "0")))
    stop = []
    for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
        signal.signal(sig, lambda s, f: stop.append(s))
    while state["step"] < steps:
        time.sleep(dt)
        state["step"] += 1
        state["acc"] = (state["acc"] * 1.000123 + state["step"] * 1e-4) % 1000
        if stop:
            tmp = state_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(state))
            os.replace(tmp, state_path)
            return 85
    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    summary = {"exit_reason": "completed", "steps": state["step"], "final_train_loss": state["acc"]}
    summary.update(segments=state["segments"], env=env)
    name = "summary.json" if rank == 0 else f"summary-rank{rank}.json"
    tmp = run_dir / (name + ".tmp")
    tmp.write_text(json.dumps(summary))
    os.replace(tmp, run_dir / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
