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


def test_at_least_repeats_a_fast_contender_up_to_the_time_and_sums_its_units():
    from lmtrain.rounds import at_least

    m = FakeMachine()
    fast = at_least(m.work("fast", 0.001, 10), seconds=0.05, clock=lambda: m.wall)
    slow = at_least(m.work("slow", 0.2, 10), seconds=0.05, clock=lambda: m.wall)
    assert fast() == pytest.approx(500, abs=10) and m.log.count("fast") == pytest.approx(50, abs=1)
    assert slow() == 10 and m.log.count("slow") == 1  # a slow contender still runs exactly once
    result = compare({"fast": fast, "slow": slow}, rounds=3, clock=lambda: m.wall, cpu_clock=lambda: m.cpu,
                     warn=lambda _: None)  # fmt: skip
    assert result.ratio("fast", "slow")[0] == pytest.approx(200, rel=0.05)  # rates, not run counts
    with pytest.raises(ValueError, match="seconds must be > 0"):
        at_least(fast, 0)
