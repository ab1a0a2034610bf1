"""Read training runs: lmtrain run directories (metrics.jsonl) and the course train.py's stdout logs.

    python -c "from lmtrain.tools.runlog import load_runs; print(load_runs(['runs/*'])[0].records[:2])"

Every record is normalised to the keys `step`, `loss`, `val_loss`, `tokens_per_s`, `tflops`, `mfu_pct`
(percent), `peak_mem_gib`; missing values are absent. The course log lines look like
`Step: 5 | Loss: 11.93 | Tokens per second: 6674.39 | Training tokens per second (%): 98.3 | MFU (%): 32.6 |
TFLOPs: 322.4`, possibly behind a logging prefix; the parser takes any `key: number` fields between `|`.
"""

from __future__ import annotations

import glob
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from lmtrain.errors import UserError

# metrics.jsonl key -> normalised key (first match wins); MFU there is a fraction.
_JSONL_KEYS = {
    "loss": ("loss",),
    "val_loss": ("val_loss",),
    "tokens_per_s": ("tokens_per_s",),
    "tflops": ("tflops_per_device", "tflops"),
    "mfu": ("mfu",),
    "peak_mem_gib": ("peak_memory_gib", "peak_mem_gib", "peak_mem"),
}

# course log field (lower case, spaces squeezed) -> normalised key
_LOG_KEYS = {
    "step": "step",
    "loss": "loss",
    "tokens per second": "tokens_per_s",
    "training tokens per second (%)": "train_tokens_pct",
    "mfu (%)": "mfu_pct",
    "mfu": "mfu_pct",
    "tflops": "tflops",
    "val loss": "val_loss",
    "validation loss": "val_loss",
    "peak memory (gb)": "peak_mem_gib",
    "peak memory (gib)": "peak_mem_gib",
}

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_STEP = re.compile(r"\bstep\s*:", re.IGNORECASE)
_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf", re.IGNORECASE)


@dataclass
class Run:
    name: str
    source: Path
    records: list[dict] = field(default_factory=list)

    def train(self) -> list[dict]:
        return [r for r in self.records if "loss" in r]

    def val(self) -> list[dict]:
        return [r for r in self.records if "val_loss" in r]


def _number(text: str) -> float | None:
    m = _NUMBER.search(text)
    if not m:
        return None
    try:
        return float(m.group(0).replace(",", ""))
    except ValueError:
        return None


def parse_course_line(line: str) -> dict | None:
    """One course train.py log line as a normalised record, or None when it is not a step line."""
    line = _ANSI.sub("", line)
    m = _STEP.search(line)
    if not m:
        return None
    record: dict = {}
    for part in line[m.start() :].split("|"):
        if ":" not in part:
            continue
        key, _, value = part.partition(":")
        key = " ".join(key.strip().lower().split())
        norm = _LOG_KEYS.get(key)
        number = _number(value)
        if norm is None or number is None:
            continue
        record[norm] = number
    if "step" not in record or len(record) < 2:
        return None
    record["step"] = int(record["step"])
    return record


def read_course_log(path: Path) -> list[dict]:
    with open(path, errors="replace") as fh:
        return [r for r in map(parse_course_line, fh) if r is not None]


def read_metrics_jsonl(path: Path) -> list[dict]:
    records = []
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                if lineno > 1 and not line.endswith("\n"):
                    break  # a run killed mid-write leaves a partial last line: keep what came before
                raise UserError(
                    f"{path}:{lineno}: not valid JSON ({exc.msg}); expected one object per line"
                ) from None
            if not isinstance(raw, dict) or "step" not in raw:
                raise UserError(f"{path}:{lineno}: expected a JSON object with a 'step' field")
            rec: dict = {"step": int(raw["step"])}
            for norm, keys in _JSONL_KEYS.items():
                for key in keys:
                    value = raw.get(key)
                    if (
                        isinstance(value, (int, float))
                        and not isinstance(value, bool)
                        and math.isfinite(value)
                    ):
                        rec[norm] = float(value)
                        break
            if "mfu" in rec:
                rec["mfu_pct"] = 100 * rec.pop("mfu")
            records.append(rec)
    return records


def load_run(path: Path) -> Run:
    """A run from a run directory (metrics.jsonl), a metrics.jsonl file, or a course log file."""
    if path.is_dir():
        metrics = path / "metrics.jsonl"
        if metrics.is_file():
            return Run(path.name, metrics, read_metrics_jsonl(metrics))
        logs = sorted(path.glob("*.out")) + sorted(path.glob("*.log"))
        for log in logs:
            records = read_course_log(log)
            if records:
                return Run(path.name, log, records)
        raise UserError(f"{path}: no metrics.jsonl and no log with `Step: N | Loss: ...` lines in it")
    if not path.is_file():
        raise UserError(f"{path}: no such run directory or file")
    if path.name.endswith(".jsonl"):
        return Run(
            path.parent.name if path.name == "metrics.jsonl" else path.stem, path, read_metrics_jsonl(path)
        )
    records = read_course_log(path)
    if not records:
        raise UserError(
            f"{path}: no training log lines found (expected metrics.jsonl, or lines like "
            "`Step: 5 | Loss: 11.93 | Tokens per second: 6674.39 | MFU (%): 32.6 | TFLOPs: 322.4`)"
        )
    return Run(path.stem, path, records)


def expand(patterns: list[str]) -> list[Path]:
    """Paths and globs -> existing paths, in the order given (a pattern matching nothing is an error)."""
    out: list[Path] = []
    for pattern in patterns:
        if any(ch in pattern for ch in "*?["):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise UserError(f"'{pattern}' matches no run directory or log file")
            out += [Path(m) for m in matches]
        else:
            out.append(Path(pattern))
    return out


def load_runs(patterns: list[str]) -> list[Run]:
    if not patterns:
        raise UserError("give at least one run directory, metrics.jsonl or log file")
    runs = [load_run(p) for p in expand(patterns)]
    names: dict[str, int] = {}
    for run in runs:  # make labels unique (several `metrics.jsonl` of runs with the same name)
        count = names.get(run.name, 0)
        names[run.name] = count + 1
        if count:
            run.name = f"{run.name} ({count + 1})"
    return runs
