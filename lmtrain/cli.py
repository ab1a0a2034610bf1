"""The `lmtrain` command: one entry point, one subcommand per task.

lmtrain --help
lmtrain train --config jobs/experiments/smoke.yaml
"""

from __future__ import annotations

import importlib
import sys

from lmtrain.errors import UserError

# subcommand -> ("module:function", one-line description). Modules are imported only when their
# subcommand runs, so `lmtrain --help` stays instant and a broken optional dependency of one
# subcommand does not break the others. Each function takes argv (list[str]) and returns an exit code.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("lmtrain.train:main", "train a model (the course's train.py flags, YAML configs)"),
    "prepare": ("lmtrain.data.prepare:main", "build a corpus (parquet + tokenizer) from local files"),
    "data": ("lmtrain.data.cli:main", "inspect datasets: `data stats`, `data show`"),
    "params": ("lmtrain.accounting:main", "parameter count, FLOPs per token and memory of a model"),
    "predict": ("lmtrain.roofline:main", "roofline bound of a training step per op class on a GPU"),
    "generate": ("lmtrain.generate:main", "generate text from a run's latest checkpoint"),
    "export-hf": ("lmtrain.export_hf:main", "export a run as a transformers LlamaForCausalLM checkpoint"),
    "tokenizer": ("lmtrain.tokenizer.cli:main", "byte-level BPE: `tokenizer train|encode|decode`"),
    "bench": ("lmtrain.bench:main", "benchmarks (listed by `lmtrain bench --help`)"),
}

# Parsers that print `lmtrain <command> --help` without importing the command's module (which imports
# torch): "module:function", the function taking `prog` and returning an argparse parser.
HELP_PARSERS: dict[str, str] = {
    "train": "lmtrain.config:build_parser",
    "generate": "lmtrain.arguments:generate_parser",
    "export-hf": "lmtrain.arguments:export_hf_parser",
    "params": "lmtrain.arguments:params_parser",
}

# Layers above the core (the analysis tools) add subcommands through this entry-point group in their
# distribution's metadata, so the core names none of them: `gemm-report = "lmtrain.tools...:main"`.
PLUGIN_GROUP = "lmtrain.commands"


def _plugins() -> dict[str, tuple[str, str]]:
    from importlib.metadata import entry_points

    found = {}
    for ep in entry_points(group=PLUGIN_GROUP):
        if ep.name not in SUBCOMMANDS:
            found[ep.name] = (ep.value, f"(analysis tool: {ep.value.split(':')[0]})")
    return dict(sorted(found.items()))


def _commands() -> dict[str, tuple[str, str]]:
    return {**SUBCOMMANDS, **_plugins()}


def _usage() -> str:
    commands = _commands()
    width = max(len(name) for name in commands)
    lines = ["usage: lmtrain <command> [options]", "", "commands:"]
    from lmtrain.bench import available

    benchmarks = "|".join(available()) or "none: bench/ is not beside the package"
    texts = {name: text for name, (_, text) in commands.items()}
    texts["bench"] = f"benchmarks: `bench {benchmarks}`"
    lines += [f"  {name:<{width}}  {text}" for name, text in texts.items()]
    lines += ["", "Run `lmtrain <command> --help` for the options of one command."]
    return "\n".join(lines)


def run_user_facing(func, argv: list[str]) -> int:
    """Call a subcommand; a UserError becomes a one-paragraph message and exit code 2."""
    try:
        return int(func(argv) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from lmtrain import __version__

        print(f"lmtrain {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    commands = SUBCOMMANDS if name in SUBCOMMANDS else _commands()
    if name not in commands:
        import difflib

        close = difflib.get_close_matches(name, list(commands), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        print(f"error: unknown command '{name}'.{hint} Valid: {', '.join(commands)}", file=sys.stderr)
        return 2
    if name in HELP_PARSERS and any(arg in ("-h", "--help") for arg in rest):
        module_name, func_name = HELP_PARSERS[name].split(":")
        getattr(importlib.import_module(module_name), func_name)(f"lmtrain {name}").print_help()
        return 0
    module_name, func_name = commands[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return run_user_facing(func, rest)


if __name__ == "__main__":
    raise SystemExit(main())
