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
    """The benchmark names: the scripts in bench/. `lmtrain --help`, `lmtrain bench --help` and
    `make bench` all list them from here."""
    if not BENCH_DIR.is_dir():
        return []
    return sorted(p.stem for p in BENCH_DIR.glob("*.py") if not p.stem.startswith("_"))


def summary(name: str) -> str:
    """The first sentence of a benchmark script's docstring, read without importing it."""
    import ast

    doc = ast.get_docstring(ast.parse((BENCH_DIR / f"{name}.py").read_text())) or ""
    first = doc.strip().split("\n\n")[0].replace("\n", " ")
    return "" if first.startswith(("python ", "lmtrain ")) else first


def main(argv: list[str]) -> int:
    names = available()
    if not argv or argv[0] in ("-h", "--help", "--list"):
        print("usage: lmtrain bench NAME [options]   (`lmtrain bench NAME --help` for the options of one)\n")
        print("benchmarks:" if names else "benchmarks: (none found)")
        width = max((len(n) for n in names), default=0)
        for name in names:
            print(f"  {name:<{width}}  {summary(name)}".rstrip())
        print(f"\n(scripts in {BENCH_DIR}; each prints a ratio against a baseline measured in the same run)")
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
