#!/usr/bin/env python
"""The ablation study: a minGPT-style baseline and one modern change at a time, then a report.

    python -m jobs.ablation --steps 300 --seeds 2
    python -m jobs.ablation --study architecture --dataset my.jsonl --tokenizer gpt2 \
        --variants baseline,nope,post_norm --variant wide:model.d_ff=512

The study file (`jobs/experiments/ablation/study.yaml`, or another named by `--study`, such as
`architecture`: a Llama baseline and one switch of lmtrain.model each) names a training config and
the variants, each a set of dotted command-line overrides of that config. `--dataset` and
`--tokenizer` train every run on your own data instead of the study's corpus, and `--variant` adds a
variant from the command line (then the study's baseline and these variants run, unless
`--variants` picks others), so a study on your data needs no YAML. Every run is one `lmtrain train`
command, so it is reproducible from the command printed by `--dry-run` and from the config.yaml the
trainer saves beside its results. Runs land in `<out>/<variant>-seed<S>/`; a run whose
summary.json exists is finished and is not redone, an interrupted one resumes from its checkpoint.

Without `--cluster` the runs train here one after another and the report
(`tools/ablation_report.py`) is written to `<out>/report.md`. With `--cluster local|clariden` they
are submitted as one Slurm job array through the jobs launcher; `--wait` waits for it and writes the
report, otherwise run the same command again (or `--report-only`) once the array has finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

from lmtrain.atomic import atomic_write_text
from lmtrain.config import ConfigError, config_from_dict, config_to_dict, flatten_keys, load_yaml_with_bases
from lmtrain.errors import UserError

REPO = Path(__file__).resolve().parents[1]
STUDY_DIR = REPO / "jobs" / "experiments" / "ablation"
DEFAULT_STUDY = STUDY_DIR / "study.yaml"
# Study files under STUDY_DIR that `--study NAME` finds (the others there are training configs).
STUDY_NAMES = ("study", "architecture")

# Keys that legitimately differ between a run's saved config and its plan (paths, resumption, display).
_IGNORED_KEYS = {"training.output_dir", "training.run_dir", "checkpoint.resume", "logging.progress"}


@dataclasses.dataclass
class Study:
    name: str
    config: Path
    seeds: list[int]
    variants: dict[str, dict[str, Any]]
    """variant -> dotted overrides (combinations already expanded; percentages not yet resolved)."""
    prepare: list[str]
    experiment: Path | None = None
    """Launcher experiment (the config plus a `job:` section) for --cluster; None: local runs only."""


@dataclasses.dataclass
class PlannedRun:
    variant: str
    seed: int
    run_dir: Path
    config_path: Path
    flags: list[str]
    """`--section.field=value` flags after `--config`: the variant's switches, steps, seed, output."""
    config: dict
    """The resolved, validated config this run trains (nested dict as saved by the trainer)."""

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def done(self) -> bool:
        """Finished: summary.json written at the end of training (not after a stop for requeue)."""
        return run_finished(self.run_dir)

    def command(self, python: str = sys.executable) -> list[str]:
        return [python, "-m", "lmtrain.train", "--config", str(self.config_path), *self.flags]

    def launcher_overrides(self) -> list[str]:
        """The flags as the launcher's `key=value` overrides (it sets the output directory itself)."""
        return [f[2:] for f in self.flags if not f.startswith("--training.output_dir=")]


def run_finished(run_dir: Path) -> bool:
    """summary.json is there and does not record a stop for requeue (a later job resumes that run)."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return False
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    return isinstance(summary, dict) and summary.get("exit_reason") != "signal"


# --------------------------------------------------------------------------------------------------
# Study file
# --------------------------------------------------------------------------------------------------


def study_path(name_or_path: str | os.PathLike) -> Path:
    """A study file's path from `--study`: a path, or the name of one of STUDY_DIR's studies."""
    path = Path(name_or_path)
    if not path.is_file() and str(name_or_path) in STUDY_NAMES:
        return STUDY_DIR / f"{name_or_path}.yaml"
    return path


def load_study(path: str | os.PathLike) -> Study:
    """Read and check a study file; every mistake is a UserError naming the file and the key."""
    path = study_path(path)
    if not path.is_file():
        raise UserError(
            f"--study: study file not found: {path} (give a path or one of the studies "
            f"{', '.join(STUDY_NAMES)}; the default is {DEFAULT_STUDY})"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: YAML syntax error: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping with name, config, seeds and variants")
    valid = ("name", "config", "experiment", "seeds", "variants", "prepare")
    unknown = set(data) - set(valid)
    if unknown:
        raise UserError(f"{path}: unknown keys {sorted(unknown)}; valid: {', '.join(valid)}")
    name = data.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise UserError(f"{path}: `name` must be a word of letters, digits, '.', '_' or '-', got {name!r}")
    if not isinstance(data.get("config"), str):
        raise UserError(f"{path}: `config` must be the path of a training YAML, relative to the study file")
    config = (path.parent / data["config"]).resolve()
    if not config.is_file():
        raise UserError(f"{path}: `config` names {config}, which does not exist")
    experiment = None
    if data.get("experiment") is not None:
        if not isinstance(data["experiment"], str):
            raise UserError(f"{path}: `experiment` must be the path of a launcher experiment YAML")
        experiment = (path.parent / data["experiment"]).resolve()
        if not experiment.is_file():
            raise UserError(f"{path}: `experiment` names {experiment}, which does not exist")
    seeds = data.get("seeds")
    if not isinstance(seeds, list) or not seeds or not all(type(s) is int and s >= 0 for s in seeds):
        raise UserError(f"{path}: `seeds` must be a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"{path}: `seeds` has duplicates: {seeds}")
    prepare = data.get("prepare") or []
    if not isinstance(prepare, list) or not all(isinstance(a, str) for a in prepare):
        raise UserError(f"{path}: `prepare` must be a list of `lmtrain` arguments, got {prepare!r}")
    raw = data.get("variants")
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{path}: `variants` must be a mapping of variant name -> overrides")
    variants: dict[str, dict[str, Any]] = {}
    for variant, spec in raw.items():
        if not isinstance(variant, str) or not re.fullmatch(r"[A-Za-z0-9_]+", variant):
            raise UserError(f"{path}: variant name {variant!r} must be letters, digits and '_'")
        if spec is None:
            spec = {}
        if isinstance(spec, dict):
            for key in spec:
                if not isinstance(key, str) or key.count(".") != 1:
                    raise UserError(
                        f"{path}: variant '{variant}': override {key!r} must be a dotted key such as "
                        "model.mlp"
                    )
            variants[variant] = dict(spec)
        elif isinstance(spec, list):
            merged: dict[str, Any] = {}
            for part in spec:
                if part not in variants:
                    raise UserError(
                        f"{path}: variant '{variant}' combines '{part}', which is not a variant defined "
                        f"above it (defined: {', '.join(variants)})"
                    )
                clash = {k for k in variants[part] if k in merged and merged[k] != variants[part][k]}
                if clash:
                    raise UserError(f"{path}: variant '{variant}': its parts disagree on {sorted(clash)}")
                merged.update(variants[part])
            variants[variant] = merged
        else:
            raise UserError(
                f"{path}: variant '{variant}' must be a mapping of overrides or a list of variants, "
                f"got {spec!r}"
            )
    return Study(name, config, seeds, variants, prepare, experiment)


def resolve_value(key: str, value: Any, steps: int) -> Any:
    """`10%` -> 10% of the training steps (rounded, at least 1); anything else unchanged."""
    if isinstance(value, str) and value.endswith("%"):
        try:
            share = float(value[:-1]) / 100
        except ValueError:
            raise UserError(f"{key}: {value!r} is not a percentage such as 10%") from None
        if not 0 < share <= 1:
            raise UserError(f"{key}: {value!r} must be a percentage in (0%, 100%]")
        return max(1, round(share * steps))
    return value


def _display_path(path: Path) -> Path:
    """`path` relative to the working directory when it lies below it (shorter, portable commands)."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return path


def _flag_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _set_dotted(data: dict, key: str, value: Any) -> None:
    section, name = key.split(".", 1)
    if data.get(section) is None:
        data[section] = {}
    data[section][name] = value


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
    """`--variant [NAME:]section.field=value[,section.field=value...]` -> (name, overrides). Without a
    NAME the variant is named after its switches: `model.pos=none` -> `pos_none`."""
    name, body = spec.split(":", 1) if ":" in spec.split("=", 1)[0] else ("", spec)
    overrides: dict[str, str] = {}
    for part in body.split(","):
        match = re.fullmatch(r"([A-Za-z_]+\.[A-Za-z_]+)=(.+)", part.strip())
        if not match:
            raise UserError(
                f"--variant {spec!r}: {part!r} is not section.field=value; write e.g. "
                "--variant nope:model.pos=none or --variant model.norm_position=post,model.dropout=0.1"
            )
        overrides[match.group(1)] = match.group(2)
    if not name:
        name = "_".join(f"{k.split('.', 1)[1]}_{v}" for k, v in overrides.items())
        name = re.sub(r"[^A-Za-z0-9_]", "_", name)
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise UserError(f"--variant {spec!r}: the name {name!r} must be letters, digits and '_'")
    return name, overrides


def add_variants(study: Study, specs: list[str]) -> tuple[Study, list[str]]:
    """The study with the command line's `--variant`s added, and their names in order."""
    variants = dict(study.variants)
    names = []
    for spec in specs:
        name, overrides = parse_variant(spec)
        if name in variants and variants[name] != overrides:
            raise UserError(
                f"--variant {spec!r}: the study already defines a variant '{name}' ({variants[name]}); "
                "give this one another name (NAME:section.field=value)"
            )
        variants[name] = overrides
        names.append(name)
    return dataclasses.replace(study, variants=variants), names


def parse_overrides(tokens: list[str]) -> dict[str, str]:
    """Extra `--section.field=value` arguments (applied to every run), or a UserError."""
    out: dict[str, str] = {}
    for token in tokens:
        match = re.fullmatch(r"--([A-Za-z_]+\.[A-Za-z_]+)=(.*)", token)
        if not match:
            raise UserError(
                f"unexpected argument {token!r}: extra arguments must be training overrides written "
                "--section.field=value (e.g. --model.dim=128); see `python -m jobs.ablation --help`"
            )
        out[match.group(1)] = match.group(2)
    return out


# --------------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------------


def plan(
    study: Study,
    out_dir: Path,
    steps: int | None = None,
    n_seeds: int = 1,
    variants: list[str] | None = None,
    overrides: dict[str, str] | None = None,
) -> list[PlannedRun]:
    """The runs of the study, seed by seed, each a validated config and its command-line flags."""
    if n_seeds < 1 or n_seeds > len(study.seeds):
        raise UserError(
            f"--seeds must be between 1 and {len(study.seeds)} (the seeds listed in the study file), "
            f"got {n_seeds}"
        )
    chosen = list(study.variants) if not variants else variants
    unknown = [v for v in chosen if v not in study.variants]
    if unknown:
        raise UserError(f"--variants: unknown {unknown}; the study defines {', '.join(study.variants)}")
    base = load_yaml_with_bases(study.config)
    overrides = dict(overrides or {})
    if steps is None:
        steps = int(overrides.get("training.steps") or base.get("training", {}).get("steps") or 0)
        if steps < 1:
            raise UserError(f"{study.config}: set training.steps or pass --steps")
    if steps < 1:
        raise UserError(f"--steps must be >= 1, got {steps}")
    runs = []
    for seed in study.seeds[:n_seeds]:
        for variant in chosen:
            run_dir = out_dir / f"{variant}-seed{seed}"
            flags: dict[str, Any] = {}
            for key, value in study.variants[variant].items():
                flags[key] = resolve_value(f"{study.name}: variant '{variant}': {key}", value, steps)
            for key, value in overrides.items():
                if key in flags:
                    raise UserError(
                        f"override --{key} would change the switch that variant '{variant}' tests; "
                        "change it in the study file instead"
                    )
                flags[key] = value
            flags["training.steps"] = steps
            flags["training.seed"] = seed
            flags["training.name"] = f"{study.name}-{variant}"
            flags["training.output_dir"] = str(run_dir)
            data = json.loads(json.dumps(base))
            for key, value in flags.items():
                _set_dotted(data, key, value)
            source = f"{study.config} with variant '{variant}'"
            try:
                cfg = config_from_dict(data, source=source)
            except ConfigError as exc:
                raise UserError(f"{exc} (study file: variant '{variant}' or an extra override)") from None
            runs.append(
                PlannedRun(
                    variant=variant,
                    seed=seed,
                    run_dir=run_dir,
                    config_path=_display_path(study.config),
                    flags=[f"--{k}={_flag_value(v)}" for k, v in flags.items()],
                    config=config_to_dict(cfg),
                )
            )
    return runs


def config_mismatch(run: PlannedRun) -> list[str]:
    """Keys where the config saved in an existing run directory differs from the plan."""
    saved_path = run.run_dir / "config.yaml"
    if not saved_path.is_file():
        return []
    saved = config_to_dict(config_from_dict(yaml.safe_load(saved_path.read_text()) or {}, str(saved_path)))
    a, b = flatten_keys(saved), flatten_keys(run.config)
    for flat in (a, b):  # the launcher pins a relative dataset to its absolute path
        if Path(flat["data.dataset"]).exists():
            flat["data.dataset"] = str(Path(flat["data.dataset"]).resolve())
    return sorted(k for k in set(a) | set(b) if k not in _IGNORED_KEYS and a.get(k) != b.get(k))


def check_existing(runs: list[PlannedRun]) -> None:
    """Refuse to mix runs of another plan (other steps, data, model) into this study directory."""
    for run in runs:
        diff = config_mismatch(run)
        if diff:
            raise UserError(
                f"{run.run_dir} holds a run with another config ({', '.join(diff[:5])} differ): "
                "pass --out with a new study directory, or delete that run directory to redo it"
            )


def write_plan(runs: list[PlannedRun], out_dir: Path, study: Study) -> Path:
    """`<out>/plan.json`: every run's command, written atomically (the record of how to redo it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "study": study.name,
        "study_file_config": str(study.config),
        "runs": [
            {"name": r.name, "variant": r.variant, "seed": r.seed, "command": r.command("python")}
            for r in runs
        ],
    }
    return atomic_write_text(out_dir / "plan.json", json.dumps(payload, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


def prepare_data(study: Study, runs: list[PlannedRun], log=print) -> None:
    """Build the corpus with the study's `prepare` command when the runs' dataset is missing."""
    datasets = {r.config["data"]["dataset"] for r in runs}
    missing = [d for d in datasets if not Path(d).exists()]
    if not missing:
        return
    if not study.prepare:
        raise UserError(f"dataset {missing[0]} does not exist and the study file has no `prepare` command")
    log(f"building the corpus: lmtrain {' '.join(study.prepare)}")
    subprocess.run([sys.executable, "-m", "lmtrain", *study.prepare], check=True)


def run_local(runs: list[PlannedRun], logs_dir: Path, log=print, parallel: int = 1) -> None:
    """Train the unfinished runs here, `parallel` at a time (each with its share of the CPU cores); the
    first failed run stops the study after the runs in flight have ended."""
    logs_dir.mkdir(parents=True, exist_ok=True)
    todo = [r for r in runs if not r.done]
    for r in runs:
        if r.done:
            log(f"[skip] {r.name}: finished (summary.json present)")
    env = dict(os.environ)
    if parallel > 1:  # share the cores rather than oversubscribe them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
    queue = list(enumerate(todo, 1))
    running: list[tuple[int, PlannedRun, subprocess.Popen, Any, float]] = []
    failed: list[str] = []
    while queue or running:
        while queue and len(running) < parallel and not failed:
            i, r = queue.pop(0)
            log_path = logs_dir / f"{r.name}.log"
            log(f"[{i}/{len(todo)}] {r.name}: {' '.join(r.command('python'))}")
            fh = open(log_path, "w")
            proc = subprocess.Popen(r.command(), stdout=fh, stderr=subprocess.STDOUT, env=env)
            running.append((i, r, proc, fh, time.perf_counter()))
        if failed and not running:
            break
        time.sleep(0.2)
        for item in list(running):
            i, r, proc, fh, start = item
            if proc.poll() is None:
                continue
            running.remove(item)
            fh.close()
            if proc.returncode != 0 or not r.done:
                log_path = logs_dir / f"{r.name}.log"
                tail = "".join(log_path.read_text().splitlines(keepends=True)[-20:])
                failed.append(f"run {r.name} failed (exit {proc.returncode}); its log is {log_path}:\n{tail}")
            else:
                log(f"[{i}/{len(todo)}] {r.name}: done in {time.perf_counter() - start:.0f} s")
    if failed:
        raise RuntimeError("\n".join(failed))


def submit_array(
    runs: list[PlannedRun], study: Study, cluster: str, out_dir: Path, account: str | None = None, log=print
) -> list:
    """Submit the unfinished runs as one Slurm job array through the jobs launcher; returns the jobs.

    Each run directory is written by the launcher (config.yaml, task.json, job.sbatch, env.toml) exactly
    as for `python -m jobs.submit`; the array task of a run is the launcher's `TrainTask` of it."""
    import submitit

    from jobs import submit as launcher
    from jobs.edf import read_edf, render_edf, write_edf
    from jobs.task import TrainTask

    if study.experiment is None:
        raise UserError("--cluster needs `experiment:` in the study file (a launcher experiment YAML)")
    todo = [r for r in runs if not r.done]
    for r in runs:
        if r.done:
            log(f"[skip] {r.name}: finished (summary.json present)")
    if not todo:
        return []
    problem = launcher.slurm_problem()
    if problem:
        raise UserError(problem)
    prepared = [
        launcher.prepare(
            str(study.experiment),
            cluster,
            r.launcher_overrides(),
            account=account,
            run_dir=str(r.run_dir.resolve()),
        )
        for r in todo
    ]
    for p in prepared:
        for warning in p.warnings:
            log(f"warning: {p.plan.run_dir}: {warning}")
    first = prepared[0]
    if first.cluster.account_required and not first.plan.account:
        from jobs.spec import account_error

        raise account_error(first.cluster)
    for p in prepared:
        launcher.write_run(p)
    # One array shares one set of job parameters: the runs differ only in their task command and run
    # directory. A container environment file that mounts the whole study directory serves them all.
    params = first.plan.submitit_parameters()
    params["job_name"] = f"{first.plan.job_name}-{study.name}"
    if first.edf_source:
        study_edf = out_dir.resolve() / "env.toml"
        env = dict(first.plan.env)
        write_edf(
            render_edf(
                read_edf(first.edf_source),
                str(out_dir.resolve()),
                first.plan.workdir,
                env,
                first.cluster.variables(),
            ),
            study_edf,
        )
        params["srun_args"] = [
            f"--environment={study_edf}" if a.startswith("--environment=") else a for a in params["srun_args"]
        ]
    executor = submitit.SlurmExecutor(
        folder=str(out_dir.resolve() / "submitit" / "%j"),
        max_num_timeout=first.plan.max_num_timeout,
        python=first.plan.python,
    )
    executor.update_parameters(**params, array_parallelism=len(prepared))
    with executor.batch():
        jobs = [executor.submit(TrainTask(p.plan.run_dir, list(p.plan.command))) for p in prepared]
    record = [{"run": p.plan.run_dir, "job_id": str(j.job_id)} for p, j in zip(prepared, jobs)]
    atomic_write_text(
        out_dir / "jobs.json", json.dumps({"cluster": cluster, "jobs": record}, indent=2) + "\n"
    )
    array_id = str(jobs[0].job_id).split("_")[0]
    log(f"submitted job array {array_id} ({len(jobs)} runs) on {cluster}; task logs in {out_dir}/submitit/")
    return jobs


def wait_for(jobs: list, log=print) -> None:
    """Wait for every array task; a failed one is reported, and the study report covers the others."""
    failed = []
    for job in jobs:
        try:
            job.result()
        except Exception as exc:  # submitit raises the task's error or UncompletedJobError
            lines = str(exc).strip().splitlines()
            failed.append(f"job {job.job_id}: {lines[-1] if lines else type(exc).__name__}")
    for line in failed:
        log(f"failed: {line}")
    if failed and len(failed) == len(jobs):
        raise RuntimeError(f"every run of the job array failed; first: {failed[0]}")


def write_report(
    out_dir: Path, runs: list[PlannedRun], log=print, generations: bool = True, max_new_tokens: int = 40
) -> Path:
    from lmtrain.tools import ablation_report

    finished = [r.run_dir for r in runs if r.done]
    if not finished:
        raise UserError(f"no finished run in {out_dir} to report on")
    args = [str(p) for p in finished] + ["--out", str(out_dir), "--max-new-tokens", str(max_new_tokens)]
    if not generations:
        args.append("--no-generations")
    ablation_report.main(args)
    log(f"report: {out_dir / 'report.md'}")
    return out_dir / "report.md"


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.ablation",
        description=__doc__.split("\n\n")[0],
        epilog="Extra --section.field=value arguments override the training config of every run.",
    )
    p.add_argument(
        "--study",
        default=str(DEFAULT_STUDY),
        help=f"study file, or one of {', '.join(STUDY_NAMES)} (default: %(default)s)",
    )
    p.add_argument("--steps", type=int, help="training steps of every run (default: the config's)")
    p.add_argument("--seeds", type=int, default=1, help="repeat the study with this many seeds")
    p.add_argument("--variants", help="comma-separated subset of the variants (default: all)")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="[NAME:]KEY=VALUE[,KEY=VALUE]",
        help="add a variant, e.g. nope:model.pos=none (repeatable); then the study's baseline and these "
        "variants run unless --variants names others",
    )
    p.add_argument(
        "--dataset",
        help="train every run on this data (prepared directory, .parquet, .jsonl or token file) instead "
        "of the study's corpus",
    )
    p.add_argument(
        "--tokenizer",
        help="tokenizer of every run: byte, a Hugging Face hub name, a directory or tokenizer.json",
    )
    p.add_argument("--out", help="study directory (default: runs/ablation/<study name>-<steps>steps)")
    p.add_argument("--parallel", type=int, default=1, help="local runs trained at the same time")
    p.add_argument("--cluster", help="submit as one Slurm job array on this cluster (local, clariden)")
    p.add_argument("--wait", action="store_true", help="with --cluster: wait for the array, then report")
    p.add_argument("--account", help="with --cluster: Slurm account (else the cluster profile's)")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    p.add_argument("--report-only", action="store_true", help="only (re)write the report of finished runs")
    p.add_argument("--no-generations", action="store_true", help="report without sample generations")
    p.add_argument("--max-new-tokens", type=int, default=40, help="tokens per generation in the report")
    return p


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    if args.parallel < 1:
        raise UserError(f"--parallel must be >= 1, got {args.parallel}")
    study = load_study(args.study)
    study, added = add_variants(study, args.variant)
    overrides = parse_overrides(extra)
    if args.dataset is not None:
        if not Path(args.dataset).exists():
            raise UserError(f"--dataset {args.dataset}: no such file or directory")
        overrides["data.dataset"] = args.dataset
        study = dataclasses.replace(study, prepare=[])  # the study's corpus is not needed
    if args.tokenizer is not None:
        overrides["data.tokenizer"] = args.tokenizer
    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    if added and variants is None:
        variants = [next(iter(study.variants)), *added]  # the baseline, then the new variants
    probe = plan(study, Path("."), args.steps, 1, variants[:1] if variants else None, overrides)
    steps = probe[0].config["training"]["steps"]
    out_dir = Path(args.out) if args.out else Path("runs") / "ablation" / f"{study.name}-{steps}steps"
    runs = plan(study, out_dir, steps, args.seeds, variants, overrides)
    if args.dry_run:
        for r in runs:
            state = "finished" if r.done else "to run"
            print(f"# {r.name} ({state})\n{' '.join(r.command('python'))}")
        return 0
    if args.report_only:
        write_report(out_dir, runs, generations=not args.no_generations, max_new_tokens=args.max_new_tokens)
        return 0
    check_existing(runs)
    write_plan(runs, out_dir, study)
    if args.cluster:
        jobs = submit_array(runs, study, args.cluster, out_dir, args.account)
        if jobs and not args.wait:
            again = " ".join(argv if argv is not None else sys.argv[1:])
            print(
                f"once the array has finished, write the report: python -m jobs.ablation {again} --report-only"
            )
            return 0
        wait_for(jobs)
    else:
        prepare_data(study, runs)
        run_local(runs, out_dir / "logs", parallel=args.parallel)
    write_report(out_dir, runs, generations=not args.no_generations, max_new_tokens=args.max_new_tokens)
    return 0


if __name__ == "__main__":
    from lmtrain.cli import run_user_facing

    raise SystemExit(run_user_facing(main, sys.argv[1:]))
