"""Analysis tools over run directories and traces: `lmtrain gemm-report`, `compare-runs`, `plot-loss`, ...

    lmtrain gemm-report trace.sqlite --gpu gh200 --markdown report.md

Each tool is one module with `main(argv)`, registered as an `lmtrain` subcommand in the
`lmtrain.commands` entry-point group of pyproject.toml, and also runnable as
`python -m lmtrain.tools.NAME`. Tools may import the core (`lmtrain`) and `lmtrain.profiling`, never
`jobs`. Installed as `lmtrain.tools`; in a checkout this folder is linked as `lmtrain/tools`. A new
tool: a module here, a line in that entry-point group, a test in tests/.
"""
