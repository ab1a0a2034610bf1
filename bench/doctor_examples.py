"""Step time of the doctor's example training scripts: the fixed versions against the planted ones, same run.

    lmtrain bench doctor_examples --rounds 5 --steps 48

Each round runs `examples/tiny_lm.py` and `examples/tiny_vit.py` once planted and once `--fixed`, in
fresh processes (so torch.compile starts cold each time, as a user's run does), alternating which goes
first so that a busy machine slows both alike. A script reports the mean wall and CPU time (its process,
all threads) of a step after the first two. Per example: the medians over rounds of the planted/fixed
ratios of step wall time (with their range over rounds) and of step CPU time. The last line is
`fixed speed-up (planted/fixed step time, median): lm X, vit Y`.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path

from lmtrain.errors import UserError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
STEP_TIME = re.compile(r"mean step time: ([\d.]+) ms wall, ([\d.]+) ms CPU")


def run_example(script: Path, fixed: bool, steps: int) -> tuple[float, float]:
    """(wall ms, CPU ms) of a mean step of one run of an example script, in a fresh process."""
    cmd = [sys.executable, str(script), "--steps", str(steps)] + (["--fixed"] if fixed else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    found = STEP_TIME.findall(out.stdout)
    if out.returncode != 0 or not found:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return float(found[-1][0]), float(found[-1][1])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lmtrain bench doctor_examples", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="alternating rounds (planted and fixed each; default 5)"
    )
    parser.add_argument(
        "--steps", type=int, default=48, help="training steps per run, the first two untimed (default 48)"
    )
    parser.add_argument("--examples", default="lm,vit", help="comma-separated: lm, vit")
    opts = parser.parse_args(argv)
    names = [n.strip() for n in opts.examples.split(",") if n.strip()]
    unknown = [n for n in names if not (EXAMPLES / f"tiny_{n}.py").is_file()]
    if unknown or not names:
        raise UserError(f"--examples: unknown {unknown or names}; valid: lm, vit (scripts in {EXAMPLES})")
    if opts.rounds < 1 or opts.steps < 3:
        raise UserError("--rounds must be >= 1 and --steps >= 3 (the first two steps are not timed)")
    print(f"{opts.rounds} rounds x {opts.steps} steps, device: the scripts' default (cuda if available)")
    speedups = {}
    for name in names:
        script = EXAMPLES / f"tiny_{name}.py"
        times: dict[bool, list[float]] = {False: [], True: []}
        cpu: dict[bool, list[float]] = {False: [], True: []}
        for r in range(opts.rounds):
            for fixed in (r % 2 == 1, r % 2 == 0):  # alternate which version runs first
                wall_ms, cpu_ms = run_example(script, fixed, opts.steps)
                times[fixed].append(wall_ms)
                cpu[fixed].append(cpu_ms)
                label = "fixed  " if fixed else "planted"
                print(
                    f"  {name} round {r + 1} {label}: {wall_ms:8.1f} ms/step wall, {cpu_ms:8.1f} ms/step CPU"
                )
        ratios = [p / f for p, f in zip(times[False], times[True])]
        cpu_ratio = statistics.median(p / f for p, f in zip(cpu[False], cpu[True]))
        speedups[name] = statistics.median(ratios)
        print(f"{name}: planted {statistics.median(times[False]):.1f} ms/step, fixed {statistics.median(times[True]):.1f} "
              f"ms/step wall; planted/fixed {speedups[name]:.2f}x (rounds {min(ratios):.2f}-{max(ratios):.2f}), "
              f"CPU time per step {cpu_ratio:.2f}x")  # fmt: skip
    print(
        "fixed speed-up (planted/fixed step time, median): "
        + ", ".join(f"{n} {s:.2f}" for n, s in speedups.items())
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
