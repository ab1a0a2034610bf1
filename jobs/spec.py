"""Cluster profiles, experiments and the job plan resolved from them (pure data, no Slurm calls).

    python -c "from jobs.spec import list_experiments, list_clusters; print(list_experiments(), list_clusters())"

A cluster profile (`jobs/clusters/NAME.yaml`) describes the machine: node size, partitions, defaults for
one job, the container environment file, whether numactl and nsys are there. An experiment
(`jobs/experiments/NAME.yaml`) is a training config (with `base:` inheritance) plus a `job:` section.
`make_plan` combines the two with `key=value` overrides into a `JobPlan`, from which the sbatch script,
the submitit parameters and the task command are derived.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmtrain.config import (
    ConfigError,
    TrainConfig,
    all_keys,
    config_from_dict,
    config_to_dict,
    deep_merge,
    flatten_keys,
    load_yaml_with_bases,
    read_yaml,
    suggest,
)
from lmtrain.errors import UserError

JOBS_DIR = Path(__file__).resolve().parent
REPO_DIR = JOBS_DIR.parent
EXPERIMENTS_DIR = JOBS_DIR / "experiments"
CLUSTERS_DIR = JOBS_DIR / "clusters"

# Exit code of `lmtrain.train` after it saved a checkpoint because a signal asked it to stop.
EXIT_REQUEUE = 85


def list_experiments() -> list[str]:
    return sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))


def list_clusters() -> list[str]:
    return sorted(p.stem for p in CLUSTERS_DIR.glob("*.yaml"))


def _named_file(kind: str, name: str, folder: Path, valid: list[str]) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path.resolve()
    candidate = folder / f"{name}.yaml"
    if not candidate.is_file():
        raise UserError(
            f"unknown {kind} '{name}': valid {kind}s are {', '.join(valid)} "
            f"(files in {folder}; a path to a .yaml file also works)"
        )
    return candidate


# --------------------------------------------------------------------------------------------------
# Time limits
# --------------------------------------------------------------------------------------------------


def parse_time(value: Any, key: str = "job.time") -> int:
    """A Slurm time limit -> whole minutes (seconds round up)."""
    return -(-parse_seconds(value, key) // 60)


def parse_seconds(value: Any, key: str = "job.time") -> int:
    """A Slurm time limit (`MM`, `MM:SS`, `HH:MM:SS`, `D-HH`, `D-HH:MM`, `D-HH:MM:SS`) -> seconds."""
    text = str(value).strip()
    bad = UserError(
        f"{key} = {value!r} is not a Slurm time limit: write HH:MM:SS (e.g. 00:14:59), MM or D-HH:MM:SS"
    )
    if isinstance(value, bool) or not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}", text):
        raise bad
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    d = int(days) if days else 0
    if days:  # D-HH, D-HH:MM, D-HH:MM:SS
        h, mi, s = (parts + [0, 0])[:3]
    elif len(parts) == 1:  # MM
        h, mi, s = 0, parts[0], 0
    elif len(parts) == 2:  # MM:SS
        h, (mi, s) = 0, parts
    else:  # HH:MM:SS
        h, mi, s = parts
    if s >= 60 or (len(parts) > 1 and mi >= 60 and (days or len(parts) == 3)) or (days and h >= 24):
        raise bad
    seconds = ((d * 24 + h) * 60 + mi) * 60 + s
    if seconds <= 0:
        raise UserError(f"{key} = {value!r} must be longer than zero")
    return seconds


def format_seconds(seconds: int) -> str:
    """Seconds -> the Slurm time limit `HH:MM:SS` (`D-HH:MM:SS` from a day on): 899 -> 00:14:59."""
    m, sec = divmod(seconds, 60)
    h, m = divmod(m, 60)
    if h >= 24:
        d, h = divmod(h, 24)
        return f"{d}-{h:02d}:{m:02d}:{sec:02d}"
    return f"{h:02d}:{m:02d}:{sec:02d}"


def format_minutes(minutes: int) -> str:
    return format_seconds(minutes * 60)


# --------------------------------------------------------------------------------------------------
# Cluster profiles
# --------------------------------------------------------------------------------------------------

_CLUSTER_KEYS = {
    "name": "profile name",
    "description": "one line shown in dry runs",
    "account": "Slurm account (null: must come from account_env, --account or job.account)",
    "account_env": "environment variable that may hold the account",
    "account_required": "true (default) if jobs need an account",
    "default_partition": "partition used when the experiment does not name one",
    "partitions": "mapping name -> {max_time: HH:MM:SS, max_nodes: N}",
    "node": "{gpus, cpus, mem_mb, gpu_mem_mb} of one node (gpu_mem_mb: memory of one GPU, optional)",
    "defaults": "{gpus_per_node, tasks_per_node, cpus_per_task, mem_mb} of one job",
    "cpu_bind": "srun --cpu-bind value, or null",
    "numactl": "{args, per_rank, when: always | if-installed | never}, or null; per_rank (optional) replaces "
    "args when a node runs more than one task, {local_rank} standing for the task's local rank",
    "nsys": "available | if-installed | unavailable",
    "python": "Python command inside the job (null: the Python running jobs.submit)",
    "output_root": "where run directories go ($VARS expand at submission)",
    "environment": "container environment file (EDF) passed to srun --environment, or null",
    "env": "environment variables exported for the job",
    "course_store": "directory of the course's shared files (datasets, images): ${COURSE_STORE} in EDFs and data paths",
}


@dataclass(frozen=True)
class Partition:
    name: str
    max_minutes: int | None = None
    max_nodes: int | None = None


@dataclass(frozen=True)
class ClusterProfile:
    name: str
    description: str
    account: str | None
    account_env: str | None
    account_required: bool
    default_partition: str
    partitions: dict[str, Partition]
    node_gpus: int
    node_cpus: int
    node_mem_mb: int
    default_gpus_per_node: int
    default_tasks_per_node: int
    default_cpus_per_task: int
    default_mem_mb: int
    cpu_bind: str | None
    numactl_args: str | None
    numactl_when: str
    numactl_per_rank: str | None
    nsys: str
    python: str | None
    output_root: str
    environment: str | None
    env: dict[str, str]
    source: str
    course_store: str | None = None
    gpu_mem_mb: int | None = None

    def variables(self) -> dict[str, str]:
        """`${NAME}` values this profile defines for EDF paths and data paths."""
        return {"COURSE_STORE": self.course_store} if self.course_store else {}


def _expect(cond: bool, source: str, key: str, what: str, value: Any) -> None:
    if not cond:
        raise UserError(f"{source}: {key} must be {what}, got {value!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def cluster_from_dict(data: Mapping[str, Any], source: str) -> ClusterProfile:
    unknown = sorted(set(data) - set(_CLUSTER_KEYS))
    if unknown:
        raise UserError(
            f"{source}: unknown cluster key(s) {', '.join(unknown)}; valid keys: {', '.join(_CLUSTER_KEYS)}"
        )
    for key in ("name", "default_partition", "partitions", "node", "defaults", "output_root"):
        if key not in data:
            raise UserError(f"{source}: missing cluster key '{key}' ({_CLUSTER_KEYS[key]})")
    parts_raw = data["partitions"]
    _expect(isinstance(parts_raw, dict) and parts_raw, source, "partitions", "a non-empty mapping", parts_raw)
    partitions = {}
    for pname, spec in parts_raw.items():
        spec = spec or {}
        _expect(isinstance(spec, dict), source, f"partitions.{pname}", "a mapping", spec)
        bad = sorted(set(spec) - {"max_time", "max_nodes"})
        if bad:
            raise UserError(f"{source}: partitions.{pname}: unknown key(s) {bad}; valid: max_time, max_nodes")
        max_min = parse_time(spec["max_time"], f"partitions.{pname}.max_time") if "max_time" in spec else None
        max_nodes = spec.get("max_nodes")
        _expect(max_nodes is None or (_is_int(max_nodes) and max_nodes > 0), source,
                f"partitions.{pname}.max_nodes", "a positive integer", max_nodes)  # fmt: skip
        partitions[str(pname)] = Partition(str(pname), max_min, max_nodes)
    default_partition = data["default_partition"]
    _expect(default_partition in partitions, source, "default_partition", f"one of {list(partitions)}",
            default_partition)  # fmt: skip

    def section(key: str, names: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, int]:
        sec = data[key]
        _expect(isinstance(sec, dict), source, key, "a mapping", sec)
        extra = sorted(set(sec) - set(names) - set(optional))
        if extra:
            raise UserError(f"{source}: {key}: unknown key(s) {extra}; valid: {', '.join(names + optional)}")
        out = {}
        for n in names + tuple(o for o in optional if o in sec):
            v = sec.get(n)
            _expect(_is_int(v) and v >= 0, source, f"{key}.{n}", "an integer >= 0", v)
            out[n] = v
        return out

    node = section("node", ("gpus", "cpus", "mem_mb"), optional=("gpu_mem_mb",))
    defaults = section("defaults", ("gpus_per_node", "tasks_per_node", "cpus_per_task", "mem_mb"))
    numactl = data.get("numactl")
    numactl_args, numactl_when, numactl_per_rank = None, "never", None
    if numactl is not None:
        _expect(isinstance(numactl, dict) and set(numactl) <= {"args", "per_rank", "when"}, source, "numactl",
                "a mapping {args, per_rank, when}", numactl)  # fmt: skip
        numactl_args = str(numactl.get("args", ""))
        numactl_per_rank = numactl.get("per_rank")
        _expect(numactl_per_rank is None or "{local_rank}" in str(numactl_per_rank), source,
                "numactl.per_rank", "a string naming {local_rank}", numactl_per_rank)  # fmt: skip
        numactl_when = numactl.get("when", "always")
        _expect(numactl_when in ("always", "if-installed", "never"), source, "numactl.when",
                "always, if-installed or never", numactl_when)  # fmt: skip
    nsys = data.get("nsys", "unavailable")
    _expect(nsys in ("available", "if-installed", "unavailable"), source, "nsys",
            "available, if-installed or unavailable", nsys)  # fmt: skip
    env = data.get("env") or {}
    _expect(isinstance(env, dict) and all(isinstance(v, str) for v in env.values()), source, "env",
            "a mapping of strings", env)  # fmt: skip
    for key in ("account", "account_env", "python", "environment", "cpu_bind", "course_store"):
        v = data.get(key)
        _expect(v is None or (isinstance(v, str) and v), source, key, "a non-empty string or null", v)
    account_required = data.get("account_required", True)
    _expect(isinstance(account_required, bool), source, "account_required", "true or false", account_required)
    return ClusterProfile(
        name=str(data["name"]),
        description=str(data.get("description", "")),
        account=data.get("account"),
        account_env=data.get("account_env"),
        account_required=account_required,
        default_partition=default_partition,
        partitions=partitions,
        node_gpus=node["gpus"],
        node_cpus=node["cpus"],
        node_mem_mb=node["mem_mb"],
        default_gpus_per_node=defaults["gpus_per_node"],
        default_tasks_per_node=max(1, defaults["tasks_per_node"]),
        default_cpus_per_task=max(1, defaults["cpus_per_task"]),
        default_mem_mb=defaults["mem_mb"],
        cpu_bind=data.get("cpu_bind"),
        numactl_args=numactl_args,
        numactl_when=numactl_when,
        numactl_per_rank=numactl_per_rank,
        nsys=nsys,
        python=data.get("python"),
        output_root=str(data["output_root"]),
        environment=data.get("environment"),
        env={str(k): v for k, v in env.items()},
        source=source,
        course_store=data.get("course_store"),
        gpu_mem_mb=node.get("gpu_mem_mb"),
    )


def load_cluster(name: str) -> ClusterProfile:
    path = _named_file("cluster", name, CLUSTERS_DIR, list_clusters())
    return cluster_from_dict(read_yaml(path), str(path))


# --------------------------------------------------------------------------------------------------
# The `job:` section of an experiment
# --------------------------------------------------------------------------------------------------

_JOB_KEYS: dict[str, str] = {
    "name": "Slurm job name (default lmtrain-<experiment>)",
    "nodes": "number of nodes (more than one: whole nodes, one task per GPU, unless job.gpus says otherwise)",
    "gpus": "GPUs per node, one task each (the course's experiments: 1; job.gpus=4 for a whole GH200 node)",
    "time": "time limit HH:MM:SS",
    "partition": "partition (default: the cluster's)",
    "account": "Slurm account (default: the cluster's, or its account environment variable)",
    "gpus_per_node": "GPUs per node (default: the cluster's)",
    "tasks_per_node": "tasks per node (default: one per GPU)",
    "cpus_per_task": "CPU cores per task (default: the cluster's)",
    "mem_mb": "memory per node in MB (default: the cluster's)",
    "nsys": "run the task under nsys profile (needs nsys on the cluster)",
    "environment": "container environment file (default: the cluster's; 'none' for no container)",
    "output_root": "where the run directory goes (default: the cluster's)",
    "max_num_timeout": "how many times a job may be requeued after hitting its time limit",
    "signal_delay_s": "seconds before the time limit at which Slurm signals the job to checkpoint",
    "constraint": "Slurm --constraint",
    "qos": "Slurm --qos",
    "memory_check": "refuse to submit when the per-GPU memory estimate exceeds the GPU (false: submit anyway)",
}


@dataclass(frozen=True)
class JobSpec:
    name: str | None = None
    nodes: int = 1
    gpus: int | None = None
    time: str = "00:30:00"
    partition: str | None = None
    account: str | None = None
    gpus_per_node: int | None = None
    tasks_per_node: int | None = None
    cpus_per_task: int | None = None
    mem_mb: int | None = None
    nsys: bool = False
    environment: str | None = None
    output_root: str | None = None
    max_num_timeout: int = 3
    signal_delay_s: int = 90
    constraint: str | None = None
    qos: str | None = None
    memory_check: bool = True


def job_from_dict(data: Mapping[str, Any] | None, source: str) -> JobSpec:
    data = dict(data or {})
    unknown = [k for k in data if k not in _JOB_KEYS]
    if unknown:
        key = unknown[0]
        close = suggest(key, list(_JOB_KEYS))
        valid = ", ".join(f"job.{k}" for k in _JOB_KEYS)
        raise UserError(f"{source}: unknown key 'job.{key}' ({close}); valid job keys: {valid}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        default = getattr(JobSpec, key)
        if key in ("nodes", "gpus", "gpus_per_node", "tasks_per_node", "cpus_per_task", "mem_mb", "max_num_timeout",
                   "signal_delay_s"):  # fmt: skip
            if value is None and default is None:
                out[key] = None
                continue
            if isinstance(value, str) and value.strip().isdigit():
                value = int(value)
            minimum = 1 if key in ("nodes", "tasks_per_node", "cpus_per_task") else 0
            if not _is_int(value) or value < minimum:
                raise UserError(f"{source}: job.{key} = {value!r} must be an integer >= {minimum}")
        elif key in ("nsys", "memory_check"):
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                value = value.lower() in ("true", "yes", "1")
            if not isinstance(value, bool):
                raise UserError(f"{source}: job.{key} = {value!r} must be true or false")
        elif key == "time":
            parse_time(value, f"{source}: job.time")
            value = str(value)
        else:
            if value is not None and not isinstance(value, (str, int)):
                raise UserError(f"{source}: job.{key} = {value!r} must be a string")
            value = None if value is None else str(value)
        out[key] = value
    return JobSpec(**out)


# --------------------------------------------------------------------------------------------------
# Experiments and key=value overrides
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Experiment:
    name: str
    train: TrainConfig
    job: JobSpec
    source: str
    set_keys: frozenset[str] = frozenset()  # training keys the experiment file or an override sets


def parse_overrides(items: list[str]) -> dict:
    """`section.field=value` / `job.key=value` tokens -> nested dict (values parsed as YAML scalars)."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"override '{item}' is not key=value (e.g. optim.lr=1e-4 or job.nodes=2)")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        if key.count(".") != 1:
            raise UserError(
                f"override '{item}': the key must be section.field (e.g. optim.lr, job.time), got '{key}'"
            )
        section, name = key.split(".")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, (dict, list, str)):
            value = raw  # strings verbatim (YAML would fold line breaks and strip quotes)
        if section == "job" and name == "time":
            value = raw  # 00:14:59 is sexagesimal to YAML 1.1
        out.setdefault(section, {})[name] = value
    return out


def load_experiment(name: str, overrides: list[str] | None = None) -> Experiment:
    path = _named_file("experiment", name, EXPERIMENTS_DIR, list_experiments())
    data = load_yaml_with_bases(path)
    job = data.pop("job", None) or {}
    if not isinstance(job, dict):
        raise UserError(f"{path}: the job: section must be a mapping, got {job!r}")
    job_from_dict(job, str(path))
    config_from_dict(data, source=str(path))  # the file alone first, so that its errors name it
    over = parse_overrides(overrides or [])
    job_over = over.pop("job", {})
    for section, values in over.items():
        for key in values:
            if f"{section}.{key}" not in all_keys():
                raise ConfigError(
                    f"override {section}.{key}: unknown key: {suggest(f'{section}.{key}', all_keys() + ['job.'])}"
                    f" (job keys: {', '.join('job.' + k for k in _JOB_KEYS)})"
                )
    data = deep_merge(data, over)
    train = config_from_dict(data, source="overrides" if over else str(path))
    if {"gpus", "gpus_per_node"} & set(job_over):  # an override of either replaces the file's GPU count
        job = {k: v for k, v in job.items() if k not in ("gpus", "gpus_per_node")}
    spec = job_from_dict({**job, **job_over}, "overrides" if job_over else str(path))
    exp_name = path.stem
    return Experiment(exp_name, train, spec, str(path), frozenset(flatten_keys(data)))


# --------------------------------------------------------------------------------------------------
# The plan: everything needed to write the run directory, the sbatch script and to submit
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobPlan:
    experiment: str
    cluster: str
    job_name: str
    account: str | None
    partition: str
    seconds: int  # the time limit, kept to the second (00:14:59 stays 00:14:59)
    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    gpus_per_task: int
    cpus_per_task: int
    mem_mb: int
    constraint: str | None
    qos: str | None
    signal_delay_s: int
    max_num_timeout: int
    run_dir: str
    workdir: str
    edf: str | None  # the per-run EDF passed to srun --environment
    python: str
    command: tuple[str, ...]  # the task command one rank runs
    env: tuple[tuple[str, str], ...]
    cpu_bind: str | None
    warnings: tuple[str, ...] = field(default=())

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def total_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def minutes(self) -> int:
        """The time limit in whole minutes, rounded up (submitit's unit)."""
        return -(-self.seconds // 60)

    @property
    def time(self) -> str:
        return format_seconds(self.seconds)

    @property
    def submitit_folder(self) -> str:
        return f"{self.run_dir}/submitit"

    def srun_args(self) -> list[str]:
        """Options for srun (submitit's `slurm_srun_args`): container, CPUs per task, binding."""
        args = []
        if self.edf:
            args.append(f"--environment={self.edf}")
        args.append(f"--cpus-per-task={self.cpus_per_task}")
        if self.cpu_bind:
            args.append(f"--cpu-bind={self.cpu_bind}")
        return args

    def setup_lines(self) -> list[str]:
        """Shell lines run in the batch script before srun (submitit's `setup`)."""
        # Slurm may deliver the step signal (USR2; USR1 where a site preempts with it) before srun has
        # started a step, e.g. right after a requeue near a short time limit: the batch shell must
        # survive it (either would kill it).
        lines = ["trap '' USR1 USR2"]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in self.env]
        # The task runs `jobs.task` / `lmtrain.train` from the checkout, installed or not.
        lines.append(f"export PYTHONPATH={shlex.quote(self.workdir)}${{PYTHONPATH:+:$PYTHONPATH}}")
        return lines

    def submitit_parameters(self) -> dict[str, Any]:
        """Parameters for `submitit.SlurmExecutor.update_parameters`."""
        params: dict[str, Any] = dict(
            job_name=self.job_name,
            partition=self.partition,
            time=self.minutes,
            nodes=self.nodes,
            ntasks_per_node=self.tasks_per_node,
            cpus_per_task=self.cpus_per_task,
            signal_delay_s=self.signal_delay_s,
            srun_args=self.srun_args(),
            setup=self.setup_lines(),
            # submitit's `time` is whole minutes; the exact limit goes to sbatch as written.
            additional_parameters={
                "mem": str(self.mem_mb),
                "chdir": self.workdir,
                "time": self.time,
                "requeue": True,
            },  # fmt: skip
        )
        if self.account:
            params["account"] = self.account
        if self.gpus_per_node:
            params["gpus_per_node"] = self.gpus_per_node
            params["gpus_per_task"] = self.gpus_per_task
        if self.constraint:
            params["constraint"] = self.constraint
        if self.qos:
            params["qos"] = self.qos
        return params


def _tool_present(tool: str, when: str, which=shutil.which) -> bool:
    if when == "always" or when == "available":
        return True
    if when in ("if-installed",):
        return which(tool) is not None
    return False


def resolve_account(cluster: ClusterProfile, spec: JobSpec, environ: Mapping[str, str]) -> str | None:
    if spec.account:
        return spec.account
    if cluster.account_env and environ.get(cluster.account_env):
        return environ[cluster.account_env]
    return cluster.account


def account_error(cluster: ClusterProfile) -> UserError:
    env = f", export {cluster.account_env}=<account>" if cluster.account_env else ""
    return UserError(
        f"cluster '{cluster.name}' needs a Slurm account: set `account:` in {cluster.source}{env}, "
        "or pass --account <account> (or job.account=<account>)"
    )


def nsys_command(run_dir: str, world_size: int) -> list[str]:
    out = f"{run_dir}/trace" if world_size == 1 else f"{run_dir}/trace_rank%q{{RANK}}"
    return [
        "nsys", "profile", "-s", "none", "-w", "true", "--trace=nvtx,cudnn,cublas,cuda",
        "--capture-range=cudaProfilerApi", "--capture-range-end=stop", "-x", "true",
        "--force-overwrite", "true", "-o", out,
    ]  # fmt: skip


def make_plan(
    exp: Experiment,
    cluster: ClusterProfile,
    run_dir: str,
    workdir: str,
    environ: Mapping[str, str],
    edf_path: str | None,
    which=shutil.which,
    python: str | None = None,
    require_account: bool = True,
) -> JobPlan:
    """Combine an experiment with a cluster profile. Pure given its arguments (`which` answers whether
    a tool is installed; `edf_path` is where the per-run EDF will be, None for no container)."""
    spec = exp.job
    warnings: list[str] = []
    account = resolve_account(cluster, spec, environ)
    if cluster.account_required and not account and require_account:
        raise account_error(cluster)
    partition = spec.partition or cluster.default_partition
    if partition not in cluster.partitions:
        raise UserError(
            f"job.partition = '{partition}' is not a partition of {cluster.name}: "
            f"valid: {', '.join(cluster.partitions)}"
        )
    part = cluster.partitions[partition]
    seconds = parse_seconds(spec.time)
    if part.max_minutes is not None and seconds > part.max_minutes * 60:
        raise UserError(
            f"job.time = {spec.time} exceeds the {format_minutes(part.max_minutes)} limit of partition "
            f"'{partition}' on {cluster.name}: shorten job.time or pick another job.partition"
        )
    if part.max_nodes is not None and spec.nodes > part.max_nodes:
        raise UserError(
            f"job.nodes = {spec.nodes} exceeds the {part.max_nodes}-node limit of partition '{partition}'"
        )
    if spec.gpus is not None and spec.gpus_per_node is not None and spec.gpus != spec.gpus_per_node:
        raise UserError(
            f"job.gpus = {spec.gpus} and job.gpus_per_node = {spec.gpus_per_node} disagree: set only job.gpus"
        )
    explicit_gpus = spec.gpus if spec.gpus is not None else spec.gpus_per_node
    if explicit_gpus is not None:
        gpus = explicit_gpus
    elif spec.nodes > 1 and cluster.node_gpus:
        gpus = cluster.node_gpus  # several nodes: whole nodes
    else:
        gpus = cluster.default_gpus_per_node
    if gpus > cluster.node_gpus:
        raise UserError(
            f"job.gpus = {gpus} but a {cluster.name} node has {cluster.node_gpus} GPUs: "
            f"use at most {cluster.node_gpus} per node and more job.nodes"
        )
    if spec.tasks_per_node is not None:
        tasks = spec.tasks_per_node
    elif (explicit_gpus is not None or spec.nodes > 1) and gpus > 0:
        tasks = gpus  # one task per GPU
    else:
        tasks = cluster.default_tasks_per_node
    gpus_per_task = 0
    if gpus:
        if gpus % tasks:
            raise UserError(
                f"job.gpus_per_node = {gpus} is not a multiple of job.tasks_per_node = {tasks}: "
                "lmtrain runs one task per GPU (or a whole number of GPUs per task)"
            )
        gpus_per_task = gpus // tasks
    cpus = spec.cpus_per_task or cluster.default_cpus_per_task
    if spec.cpus_per_task is None and tasks * cpus > cluster.node_cpus:
        cpus = max(1, cluster.node_cpus // tasks)
    if tasks * cpus > cluster.node_cpus:
        raise UserError(
            f"job.tasks_per_node x job.cpus_per_task = {tasks} x {cpus} = {tasks * cpus} CPUs, but a "
            f"{cluster.name} node has {cluster.node_cpus}: lower job.cpus_per_task"
        )
    mem = cluster.default_mem_mb if spec.mem_mb is None else spec.mem_mb
    if mem > cluster.node_mem_mb:
        raise UserError(f"job.mem_mb = {mem} but a {cluster.name} node has {cluster.node_mem_mb} MB")
    world = spec.nodes * tasks
    command: list[str] = []
    if spec.nsys:
        if not _tool_present("nsys", cluster.nsys, which):
            raise UserError(
                f"job.nsys = true but cluster '{cluster.name}' has no nsys (nsys: {cluster.nsys} in "
                f"{cluster.source}): install Nsight Systems, or set job.nsys=false"
            )
        command += nsys_command(run_dir, world)
    if cluster.numactl_args is not None and _tool_present("numactl", cluster.numactl_when, which):
        # One task binds its memory to every NUMA node it may use (the course's --membind=0-3); with one
        # task per GPU each rank binds CPUs and memory to its own GPU's node (GH200: GPU i <-> node i).
        per_rank = tasks > 1 and cluster.numactl_per_rank
        command += ["numactl", *shlex.split(cluster.numactl_per_rank if per_rank else cluster.numactl_args)]
    py = python or cluster.python or "python3"
    command += [py, "-m", "lmtrain.train", "--config", f"{run_dir}/config.yaml"]
    env = dict(cluster.env)
    env.setdefault("OMP_NUM_THREADS", str(cpus))
    if spec.signal_delay_s >= seconds:
        raise UserError(
            f"job.signal_delay_s = {spec.signal_delay_s} is not shorter than job.time = {spec.time}: "
            "lower job.signal_delay_s"
        )
    for what, value in (("job.name", spec.name), ("job.account", account), ("run directory", run_dir),
                        ("checkout directory", workdir), ("job.constraint", spec.constraint),
                        ("job.qos", spec.qos), ("container environment file", edf_path)):  # fmt: skip
        if value is not None and any(c in value for c in "\n\r\0"):
            raise UserError(f"{what} = {value!r} contains a line break or NUL: remove it")
    return JobPlan(
        experiment=exp.name,
        cluster=cluster.name,
        job_name=spec.name or f"lmtrain-{exp.name}",
        account=account,
        partition=partition,
        seconds=seconds,
        nodes=spec.nodes,
        tasks_per_node=tasks,
        gpus_per_node=gpus,
        gpus_per_task=gpus_per_task,
        cpus_per_task=cpus,
        mem_mb=mem,
        constraint=spec.constraint,
        qos=spec.qos,
        signal_delay_s=spec.signal_delay_s,
        max_num_timeout=spec.max_num_timeout,
        run_dir=run_dir,
        workdir=workdir,
        edf=edf_path,
        python=py,
        command=tuple(command),
        env=tuple(sorted(env.items())),
        cpu_bind=cluster.cpu_bind,
        warnings=tuple(warnings),
    )


def expand_cluster_paths(d: dict, cluster: ClusterProfile) -> None:
    """`${COURSE_STORE}` (and the profile's other variables) in data.dataset / data.tokenizer, in place."""
    from jobs.edf import expand

    variables = cluster.variables()
    for key in ("dataset", "tokenizer"):
        value = d["data"].get(key)
        if not isinstance(value, str) or "$" not in value:
            continue
        value = expand(value, variables)
        if "${" in value:
            name = value[value.index("${") + 2 : value.index("}", value.index("${"))]
            raise UserError(
                f"data.{key} = {d['data'][key]!r} uses ${{{name}}}, which cluster '{cluster.name}' does not "
                f"define ({cluster.source}): set data.{key}=PATH, or add course_store: to the profile"
            )
        d["data"][key] = value


def resolved_train_config(
    exp: Experiment, run_dir: str, cwd: str, cluster: ClusterProfile | None = None
) -> TrainConfig:
    """The training config the job runs: pinned to the run directory and resuming in place, with the
    cluster's path variables expanded."""
    train = dataclasses.replace(exp.train)
    d = config_to_dict(train)
    d["training"]["output_dir"] = run_dir
    if d["checkpoint"]["resume"] == "none":
        d["checkpoint"]["resume"] = "auto"
    if cluster is not None:
        expand_cluster_paths(d, cluster)
    dataset = d["data"]["dataset"]
    if dataset and not os.path.isabs(dataset) and "://" not in dataset:
        local = Path(cwd) / dataset
        if local.exists():
            d["data"]["dataset"] = str(local)
    return config_from_dict(d, source=exp.source)


def estimated_tokens(train: TrainConfig, plan: JobPlan) -> int:
    return (
        train.training.steps
        * train.training.grad_accumulation_steps
        * train.data.batch_size
        * train.data.sequence_length
        * plan.world_size
    )
