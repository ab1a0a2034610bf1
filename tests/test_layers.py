"""The layers import downward only: lmtrain (core) <- profiling <- tools, jobs (bench and tests on top).

Every module's import statements are parsed (module level and inside functions, relative imports
resolved) and each import is mapped to the layer it reaches; an upward import fails with the file, the
line and the rule. The core's own command table may only name core modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# folder -> layer; the links lmtrain/profiling and lmtrain/tools are the same files as the folders.
FOLDER_LAYER = {
    "lmtrain": "core",
    "profiling": "profiling",
    "tools": "tools",
    "jobs": "jobs",
    "bench": "bench",
}
# layer -> layers it may import
ALLOWED = {
    "core": {"core"},
    "profiling": {"core", "profiling"},
    "tools": {"core", "profiling", "tools"},
    "jobs": {"core", "profiling", "tools", "jobs"},
    "bench": {"core", "profiling", "tools", "bench"},
}


def layer_of_import(name: str) -> str | None:
    """The layer a dotted module name belongs to; None for third-party and stdlib modules."""
    parts = name.split(".")
    if parts[0] == "lmtrain":
        if len(parts) > 1 and parts[1] in ("profiling", "tools"):
            return parts[1]
        return "core"
    if parts[0] in ("profiling", "tools", "jobs"):
        return parts[0]
    return None


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in ("profiling", "tools"):
        parts = ["lmtrain", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            # `from lmtrain import profiling` reaches the layer of the imported name
            found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names if alias.name != "*"]
    return found


def python_files() -> list[Path]:
    files = []
    for folder in FOLDER_LAYER:
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO).parts
            if rel[0] == "lmtrain" and len(rel) > 1 and rel[1] in ("profiling", "tools"):
                continue  # the links; their files are checked under their own folders
            files.append(path)
    return files


def test_every_layer_imports_only_downward():
    problems = []
    for path in python_files():
        layer = FOLDER_LAYER[path.relative_to(REPO).parts[0]]
        for lineno, name in imports_of(path):
            target = layer_of_import(name)
            if target is not None and target not in ALLOWED[layer]:
                problems.append(f"{path.relative_to(REPO)}:{lineno}: {layer} imports {name} ({target})")
    assert not problems, "upward imports:\n" + "\n".join(problems)


def test_analysis_layers_are_imported_through_the_package():
    """`import tools.x` and `lmtrain.tools.x` would be two module objects for one file."""
    problems = []
    for path in python_files() + sorted((REPO / "tests").rglob("*.py")):
        for lineno, name in imports_of(path):
            if name.split(".")[0] in ("profiling", "tools"):
                problems.append(f"{path.relative_to(REPO)}:{lineno}: import lmtrain.{name} instead of {name}")
    assert not problems, "\n".join(problems)


def test_core_command_table_names_only_core_modules():
    from lmtrain.cli import SUBCOMMANDS

    for name, (target, _) in SUBCOMMANDS.items():
        assert layer_of_import(target.split(":")[0]) == "core", f"lmtrain {name} -> {target}"


@pytest.mark.parametrize(
    "source, bad",
    [
        ("from lmtrain.tools.common import run_tool\n", True),
        ("from lmtrain import profiling\n", True),
        ("import jobs.submit\n", True),
        ("from lmtrain.atomic import atomic_write_text\n", False),
        ("from . import nvtx\n", False),
    ],
)
def test_the_checker_catches_an_upward_import_in_the_core(tmp_path, monkeypatch, source, bad):
    path = REPO / "lmtrain" / "_layer_probe_test.py"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: source if self == path else _read(self))
    names = [name for _, name in imports_of(path)]
    upward = any(layer_of_import(n) not in (None, "core") for n in names)
    assert upward is bad, names


_read = Path.read_text
