"""Step time of the doctor's example training scripts: the fixed versions against the planted ones, same run.

    lmtrain bench doctor_examples --rounds 7 --steps 46

Each round starts `examples/tiny_lm.py` (or `tiny_vit.py`) twice, planted and `--fixed`, in fresh
processes (so torch.compile starts cold, as a user's run does), and drives both with `--lockstep`: the two
runs take turns step by step, the order rotating with every step, while the other waits between steps.
So both meet the same seconds of a shared machine's load, which swings by a third within a second here;
alternating whole runs let a slow stretch decide a round. Each process times its own steps (wall, and
CPU of all its threads); the first two steps of each run (warm-up and compilation) are not counted.
Per example: the medians over rounds of the planted/fixed ratios of step wall time (with their range over
rounds) and of step CPU time. The last line is
`fixed speed-up (planted/fixed step time, median): lm X, vit Y`.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lmtrain.errors import UserError
from lmtrain.rounds import Sample, interleave

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
WARMUP_STEPS = 2
STEP_DONE = re.compile(r"^lockstep step (\d+): ([\d.]+) s wall, ([\d.]+) s CPU$")


class LockstepRun:
    """One run of an example script under `--lockstep`, advanced one step per `step()` call."""

    def __init__(self, script: Path, fixed: bool, steps: int):
        self.cmd = [sys.executable, str(script), "--steps", str(steps), "--lockstep"]
        self.cmd += ["--fixed"] if fixed else []
        self.stderr = tempfile.TemporaryFile(mode="w+")  # a file: a chatty stderr cannot fill a pipe
        self.proc = subprocess.Popen(
            self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True, bufsize=1
        )
        self._read_until("lockstep ready")  # setup (corpus, tokenizer, model) done before any step runs

    def _read_until(self, prefix: str) -> str:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line.rstrip("\n")
        self.proc.wait(timeout=60)
        self.stderr.seek(0)
        raise RuntimeError(
            f"{' '.join(self.cmd)} ended ({self.proc.returncode}) before '{prefix}':\n{self.stderr.read()[-2000:]}"
        )

    def step(self, last: bool) -> Sample:
        """Run one step; return its times as the process measured them. Waits until the process is
        between steps again (or, after its `last` step, has exited) so that nothing of it overlaps
        the other run's next step."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        found = STEP_DONE.match(self._read_until("lockstep step "))
        assert found, "the example prints 'lockstep step N: W s wall, C s CPU'"
        if last:
            self.close(wait=True)
        else:
            self._read_until("lockstep ready")
        return Sample(wall_s=float(found[2]), cpu_s=float(found[3]), units=1)

    def close(self, wait: bool = False) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()  # at a gate, the script exits
        try:
            self.proc.wait(timeout=120 if wait else 5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if wait and self.proc.returncode != 0:
            self.stderr.seek(0)
            raise RuntimeError(
                f"{' '.join(self.cmd)} failed ({self.proc.returncode}):\n{self.stderr.read()[-2000:]}"
            )
        self.stderr.close()


def timed_steps(script: Path, fixed: bool, steps: int):
    """A stream for `interleave`: a fresh run whose steps after the warm-up ones yield their Samples."""

    def start() -> Iterator[Sample]:
        run = LockstepRun(script, fixed, WARMUP_STEPS + steps)
        try:
            for _ in range(WARMUP_STEPS):
                run.step(last=False)
            for i in range(steps):
                yield run.step(last=i == steps - 1)
        finally:
            run.close()

    return start


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lmtrain bench doctor_examples", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--rounds", type=int, default=7, help="rounds, each a fresh planted run and fixed run (default 7)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=46,
        help=f"timed steps per run, after {WARMUP_STEPS} untimed (default 46)",
    )
    parser.add_argument("--examples", default="lm,vit", help="comma-separated: lm, vit")
    opts = parser.parse_args(argv)
    names = [n.strip() for n in opts.examples.split(",") if n.strip()]
    unknown = [n for n in names if not (EXAMPLES / f"tiny_{n}.py").is_file()]
    if unknown or not names:
        raise UserError(f"--examples: unknown {unknown or names}; valid: lm, vit (scripts in {EXAMPLES})")
    if opts.rounds < 1 or opts.steps < 1:
        raise UserError(f"--rounds and --steps must be >= 1, got {opts.rounds} and {opts.steps}")
    print(
        f"{opts.rounds} rounds x {opts.steps} timed steps (after {WARMUP_STEPS} untimed), planted and fixed "
        "alternating step by step; device: the scripts' default (cuda if available)"
    )
    speedups = {}
    for name in names:
        script = EXAMPLES / f"tiny_{name}.py"
        result = interleave(
            {
                "planted": timed_steps(script, False, opts.steps),
                "fixed": timed_steps(script, True, opts.steps),
            },
            items=opts.steps,
            rounds=opts.rounds,
            unit="steps",
            warmup=0,  # every round is cold by design: fresh processes
        )
        for r, (p, f) in enumerate(zip(result.samples["planted"], result.samples["fixed"], strict=True)):
            print(
                f"  {name} round {r + 1}: planted {1e3 / p.rate:7.1f} ms/step wall, {1e3 * p.cpu_per_unit:7.1f} "
                f"CPU; fixed {1e3 / f.rate:7.1f} wall, {1e3 * f.cpu_per_unit:7.1f} CPU; ratio {f.rate / p.rate:.2f}"
            )
        result.print_table(f"{name}: steps/s, planted and fixed alternating step by step", baseline="planted")
        speedups[name], lo, hi = result.ratio("fixed", "planted")
        print(
            f"{name}: planted/fixed step time {speedups[name]:.2f}x (rounds {lo:.2f}-{hi:.2f}), "
            f"CPU time per step {result.cpu_ratio('fixed', 'planted'):.2f}x"
        )
    print(
        "fixed speed-up (planted/fixed step time, median): "
        + ", ".join(f"{n} {s:.2f}" for n, s in speedups.items())
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
