"""Container environment files (CSCS container engine "EDF", TOML): check them, render one per run.

    python -m jobs.edf check toml_envs/ngc_pt_jan.toml

Fields: `image` (registry reference `[USER@][REGISTRY#]IMAGE[:TAG]` or a `.sqsh` path), `mounts` (list of
`SRC:DST[:FLAGS]`, or a bare path mounted at the same place), `workdir`, `writable`, `entrypoint`,
`base_environment` (a name or path, or a list; names are searched beside the file and in ~/.edf), `[env]`
(string values), `[annotations]` (string values, e.g. the aws_ofi_nccl hook).

Annotation keys are dotted names. CSCS's documentation writes them unquoted, `com.hooks.ssh.enabled =
"true"` under `[annotations]`, or as a table `[annotations.com.hooks.ssh]`; TOML reads both as nested
tables, which `read_edf` turns back into the dotted names (`"com.hooks.ssh.enabled"`).

`${VAR}` in fields expands from the environment (as the container engine does), plus the variables a
cluster profile defines (`COURSE_STORE`). The image file and the mount sources are checked where this
host can see their file system; paths on a file system it cannot see (/capstor on a laptop) only warn.

A run's EDF is the cluster's EDF with the profile's variables expanded, plus a mount of the run
directory and the checkout, the checkout as workdir and the job's environment variables.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w
import tomllib

from lmtrain.atomic import atomic_write_text
from lmtrain.errors import UserError

FIELDS: dict[str, str] = {
    "base_environment": "string or list of strings (EDF names or paths)",
    "image": "string: [USER@][REGISTRY#]IMAGE[:TAG] or a .sqsh path",
    "workdir": "string: an absolute path inside the container",
    "entrypoint": "bool",
    "writable": "bool",
    "mounts": "list of 'SRC:DST[:FLAGS]' strings",
    "env": "table of string values",
    "annotations": "table of string values",
}
MOUNT_FLAGS = {"ro", "rw", "private", "rprivate", "slave", "rslave", "shared", "rshared", "recursive"}
_IMAGE_RE = re.compile(r"^(?:[\w.\-]+@)?(?:[\w.\-:]+#)?[\w.\-/]+(?::[\w.\-]+)?(?:@sha256:[0-9a-f]+)?$")


class EdfError(UserError):
    """An invalid container environment file; the message names the file and field."""


def _fail(path: Path | str, key: str, msg: str) -> EdfError:
    return EdfError(f"{path}: field '{key}': {msg} (expected {FIELDS.get(key, 'a documented field')})")


def dotted_names(table: Mapping[str, Any], path: Path | str, key: str, prefix: str = "") -> dict[str, Any]:
    """Nested TOML tables -> {"a.b.c": value}: `a.b.c = "x"` and `[annotations.a.b] c = "x"` both nest."""
    out: dict[str, Any] = {}
    for k, v in table.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            inner = dotted_names(v, path, key, f"{name}.")
        else:
            inner = {name: v}
        for n in inner:
            if n in out:
                raise _fail(path, key, f"{n!r} is set twice (once quoted, once as nested keys)")
        out.update(inner)
    return out


def read_edf(path: str | os.PathLike) -> dict[str, Any]:
    """The EDF as a dict, with annotation keys as their dotted names."""
    path = Path(path)
    if not path.is_file():
        raise EdfError(f"container environment file not found: {path} (check the path, or job.environment)")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise EdfError(f"{path}: not valid TOML: {exc}") from None
    if isinstance(data.get("annotations"), dict):
        data["annotations"] = dotted_names(data["annotations"], path, "annotations")
    return data


_VAR_RE = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def expand(text: str, variables: Mapping[str, str]) -> str:
    """`${VAR}` / `$VAR` from `variables`; unknown ones stay as they are."""
    return _VAR_RE.sub(lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), text)


def _file_system_visible(p: str) -> bool:
    """Whether this host sees the file system of absolute path `p` (its top-level directory exists)."""
    parts = Path(p).parts
    return len(parts) >= 2 and Path(parts[0], parts[1]).is_dir()


def missing_files(
    data: Mapping[str, Any], path: Path | str, variables: Mapping[str, str]
) -> tuple[list[str], set[str]]:
    """(problems, unseen): the image file and mount sources that do not exist on a file system this host
    sees, and the top-level directories of those it cannot check from here."""
    problems: list[str] = []
    unseen: set[str] = set()
    wanted: list[tuple[str, str]] = []
    image = data.get("image")
    if isinstance(image, str) and image.endswith(".sqsh"):
        wanted.append(("image", image))
    for m in data.get("mounts", []) if isinstance(data.get("mounts"), list) else []:
        if isinstance(m, str):
            wanted.append(("mounts", parse_mount(m)[0]))
    for key, raw in wanted:
        p = expand(raw, variables)
        if "$" in p or not p.startswith("/"):
            continue  # a variable only the job's environment has
        if not _file_system_visible(p):
            unseen.add("/" + Path(p).parts[1])
        elif not Path(p).exists():
            what = "image file" if key == "image" else "mount source"
            problems.append(
                f"{path}: field '{key}': {what} {p} does not exist" + (f" ({raw})" if raw != p else "")
            )
    return problems, unseen


def parse_mount(spec: str) -> tuple[str, str, list[str]]:
    """`SRC:DST[:FLAGS]` -> (src, dst, flags). A bare path means the same path inside."""
    parts = spec.split(":")
    if len(parts) == 1:
        return parts[0], parts[0], []
    flags = parts[2].split(",") if len(parts) > 2 and parts[2] else []
    return parts[0], parts[1], flags


def _is_abs(p: str) -> bool:
    return p.startswith("/") or p.startswith("${") or p.startswith("$")


def edf_search_path(env: Mapping[str, str] | None = None) -> list[Path]:
    env = os.environ if env is None else env
    home = Path(env.get("HOME", str(Path.home())))
    return [home / ".edf"]


def resolve_base(name: str, edf_dir: Path, search: list[Path]) -> Path | None:
    candidates: list[Path] = []
    p = Path(os.path.expanduser(name))
    if p.is_absolute():
        candidates.append(p)
    else:
        for root in [edf_dir, *search]:
            candidates += [root / name, root / f"{name}.toml"]
    return next((c for c in candidates if c.is_file()), None)


def check_edf(
    path: str | os.PathLike,
    search: list[Path] | None = None,
    variables: Mapping[str, str] | None = None,
    _seen: tuple[Path, ...] = (),
) -> list[str]:
    """Validate an EDF (and the base environments it names). Returns warnings; raises EdfError.

    `variables` expand `${VAR}` in the image and mount paths before their files are looked for
    (default: the environment)."""
    path = Path(path).resolve()
    variables = os.environ if variables is None else variables
    if path in _seen:
        raise EdfError(f"{path}: field 'base_environment': inheritance cycle through {path.name}")
    data = read_edf(path)
    search = edf_search_path() if search is None else search
    warnings: list[str] = []
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise EdfError(f"{path}: unknown field(s) {', '.join(unknown)}; valid fields: {', '.join(FIELDS)}")
    if "image" in data:
        image = data["image"]
        if not isinstance(image, str):
            raise _fail(path, "image", f"got {type(image).__name__} {image!r}")
        if image.endswith(".sqsh"):
            if not _is_abs(image):
                raise _fail(path, "image", f"a squashfs image must be an absolute path, got {image!r}")
        elif image and not _IMAGE_RE.match(image):
            raise _fail(path, "image", f"{image!r} is neither a registry reference nor a .sqsh path")
    elif "base_environment" not in data and not _seen:
        warnings.append(f"{path}: no 'image' and no 'base_environment': jobs run without a container")
    for key in ("entrypoint", "writable"):
        if key in data and not isinstance(data[key], bool):
            raise _fail(path, key, f"got {data[key]!r} (write true or false, without quotes)")
    if "workdir" in data:
        wd = data["workdir"]
        if not isinstance(wd, str) or not _is_abs(wd):
            raise _fail(path, "workdir", f"got {wd!r}")
    if "mounts" in data:
        mounts = data["mounts"]
        if not isinstance(mounts, list):
            raise _fail(path, "mounts", f"got {type(mounts).__name__} {mounts!r}")
        for i, m in enumerate(mounts):
            if not isinstance(m, str) or not m:
                raise _fail(path, "mounts", f"entry {i} is {m!r}")
            src, dst, flags = parse_mount(m)
            if len(m.split(":")) > 3:
                raise _fail(path, "mounts", f"entry {m!r} has more than SRC:DST:FLAGS")
            if not _is_abs(src) or not _is_abs(dst):
                raise _fail(path, "mounts", f"entry {m!r}: SRC and DST must be absolute paths")
            bad = [f for f in flags if f not in MOUNT_FLAGS]
            if bad:
                raise _fail(
                    path, "mounts", f"entry {m!r}: unknown flag(s) {bad}; valid: {sorted(MOUNT_FLAGS)}"
                )
    for key in ("env", "annotations"):
        if key in data:
            table = data[key]
            if not isinstance(table, dict):
                raise _fail(path, key, f"got {type(table).__name__} {table!r} (write a [{key}] table)")
            for k, v in table.items():
                if key == "env" and isinstance(v, dict):
                    raise _fail(path, key, f"{k!r} is a table: environment variable names have no dots")
                if not isinstance(v, str):
                    raise _fail(path, key, f'{k} = {v!r} is not a string (quote it: {k} = "{v}")')
    if "base_environment" in data:
        base = data["base_environment"]
        names = [base] if isinstance(base, str) else base
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise _fail(path, "base_environment", f"got {base!r}")
        for name in names:
            found = resolve_base(name, path.parent, search)
            if found is None:
                where = ", ".join(str(s) for s in [path.parent, *search])
                raise _fail(path, "base_environment", f"'{name}' not found (searched {where})")
            warnings += check_edf(found, search, variables, (*_seen, path))
    problems, unseen = missing_files(data, path, variables)
    if problems:
        raise EdfError("; ".join(problems))
    if unseen:
        warnings.append(
            f"{path}: {', '.join(sorted(unseen))} is not mounted on this host: the image and mount sources "
            "there are not checked (they are on the cluster)"
        )
    return warnings


def environment_path_warnings(path: str) -> list[str]:
    """Problems of the path given to `--environment` itself."""
    out = []
    if "%u" in path or "$USER" in path or "${USER}" in path:
        out.append(
            f"--environment path {path!r} contains %u or $USER: Slurm does not expand it there; "
            "write the absolute path"
        )
    return out


def _covered(p: str, mounts: list[str]) -> bool:
    for m in mounts:
        _, dst, _ = parse_mount(m)
        dst = dst.rstrip("/") or "/"
        if p == dst or p.startswith(dst + "/") or dst == "/":
            return True
    return False


def path_is_mounted(p: str, edf: Mapping[str, Any]) -> bool:
    return _covered(p, list(edf.get("mounts", [])))


def render_edf(
    base: Mapping[str, Any],
    run_dir: str,
    workdir: str,
    env: Mapping[str, str],
    variables: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The per-run EDF: `base` with `variables` expanded in its image and mounts, plus mounts of the run
    directory and checkout, workdir and env."""
    variables = variables or {}
    out = {
        k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v)
        for k, v in base.items()
    }
    if isinstance(out.get("image"), str):
        out["image"] = expand(out["image"], variables)
    mounts = [expand(m, variables) for m in out.get("mounts", [])]
    for p in (run_dir, workdir):
        if not _covered(p, mounts):
            mounts.append(f"{p}:{p}")
    out["mounts"] = mounts
    out["workdir"] = workdir
    merged = dict(out.get("env", {}))
    merged.update(env)
    merged["PYTHONPATH"] = workdir
    out["env"] = merged
    return out


def write_edf(data: Mapping[str, Any], path: str | os.PathLike) -> None:
    atomic_write_text(path, tomli_w.dumps(dict(data)))


def main(argv: list[str] | None = None) -> int:
    import argparse

    from jobs.spec import load_cluster

    parser = argparse.ArgumentParser(
        prog="python -m jobs.edf", description="Check a container environment file."
    )
    parser.add_argument("action", choices=["check"])
    parser.add_argument("file", help="the EDF (.toml)")
    parser.add_argument(
        "--cluster",
        default="clariden",
        help="profile whose variables (COURSE_STORE) expand in paths (default: clariden)",
    )
    args = parser.parse_args(argv)
    try:
        variables = {**os.environ, **load_cluster(args.cluster).variables()}
        warnings = check_edf(args.file, variables=variables) + environment_path_warnings(args.file)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"{args.file}: valid container environment file")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
