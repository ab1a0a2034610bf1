"""Summary of a torch.profiler window: time per training phase and the top operators by self time.

    python -c "from lmtrain.torch_summary import summary_markdown; help(summary_markdown)"

Phases come from the record_function labels the step hooks open (`lmtrain/forward`, `lmtrain/backward`,
`lmtrain/optimizer`, and `lmtrain/data_wait` from the start of a step until its forward pass: the time
spent waiting for the data loader).
"""

from __future__ import annotations

from pathlib import Path

PHASES = {"lmtrain/data_wait": "data-loader wait", "lmtrain/forward": "forward",
          "lmtrain/backward": "backward", "lmtrain/optimizer": "optimizer"}  # fmt: skip


def _us(event, *names: str) -> float:
    for name in names:
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0


def summarise(prof, steps: int, top: int = 15) -> dict:
    """{"steps", "phases": [...], "ops": [...]} from a stopped torch.profiler.profile (times in ms)."""
    events = prof.key_averages()
    phases = []
    for ev in events:
        if ev.key in PHASES:
            phases.append(
                {
                    "phase": PHASES[ev.key],
                    "calls": ev.count,
                    "cpu_ms": _us(ev, "cpu_time_total") / 1e3,
                    "device_ms": _us(ev, "device_time_total", "cuda_time_total") / 1e3,
                }
            )
    order = list(PHASES.values())
    phases.sort(key=lambda r: order.index(r["phase"]))
    total = sum(p["cpu_ms"] for p in phases) or 1.0
    for p in phases:
        p["cpu_share"] = p["cpu_ms"] / total
        p["cpu_ms_per_step"] = p["cpu_ms"] / max(steps, 1)
    ops = [ev for ev in events if not ev.key.startswith(("lmtrain/", "ProfilerStep"))]
    ops.sort(key=lambda ev: _us(ev, "self_cpu_time_total"), reverse=True)
    op_rows = [
        {
            "op": ev.key,
            "calls": ev.count,
            "self_cpu_ms": _us(ev, "self_cpu_time_total") / 1e3,
            "cpu_ms": _us(ev, "cpu_time_total") / 1e3,
            "self_device_ms": _us(ev, "self_device_time_total", "self_cuda_time_total") / 1e3,
        }
        for ev in ops[:top]
    ]
    return {"steps": steps, "phases": phases, "ops": op_rows}


def summary_markdown(summary: dict) -> str:
    from lmtrain.tables import fmt, markdown_table

    out = [f"# torch.profiler summary ({summary['steps']} steps)\n\n## Phases\n\n"]
    out.append(
        markdown_table(
            ["phase", "calls", "CPU ms", "ms/step", "% of phases", "device ms"],
            [
                [
                    p["phase"],
                    str(p["calls"]),
                    fmt(p["cpu_ms"], 2),
                    fmt(p["cpu_ms_per_step"], 2),
                    fmt(100 * p["cpu_share"], 1),
                    fmt(p["device_ms"], 2),
                ]
                for p in summary["phases"]
            ],  # fmt: skip
        )
    )
    out.append("\n## Top operators by self CPU time\n\n")
    out.append(
        markdown_table(
            ["operator", "calls", "self CPU ms", "CPU ms", "self device ms"],
            [
                [
                    o["op"],
                    str(o["calls"]),
                    fmt(o["self_cpu_ms"], 2),
                    fmt(o["cpu_ms"], 2),
                    fmt(o["self_device_ms"], 2),
                ]
                for o in summary["ops"]
            ],  # fmt: skip
        )
    )
    return "".join(out)


def write_summary(summary: dict, path: Path, print_it: bool = True) -> Path:
    """Write the markdown summary atomically (and print it as rich tables)."""
    from lmtrain.atomic import atomic_write_text

    atomic_write_text(path, summary_markdown(summary))
    if print_it:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"torch.profiler: phases over {summary['steps']} steps", title_justify="left")
        for col in ("phase", "calls", "CPU ms", "ms/step", "% of phases", "device ms"):
            table.add_column(col, justify="left" if col == "phase" else "right")
        for p in summary["phases"]:
            table.add_row(p["phase"], str(p["calls"]), f"{p['cpu_ms']:.2f}", f"{p['cpu_ms_per_step']:.2f}",
                          f"{100 * p['cpu_share']:.1f}", f"{p['device_ms']:.2f}")  # fmt: skip
        ops = Table(title="top operators by self CPU time", title_justify="left")
        for col in ("operator", "calls", "self CPU ms", "CPU ms"):
            ops.add_column(col, justify="left" if col == "operator" else "right")
        for o in summary["ops"][:10]:
            ops.add_row(o["op"], str(o["calls"]), f"{o['self_cpu_ms']:.2f}", f"{o['cpu_ms']:.2f}")
        console = Console()
        console.print(table)
        console.print(ops)
    return path
