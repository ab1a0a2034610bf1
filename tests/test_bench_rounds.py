"""Alternating-round benchmark timing: rotation, per-round ratios, CPU-time ratio, the load warning."""

from __future__ import annotations

import pytest

from lmtrain.rounds import compare, load_warning, rotated


class FakeMachine:
    """Wall and CPU clocks that contenders advance; `load` slows wall time but not CPU time."""

    def __init__(self):
        self.wall = self.cpu = 0.0
        self.load = 1.0
        self.log: list[str] = []

    def work(self, name: str, cpu_seconds: float, units: float):
        def run():
            self.log.append(name)
            self.cpu += cpu_seconds
            self.wall += cpu_seconds * self.load
            return units

        return run


def test_order_rotates_every_round():
    assert [rotated(["a", "b", "c"], r) for r in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"],
    ]  # fmt: skip


def test_a_load_change_between_rounds_does_not_move_the_per_round_ratio():
    m = FakeMachine()
    slow, fast = m.work("slow", 0.4, 100), m.work("fast", 0.1, 100)

    def slow_with_load_ramp():
        m.load *= 3  # the machine gets much busier from one round to the next
        return slow()

    result = compare(
        {"slow": slow_with_load_ramp, "fast": fast}, rounds=4, unit="tokens", warmup=1,
        clock=lambda: m.wall, cpu_clock=lambda: m.cpu, warn=lambda _: None,
    )  # fmt: skip
    # warm-up once each, then rounds in rotating order
    assert m.log == ["slow", "fast", "slow", "fast", "fast", "slow", "slow", "fast", "fast", "slow"]
    ratios = result.round_ratios("fast", "slow")
    assert len(ratios) == 4
    # rates within a round differ by the load step between the two runs only (3x), never by 3^rounds
    assert all(4 / 3 - 1e-9 <= r <= 12 + 1e-9 for r in ratios)
    med, lo, hi = result.ratio("fast", "slow")
    assert lo <= med <= hi
    # CPU time per unit ignores the load: exactly 4x
    assert result.cpu_ratio("fast", "slow") == pytest.approx(4.0)
    # timing the phases one after the other would have given a ratio over 3^3 times off
    line = result.headline("fast", "slow", "speedup")
    assert line.startswith("speedup: ") and "CPU-time ratio 4.00" in line


def test_steady_machine_gives_the_exact_ratio_and_medians():
    m = FakeMachine()
    result = compare(
        {"a": m.work("a", 0.2, 10), "b": m.work("b", 0.1, 20)}, rounds=3, unit="items", warmup=0,
        clock=lambda: m.wall, cpu_clock=lambda: m.cpu, warn=lambda _: None,
    )  # fmt: skip
    assert result.median_rate("a") == pytest.approx(50.0)
    assert result.median_rate("b") == pytest.approx(200.0)
    assert result.ratio("b", "a") == pytest.approx((4.0, 4.0, 4.0))
    assert result.median_cpu_per_unit("b") == pytest.approx(0.005)


def test_table_and_load_line_print(capsys):
    m = FakeMachine()
    result = compare(
        {"a": m.work("a", 0.2, 10), "b": m.work("b", 0.1, 20)}, rounds=2, unit="tok",
        clock=lambda: m.wall, cpu_clock=lambda: m.cpu, warn=lambda _: None,
    )  # fmt: skip
    result.print_table("demo", baseline="a")
    out = capsys.readouterr().out
    assert "median tok/s" in out and "4.00" in out and "load average" in out and "2 rounds" in out


def test_load_warning_only_above_the_cores():
    assert load_warning((1.5, 1.0, 1.0), cores=2) is None
    message = load_warning((9.3, 8.0, 7.0), cores=2)
    assert message is not None and "9.30" in message and "2 usable cores" in message


def test_compare_warns_through_the_given_callback(monkeypatch):
    import lmtrain.rounds as rounds

    monkeypatch.setattr(rounds, "load_average", lambda: (64.0, 64.0, 64.0))
    seen = []
    m = FakeMachine()
    compare({"a": m.work("a", 0.1, 1)}, rounds=1, clock=lambda: m.wall, cpu_clock=lambda: m.cpu,
            warn=seen.append)  # fmt: skip
    assert len(seen) == 1 and "64.00" in seen[0]


def test_bad_arguments():
    m = FakeMachine()
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        compare({"a": m.work("a", 0.1, 1)}, rounds=0)
    with pytest.raises(ValueError, match="no contenders"):
        compare({}, rounds=1)
    with pytest.raises(ValueError, match="reported 0 units"):
        compare({"a": m.work("a", 0.1, 0)}, rounds=1, warmup=0, warn=lambda _: None)
    result = compare({"a": m.work("a", 0.1, 1)}, rounds=1, warmup=0, clock=lambda: m.wall,
                     cpu_clock=lambda: m.cpu, warn=lambda _: None)  # fmt: skip
    with pytest.raises(ValueError, match="no contender named 'b'; the contenders are a"):
        result.ratio("a", "b")


def test_same_work_takes_the_same_items_every_call_and_repeats_short_passes():
    from lmtrain.rounds import same_work

    m = FakeMachine()
    costs = [0.001 * (1 + i % 7) for i in range(100)]  # items of varying cost, always in this order
    starts = []

    def stream(name):
        def start():
            starts.append(name)
            for cost in costs:
                yield m.work(name, cost, 10)()

        return start

    slow = same_work(stream("slow"), items=50)  # one pass: the first 50 items, 0.197 s
    assert slow() == 500 and m.wall == pytest.approx(sum(costs[:50])) and starts == ["slow"]
    m.load = 3.0  # a busier machine: the same items, so the same units, in three times the time
    assert slow() == 500 and m.wall == pytest.approx(4 * sum(costs[:50])) and starts == ["slow"] * 2
    m.load = 1.0
    fast = same_work(stream("fast"), items=5, seconds=0.1, clock=lambda: m.wall)  # 0.015 s a pass
    assert fast() == 7 * 50 and starts.count("fast") == 7  # passes until 0.1 s: 7 x 0.015 s
    result = compare({"fast": fast, "slow": slow}, rounds=3, clock=lambda: m.wall, cpu_clock=lambda: m.cpu,
                     warn=lambda _: None)  # fmt: skip
    assert result.ratio("fast", "slow")[0] == pytest.approx((50 / 0.015) / (500 / sum(costs[:50])))
    with pytest.raises(ValueError, match="items must be >= 1"):
        same_work(stream("x"), items=0)
    with pytest.raises(ValueError, match="the work ended after 100 items; a pass takes 101"):
        same_work(stream("short"), items=101)()


def test_interleave_alternates_item_by_item_and_restarts_every_round():
    from lmtrain.rounds import interleave

    m = FakeMachine()
    starts = []

    def stream(name, cost, units):
        def start():
            starts.append(name)
            for _ in range(10):
                yield m.work(name, cost, units)()

        return start

    result = interleave(
        {"a": stream("a", 0.2, 10), "b": stream("b", 0.1, 20)}, items=3, rounds=2, unit="items", warmup=1,
        clock=lambda: m.wall, cpu_clock=lambda: m.cpu, warn=lambda _: None,
    )  # fmt: skip
    # one item of each in turn, the order rotating with every item and every round
    warmup_round = first_round = ["a", "b", "b", "a", "a", "b"]
    assert m.log == warmup_round + first_round + ["b", "a", "a", "b", "b", "a"]
    assert starts == ["a", "b", "a", "b", "b", "a"]  # every round begins each stream afresh
    assert [s.units for s in result.samples["a"]] == [30, 30]
    assert result.ratio("b", "a") == pytest.approx((4.0, 4.0, 4.0))


def test_interleave_holds_the_ratio_when_the_load_swings_from_item_to_item():
    from lmtrain.rounds import interleave, same_work

    m = FakeMachine()
    calls = [0]

    def stream(name, cost):
        def start():
            for _ in range(8):
                calls[0] += 1
                m.load = 3.0 if (calls[0] - 1) // 2 % 2 else 1.0  # the load changes every two items
                yield m.work(name, cost, 1)()

        return start

    fine = interleave(
        {"slow": stream("slow", 0.4), "fast": stream("fast", 0.1)}, items=8, rounds=3, warmup=0,
        clock=lambda: m.wall, cpu_clock=lambda: m.cpu, warn=lambda _: None,
    )  # fmt: skip
    assert fine.ratio("fast", "slow") == pytest.approx((4.0, 4.0, 4.0))
    # Whole runs of two items each, alternated: each run meets one load only, and the ratio is off 3x.
    calls[0] = 0
    coarse = compare(
        {"slow": same_work(stream("slow", 0.4), 2), "fast": same_work(stream("fast", 0.1), 2)},
        rounds=3, warmup=0, clock=lambda: m.wall, cpu_clock=lambda: m.cpu, warn=lambda _: None,
    )  # fmt: skip
    assert sorted(coarse.round_ratios("fast", "slow")) != pytest.approx([4.0, 4.0, 4.0])


def test_interleave_bad_input_and_early_end():
    from lmtrain.rounds import interleave

    m = FakeMachine()
    closed = []

    def short():
        try:
            yield m.work("short", 0.1, 1)()
        finally:
            closed.append("short")

    def endless():
        try:
            while True:
                yield m.work("endless", 0.1, 1)()
        finally:
            closed.append("endless")

    with pytest.raises(ValueError, match="'short''s work ended after 1 items; a round takes 3"):
        interleave({"endless": endless, "short": short}, items=3, warmup=0, warn=lambda _: None)
    assert sorted(closed) == ["endless", "short"]  # both streams released
    with pytest.raises(ValueError, match="rounds and items must be >= 1, got 1 and 0"):
        interleave({"a": endless}, items=0, rounds=1)
    with pytest.raises(ValueError, match="no contenders"):
        interleave({}, items=1)

    def nothing():
        while True:
            yield 0

    with pytest.raises(ValueError, match="'zero' reported 0.0 units"):
        interleave({"zero": nothing}, items=2, warmup=0, warn=lambda _: None)


def test_interleave_takes_the_times_of_items_timed_where_they_ran():
    """A stream that yields Samples (a step timed inside another process) is measured by them, not by
    this process's clocks: a slow start (launching the process) is not counted."""
    from lmtrain.rounds import Sample, interleave

    m = FakeMachine()

    def remote(name, step_s):
        def start():
            m.work(name + " start", 5.0, 0)()  # launching: untimed, whatever it costs
            for _ in range(4):
                yield Sample(wall_s=step_s, cpu_s=2 * step_s, units=1)

        return start

    result = interleave(
        {"planted": remote("planted", 0.3), "fixed": remote("fixed", 0.1)}, items=4, rounds=2, unit="steps",
        warmup=0, clock=lambda: m.wall, cpu_clock=lambda: m.cpu, warn=lambda _: None,
    )  # fmt: skip
    assert m.wall > 0  # the starts did cost this process's clock
    assert result.ratio("fixed", "planted") == pytest.approx((3.0, 3.0, 3.0))
    assert [s.wall_s for s in result.samples["planted"]] == pytest.approx([1.2, 1.2])
    assert result.median_cpu_per_unit("fixed") == pytest.approx(0.2)
