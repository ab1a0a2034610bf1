"""Benchmark contenders in alternating rounds, so that a shared machine's load hits all of them alike.

    from lmtrain.rounds import compare
    result = compare({"recompute": recompute, "cached": cached}, rounds=5, unit="tokens")
    result.print_table("decode, 512 new tokens")
    print(result.headline("cached", "recompute", "kv-cache speedup"))

Each contender is a callable that does one unit-counted piece of work and returns how many units it
did (tokens, bytes, batches). A round runs every contender once, in turn; the order rotates from round
to round (A B C, B C A, C A B, ...) so that none always runs first, into a cold cache, or last, as the
machine gets busier. Timing one contender's whole run and then the other's lets a load change between
the two phases decide the ratio; within one round both see nearly the same machine, so the per-round
ratio is what is reported: its median, and its spread (min..max over the rounds).

Beside wall time, the process's CPU time (user + sys of all its threads) per unit of work: on a loaded
machine the wall time of a contender grows while its CPU time per unit stays nearly put, so the CPU-time
ratio is the steadier of the two (but it says nothing about how well a contender uses several cores).
A warning is printed when the load average exceeds the cores this process may run on.

Where the machine's speed swings faster than a contender's run lasts (this shared machine's does, by
a third within a second), a round of whole runs still pairs a fast stretch with a slow one. `interleave`
alternates finer: item by item (a batch each), so that every contender runs through the same seconds.

    result = interleave({"padded": padded_batches, "packed": packed_batches}, items=32, rounds=15)
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask; the machine's count where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except (AttributeError, OSError):  # Windows
        return None


def load_warning(load: tuple[float, float, float] | None = None, cores: int | None = None) -> str | None:
    """A one-line warning when the 1-minute load average exceeds the usable cores, else None."""
    load = load_average() if load is None else load
    cores = usable_cores() if cores is None else cores
    if load is None or load[0] <= cores:
        return None
    return (
        f"warning: load average {load[0]:.2f} exceeds the {cores} usable cores: other processes compete "
        "for the CPU, so wall times are inflated; compare the per-round ratios and the CPU-time ratio"
    )


@dataclass
class Sample:
    """One run of one contender."""

    wall_s: float
    cpu_s: float  # process user + sys over the run
    units: float

    @property
    def rate(self) -> float:
        return self.units / self.wall_s

    @property
    def cpu_per_unit(self) -> float:
        return self.cpu_s / self.units


@dataclass
class RoundsResult:
    unit: str
    order: list[str]
    samples: dict[str, list[Sample]]  # contender -> one Sample per round, in round order
    load_before: tuple[float, float, float] | None = None
    load_after: tuple[float, float, float] | None = None
    cores: int = field(default_factory=usable_cores)

    def median_rate(self, name: str) -> float:
        return statistics.median(s.rate for s in self.samples[name])

    def median_cpu_per_unit(self, name: str) -> float:
        return statistics.median(s.cpu_per_unit for s in self.samples[name])

    def round_ratios(self, name: str, baseline: str) -> list[float]:
        """Rate of `name` over rate of `baseline`, round by round (both measured in the same round)."""
        for n in (name, baseline):
            if n not in self.samples:
                raise ValueError(f"no contender named {n!r}; the contenders are {', '.join(self.order)}")
        return [a.rate / b.rate for a, b in zip(self.samples[name], self.samples[baseline], strict=True)]

    def ratio(self, name: str, baseline: str) -> tuple[float, float, float]:
        """(median, min, max) of the per-round ratio of `name` over `baseline`."""
        ratios = self.round_ratios(name, baseline)
        return statistics.median(ratios), min(ratios), max(ratios)

    def cpu_ratio(self, name: str, baseline: str) -> float:
        """How many times less CPU time per unit `name` needs than `baseline` (medians over rounds)."""
        return self.median_cpu_per_unit(baseline) / self.median_cpu_per_unit(name)

    def headline(self, name: str, baseline: str, label: str) -> str:
        """`label: R (rounds a..b, CPU-time ratio c)`: the line a benchmark ends with."""
        med, lo, hi = self.ratio(name, baseline)
        return f"{label}: {med:.2f} (rounds {lo:.2f}..{hi:.2f}, CPU-time ratio {self.cpu_ratio(name, baseline):.2f})"

    def load_line(self) -> str:
        def fmt(load):
            return "n/a" if load is None else " ".join(f"{x:.2f}" for x in load)

        return (
            f"load average (1/5/15 min) before {fmt(self.load_before)}, after {fmt(self.load_after)}; "
            f"{self.cores} usable cores; {len(next(iter(self.samples.values())))} rounds, order rotating"
        )

    def print_table(self, title: str, baseline: str | None = None, file=None) -> None:
        """A rich table: median rate, spread over rounds, CPU s per unit, ratios against `baseline`."""
        from rich.console import Console
        from rich.table import Table

        baseline = baseline or self.order[0]
        table = Table(title=f"{title} (ratios: against {baseline}, median and spread over rounds)")
        for col in (
            "contender", f"median {self.unit}/s", "rounds min..max", f"CPU ms/{self.unit}",
            "ratio", "ratio min..max", "CPU-time ratio",
        ):  # fmt: skip
            table.add_column(
                col, justify="left" if col == "contender" else "right", no_wrap=col == "contender"
            )
        for name in self.order:
            rates = [s.rate for s in self.samples[name]]
            med, lo, hi = self.ratio(name, baseline)
            table.add_row(
                name,
                _si(self.median_rate(name)),
                f"{_si(min(rates))}..{_si(max(rates))}",
                f"{1e3 * self.median_cpu_per_unit(name):.3g}",
                f"{med:.2f}",
                f"{lo:.2f}..{hi:.2f}",
                f"{self.cpu_ratio(name, baseline):.2f}",
            )
        Console(file=file or sys.stdout, width=120).print(table)
        print(self.load_line(), file=file or sys.stdout)


def _si(x: float) -> str:
    """1234567 -> '1.23 M': rates of bytes or tokens stay readable in a narrow column."""
    for scale, prefix in ((1e12, " T"), (1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{prefix}"
    return f"{x:.3g}"


def same_work(
    start: Callable[[], Iterator[float]],
    items: int,
    seconds: float = 0.0,
    clock: Callable[[], float] = time.perf_counter,
):
    """A contender that does the same work in every round and every run.

    `start()` begins the work afresh (a new data loader with a fixed seed, say) and yields the units of
    each item it produces; one pass takes its first `items` items. A call makes passes until `seconds`
    have passed (at least one) and returns the units of all of them. Two things it rules out: a stream
    whose items differ in cost (documents of varying length) moving the rate with the items a round
    happens to get, and a pass of a millisecond being doubled by one preemption.
    """
    if items < 1:
        raise ValueError(f"items must be >= 1, got {items}")

    def one_pass() -> float:
        units, taken = 0.0, 0
        for units_of_item in start():
            units, taken = units + units_of_item, taken + 1
            if taken == items:
                return units
        raise ValueError(f"the work ended after {taken} items; a pass takes {items}")

    def run() -> float:
        began, units = clock(), one_pass()
        while clock() - began < seconds:
            units += one_pass()
        return units

    return run


def rotated(order: list[str], round_index: int) -> list[str]:
    """The contenders' order in round `round_index`: rotated by one place per round."""
    k = round_index % len(order)
    return order[k:] + order[:k]


def compare(
    contenders: Mapping[str, Callable[[], float]],
    rounds: int = 5,
    unit: str = "units",
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    cpu_clock: Callable[[], float] = time.process_time,
    warn: Callable[[str], None] | None = None,
) -> RoundsResult:
    """Run every contender `warmup` times (untimed), then `rounds` rounds in rotating order.

    `sync` (e.g. torch.cuda.synchronize) runs before each clock reading so that queued GPU work is
    counted in the contender that queued it. `warn` receives the load warning (default: stderr).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not contenders:
        raise ValueError("no contenders to compare")
    order = list(contenders)
    sync = sync or (lambda: None)

    def one_round(r: int) -> dict[str, Sample]:
        measured = {}
        for name in rotated(order, r):
            sync()
            wall0, cpu0 = clock(), cpu_clock()
            units = contenders[name]()
            sync()
            measured[name] = _sample(name, clock() - wall0, cpu_clock() - cpu0, units)
        return measured

    return _run_rounds(order, rounds, warmup, unit, one_round, warn)


def _sample(name: str, wall: float, cpu: float, units) -> Sample:
    if not units or units <= 0:
        raise ValueError(f"contender {name!r} reported {units!r} units of work; expected > 0")
    return Sample(max(wall, 1e-9), max(cpu, 1e-9), float(units))


def _run_rounds(
    order: list[str],
    rounds: int,
    warmup: int,
    unit: str,
    one_round: Callable[[int], dict[str, Sample]],
    warn: Callable[[str], None] | None,
) -> RoundsResult:
    """`warmup` untimed rounds, the load warning, then `rounds` rounds of `one_round(r)` (a Sample per
    contender)."""
    for r in range(warmup):
        one_round(r)
    before = load_average()
    message = load_warning(before)
    if message:
        (warn or (lambda m: print(m, file=sys.stderr)))(message)
    samples: dict[str, list[Sample]] = {name: [] for name in order}
    for r in range(rounds):
        for name, sample in one_round(r).items():
            samples[name].append(sample)
    return RoundsResult(unit, order, samples, before, load_average())


def interleave(
    streams: Mapping[str, Callable[[], Iterator[float | Sample]]],
    items: int,
    rounds: int = 5,
    unit: str = "units",
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    cpu_clock: Callable[[], float] = time.process_time,
    warn: Callable[[str], None] | None = None,
) -> RoundsResult:
    """Contenders that alternate item by item rather than run by run.

    `streams[name]()` begins a contender's work afresh (a new data loader with a fixed seed, say) and
    yields the units of each item it produces. In a round every contender starts afresh and takes its
    first `items` items, one item of each contender in turn, the order rotating with every item; a
    contender's sample for the round sums the times and units of its items (its first item includes
    the start). So every round does the same work, and the contenders share each second of the
    machine's load however briefly it lasts. `warmup` rounds run untimed first.

    An item that is timed where it runs, such as a step of a training script in a process of its own,
    is yielded as a `Sample` of its wall and CPU time and units; its times replace this process's clocks.
    """
    if rounds < 1 or items < 1:
        raise ValueError(f"rounds and items must be >= 1, got {rounds} and {items}")
    if not streams:
        raise ValueError("no contenders to compare")
    order = list(streams)
    sync = sync or (lambda: None)

    def one_round(r: int) -> dict[str, Sample]:
        running: dict[str, Iterator[float | Sample]] = {}
        totals = {name: [0.0, 0.0, 0.0] for name in order}  # wall s, CPU s, units
        try:
            for i in range(items):
                for name in rotated(order, r + i):
                    sync()
                    wall0, cpu0 = clock(), cpu_clock()
                    if name not in running:
                        running[name] = iter(streams[name]())
                    units = next(running[name], None)
                    sync()
                    wall, cpu = clock() - wall0, cpu_clock() - cpu0
                    if units is None:
                        raise ValueError(
                            f"contender {name!r}'s work ended after {i} items; a round takes {items}"
                        )
                    if isinstance(units, Sample):  # timed where it ran (another process, say)
                        wall, cpu, units = units.wall_s, units.cpu_s, units.units
                    total = totals[name]
                    total[0], total[1], total[2] = total[0] + wall, total[1] + cpu, total[2] + units
        finally:
            for it in running.values():
                close = getattr(it, "close", None)
                if close is not None:
                    close()  # a generator's loader is released now, not at garbage collection
        return {name: _sample(name, *total) for name, total in totals.items()}

    return _run_rounds(order, rounds, warmup, unit, one_round, warn)
