"""`lmtrain bench NAME`: run one benchmark script from the repository's `bench/` folder.

lmtrain bench data
lmtrain bench --list
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from lmtrain.errors import UserError

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


def available() -> list[str]:
    if not BENCH_DIR.is_dir():
        return []
    return sorted(p.stem for p in BENCH_DIR.glob("*.py") if not p.stem.startswith("_"))


def main(argv: list[str]) -> int:
    names = available()
    if not argv or argv[0] in ("-h", "--help", "--list"):
        print("usage: lmtrain bench NAME [options]\n\nbenchmarks: " + (", ".join(names) or "(none found)"))
        print(f"(scripts in {BENCH_DIR}; each prints a ratio against a baseline measured in the same run)")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in names:
        if not BENCH_DIR.is_dir():
            raise UserError(
                f"no bench/ folder beside the lmtrain package ({BENCH_DIR}): run from a git checkout"
            )
        raise UserError(f"unknown benchmark '{name}'; valid: {', '.join(names)}")
    spec = importlib.util.spec_from_file_location(f"lmtrain_bench_{name}", BENCH_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return int(module.main(rest) or 0)
