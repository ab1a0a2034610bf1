"""Experiments, cluster profiles, the job plan and the sbatch script (pure: no Slurm needed).

Golden files: tests/golden/*.sbatch; regenerate with LMTRAIN_UPDATE_GOLDEN=1 pytest tests/test_jobs_plan.py
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from submitit.slurm.slurm import _make_sbatch_string

from jobs.sbatch import render_sbatch
from jobs.spec import (
    cluster_from_dict,
    estimated_tokens,
    list_clusters,
    list_experiments,
    load_cluster,
    load_experiment,
    make_plan,
    parse_time,
    read_yaml,
)
from jobs.submit import layout_rows, prepare, print_dry_run
from lmtrain.config import ConfigError, load_config
from lmtrain.errors import UserError

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden"
ENV = {"CLARIDEN_ACCOUNT": "a-large-sc"}
WORKDIR = "/users/alice/lmtrain"


def which_all(tool):
    return f"/usr/bin/{tool}"


def which_none(tool):
    return None


def golden_plan(exp, overrides=(), cluster="clariden"):
    e = load_experiment(exp, list(overrides))
    run_dir = f"/iopsstor/scratch/cscs/alice/lmtrain/runs/{exp}/golden"
    return make_plan(e, load_cluster(cluster), run_dir, WORKDIR, ENV, f"{run_dir}/env.toml", which=which_all)


@pytest.mark.parametrize(
    "name, exp, overrides",
    [
        ("baseline", "baseline", []),
        ("fused", "fused", []),
        ("compile", "compile", []),
        ("seq4096", "seq4096", []),
        ("fused-compile-seq4096", "fused-compile-seq4096", []),
        ("fused-4gpus", "fused", ["job.gpus=4"]),
        ("fused-2nodes", "fused", ["job.nodes=2", "job.time=01:00:00"]),
        ("profile", "profile", []),
    ],
)
def test_sbatch_matches_golden(name, exp, overrides):
    text = render_sbatch(golden_plan(exp, overrides))
    path = GOLDEN / f"{name}.sbatch"
    if os.environ.get("LMTRAIN_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.is_file(), f"{path} missing: run with LMTRAIN_UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), f"{name}: sbatch differs from {path} (LMTRAIN_UPDATE_GOLDEN=1 to accept)"


def test_sbatch_is_a_pure_function_of_the_plan():
    assert render_sbatch(golden_plan("fused")) == render_sbatch(golden_plan("fused"))
    assert render_sbatch(golden_plan("fused")) != render_sbatch(golden_plan("baseline"))


def test_golden_content_is_the_clariden_layout():
    text = (GOLDEN / "fused-2nodes.sbatch").read_text()
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-task=1",
        "#SBATCH --cpus-per-task=72",
        "#SBATCH --mem=460000",
        "#SBATCH --account=a-large-sc",
    ):
        assert line in text
    srun = next(line for line in text.splitlines() if line.startswith("srun "))
    assert "--environment=/iopsstor/scratch/cscs/alice/lmtrain/runs/fused/golden/env.toml" in srun
    assert "--cpus-per-task=72" in srun
    # four tasks per node: each rank binds CPUs and memory to its own GPU's NUMA node
    assert "numactl '--cpunodebind={local_rank}' '--membind={local_rank}' python3 -m lmtrain.train" in text
    for name in ("baseline", "fused", "compile", "seq4096", "fused-compile-seq4096"):
        one = (GOLDEN / f"{name}.sbatch").read_text()  # the course's runs: one task on one GPU
        for line in ("#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=1", "#SBATCH --nodes=1"):
            assert line in one, (name, line)
        assert "numactl --membind=0-3 python3 -m lmtrain.train" in one
    assert "#SBATCH --time=00:14:59" in (GOLDEN / "baseline.sbatch").read_text()  # kept to the second
    assert "#SBATCH --time=00:29:59" in (GOLDEN / "compile.sbatch").read_text()
    four = (GOLDEN / "fused-4gpus.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=4" in four and "#SBATCH --gpus-per-task=1" in four
    profile = (GOLDEN / "profile.sbatch").read_text()
    assert (
        "nsys profile -s none -w true --trace=nvtx,cudnn,cublas,cuda --capture-range=cudaProfilerApi"
        in profile
    )
    assert "-o /iopsstor/scratch/cscs/alice/lmtrain/runs/profile/golden/trace numactl" in profile
    assert "#SBATCH --gpus-per-node=1" in profile  # one GH200, as the course profiles
    multi = render_sbatch(golden_plan("profile", ["job.gpus=4"]))
    assert "golden/trace_rank%q{RANK}" in multi  # one trace per rank


def test_standalone_script_has_the_same_options_as_submitit():
    plan = golden_plan("fused", ["job.nodes=2"])
    sub = _make_sbatch_string(command="CMD", folder=plan.submitit_folder, **plan.submitit_parameters())

    def options(text):
        out = {}
        for line in text.splitlines():
            m = re.match(r"#SBATCH --([\w-]+)(?:=(.*))?$", line)
            if m:
                out[m.group(1)] = shlex.split(m.group(2) or "")
        return out

    mine, theirs = options(render_sbatch(plan)), options(sub)
    theirs.pop("wckey", None)
    for key in ("output", "error"):  # submitit's %j_0_log.out pattern, same folder
        assert mine.pop(key) == theirs.pop(key)
    assert mine.pop("time") == theirs.pop("time") == ["00:14:59"]  # to the second through submitit too
    assert mine == theirs
    sub_srun = shlex.split(next(line for line in sub.splitlines() if line.startswith("srun ")))
    mine_srun = shlex.split(
        next(line for line in render_sbatch(plan).splitlines() if line.startswith("srun "))
    )
    assert sub_srun[-1] == "CMD"
    assert mine_srun[: mine_srun.index("-u") - 1] == sub_srun[:-1]
    for line in plan.setup_lines():
        assert line in sub


def test_user_values_cannot_inject_shell_commands_fake_srun(tmp_path):
    """Run the script with bash; a fake srun records its argv: no injected command may run."""
    pwned = tmp_path / "PWNED"
    root = tmp_path / "out dir; touch PWNED"
    e = load_experiment(
        "fused",
        [f"job.name=x; touch {pwned}", f"job.account=$(touch {pwned})", "job.constraint=`touch PWNED`"],
    )
    run_dir = str(root / "fused" / "r 1;touch PWNED")
    plan = make_plan(
        e, load_cluster("clariden"), run_dir, str(tmp_path / "w;touch PWNED"), ENV, None, which_all
    )
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(plan))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "srun"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    out = subprocess.run(
        ["bash", str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"},
    )
    assert out.returncode == 0, out.stderr
    assert not pwned.exists() and not (tmp_path / "PWNED").exists()
    argv = json.loads(out.stdout.strip().splitlines()[-1])
    assert argv[-1] == run_dir
    assert f"{run_dir}/submitit/%j_%t_log.out" in argv
    assert Path(run_dir, "submitit").is_dir()  # the mkdir -p of the script got the exact path
    assert "#SBATCH --job-name='x; touch " in script.read_text()


def test_line_breaks_in_values_are_rejected():
    e = load_experiment("fused", ["job.name=a\nrm -rf /"])
    assert e.job.name == "a\nrm -rf /"
    with pytest.raises(UserError, match="line break"):
        make_plan(e, load_cluster("clariden"), "/r", WORKDIR, ENV, None, which_all)


def test_every_experiment_resolves_and_dry_runs(tmp_path):
    assert {"baseline", "fused", "compile", "seq4096", "fused-compile-seq4096", "profile", "smoke"} <= set(
        list_experiments()
    )
    assert {"clariden", "local"} <= set(list_clusters())
    for exp in list_experiments():
        run = prepare(
            exp, "clariden", environ=ENV, dry_run=True, run_dir=str(tmp_path / exp), which=which_all
        )
        assert run.plan.account == "a-large-sc"
        assert run.train.training.output_dir == str(tmp_path / exp)
        assert run.train.checkpoint.resume == "auto"
        assert run.edf is not None and run.plan.edf == f"{tmp_path / exp}/env.toml"


def test_experiments_carry_the_course_settings():
    b = load_experiment("baseline").train
    assert (b.data.sequence_length, b.data.batch_size, b.optim.lr, b.schedule.warmup_steps) == (
        2048,
        1,
        5e-5,
        100,
    )
    assert (b.training.steps, b.model.preset, b.precision.model_dtype, b.schedule.name) == (
        1000,
        "llama3-8b",
        "bf16",
        "constant",
    )
    assert b.data.tokenizer == "unsloth/Mistral-Nemo-Base-2407-bnb-4bit"
    assert b.data.dataset == "${COURSE_STORE}/datasets/train_data.parquet"
    on_clariden = prepare("baseline", "clariden", environ=ENV, dry_run=True, run_dir="/iopsstor/r").train
    assert on_clariden.data.dataset == "/capstor/store/cscs/ethz/large-sc-2/datasets/train_data.parquet"
    assert load_experiment("fused").train.optim.fused is True
    assert load_experiment("compile").train.training.compile is True
    assert load_experiment("seq4096").train.data.sequence_length == 4096
    fcs = load_experiment("fused-compile-seq4096").train
    assert (fcs.optim.fused, fcs.training.compile, fcs.data.sequence_length) == (True, True, 4096)
    p = load_experiment("profile")
    assert p.job.nsys and p.train.profiling.profile
    assert (p.train.profiling.profile_step_start, p.train.profiling.profile_step_end) == (10, 12)
    assert load_experiment("smoke").train.model.preset != "llama3-8b"


def test_overrides_reach_training_and_job():
    e = load_experiment("fused", ["optim.lr=1e-4", "training.steps=50", "job.nodes=2", "job.time=00:30:00"])
    assert e.train.optim.lr == 1e-4 and e.train.training.steps == 50
    assert e.job.nodes == 2 and parse_time(e.job.time) == 30


def test_two_nodes_layout_and_tokens():
    plan = golden_plan("fused", ["job.nodes=2"])
    assert plan.world_size == 8 and plan.total_gpus == 8
    rows = layout_rows(plan)
    assert rows[5] == (5, 1, 1, "1")
    train = load_experiment("fused").train
    assert estimated_tokens(train, plan) == 1000 * 1 * 2048 * 8


def test_dry_run_prints_script_edf_command_and_summary(tmp_path, capsys):
    over = ["job.nodes=2", "job.gpus_per_node=4", "job.tasks_per_node=4"]
    run = prepare("profile", "clariden", over, environ=ENV, dry_run=True, run_dir=str(tmp_path / "r"))
    print_dry_run(run)
    out = capsys.readouterr().out
    assert "#SBATCH --nodes=2" in out
    assert 'image = "/capstor/' in out
    assert "nsys profile" in out and "lmtrain.train --config" in out
    assert "node-hours" in out and "0.50" in out
    assert "327,680" in out  # 20 steps x 1 x 2048 x 8 ranks
    assert "│ 7    │ 1    │ 3" in out


def test_dry_run_cli_writes_a_runnable_run_dir(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "jobs.submit", "--exp", "fused", "--cluster", "clariden", "--dry-run",
         "--account", "acct", f"job.output_root={tmp_path}", "optim.lr=2e-4"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    (run_dir,) = list((tmp_path / "fused").iterdir())
    cfg = load_config(run_dir / "config.yaml")
    assert cfg.training.output_dir == str(run_dir) and cfg.optim.lr == 2e-4
    assert "#SBATCH --account=acct" in (run_dir / "job.sbatch").read_text()
    assert json.loads((run_dir / "task.json").read_text())["command"][-1] == f"{run_dir}/config.yaml"
    assert "nothing submitted" in out.stdout


def test_time_limits():
    assert parse_time("00:14:59") == 15
    assert parse_time("30") == 30
    assert parse_time("1-00:00:00") == 24 * 60
    assert parse_time("05:30") == 6
    for bad in ("1h", "00:61:00", "-5", "1:2:3:4", "", "00:00:00", "12:00:75"):
        with pytest.raises(UserError, match="job.time"):
            parse_time(bad)


def test_who_requeues_a_job():
    from jobs.submit import requeue_owner

    def local(over=()):
        return make_plan(load_experiment("smoke", list(over)), load_cluster("local"), "/r", WORKDIR, {}, None)

    assert requeue_owner(golden_plan("fused")) == "sbatch"  # a container: the batch script, outside it
    assert requeue_owner(local()) == "submitit"  # 00:10:00 and no container: submitit's path works
    short = local(["job.time=00:05:00", "job.signal_delay_s=30"])
    assert requeue_owner(short) == "sbatch"  # under 10 minutes submitit would count preemptions as time-outs
    with pytest.raises(
        UserError, match=r"--via submitit with job.time = 00:05:00: under 10 minutes submitit"
    ):
        requeue_owner(short, "submitit")
    with pytest.raises(
        UserError, match=r"--via submitit: submitit requeues from inside the task, here inside"
    ):
        requeue_owner(golden_plan("fused"), "submitit")


def test_the_batch_script_requeues_outside_the_container_on_exit_85():
    text = (GOLDEN / "fused.sbatch").read_text()
    srun_at = text.index("\nsrun ")
    after = text[srun_at:]
    assert (
        after.index("rc=$?")
        < after.index('if [ "$rc" -eq 85 ]')
        < after.index('scontrol requeue "$SLURM_JOB_ID"')
    )
    assert "trap '' USR1 USR2" in text[:srun_at]
    assert '"scontrol"' not in Path(REPO / "jobs/task.py").read_text()  # the task never calls it


# ------------------------------------------------------------------------------------------ bad input


def test_unknown_experiment_lists_valid_ones():
    with pytest.raises(UserError, match=r"unknown experiment 'nope'.*baseline.*smoke"):
        load_experiment("nope")


def test_unknown_cluster_lists_valid_ones():
    with pytest.raises(UserError, match=r"unknown cluster 'daint'.*clariden.*local"):
        load_cluster("daint")


def test_unknown_config_key_in_override():
    with pytest.raises(ConfigError, match=r"optim\.lrr.*did you mean 'optim\.lr'"):
        load_experiment("fused", ["optim.lrr=1"])


def test_unknown_config_key_in_experiment_file(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("optim:\n  learning_rate: 1e-4\njob:\n  nodes: 1\n")
    with pytest.raises(ConfigError, match=r"exp.yaml.*unknown key 'optim.learning_rate'"):
        load_experiment(str(f))


def test_unknown_job_key_lists_valid_ones():
    with pytest.raises(UserError, match=r"unknown key 'job.node'.*did you mean 'nodes'.*job.time"):
        load_experiment("fused", ["job.node=2"])


def test_bad_time_format():
    with pytest.raises(UserError, match=r"job.time = '15min' is not a Slurm time limit"):
        load_experiment("fused", ["job.time=15min"])


def test_time_over_partition_limit():
    with pytest.raises(UserError, match=r"exceeds the 01:30:00 limit of partition 'debug'"):
        golden_plan("fused", ["job.partition=debug", "job.time=02:00:00"])


def test_more_gpus_than_a_node_has():
    with pytest.raises(UserError, match=r"job.gpus = 8 but a clariden node has 4 GPUs"):
        golden_plan("fused", ["job.gpus=8"])
    with pytest.raises(
        UserError, match=r"job.gpus = 2 and job.gpus_per_node = 4 disagree: set only job.gpus"
    ):
        golden_plan("fused", ["job.gpus=2", "job.gpus_per_node=4"])


def test_more_cpus_than_a_node_has():
    with pytest.raises(UserError, match=r"4 x 100 = 400 CPUs.*has 288"):
        golden_plan("fused", ["job.gpus=4", "job.cpus_per_task=100"])


def test_course_experiments_run_one_task_on_one_gpu_and_more_is_explicit():
    for exp in ("baseline", "fused", "compile", "seq4096", "fused-compile-seq4096", "profile"):
        plan = golden_plan(exp)
        assert (plan.nodes, plan.tasks_per_node, plan.gpus_per_node, plan.world_size) == (1, 1, 1, 1), exp
    assert golden_plan("baseline").time == "00:14:59"
    four = golden_plan("fused", ["job.gpus=4"])
    assert (four.tasks_per_node, four.gpus_per_task, four.world_size) == (4, 1, 4)
    two_nodes = golden_plan("fused", ["job.nodes=2"])  # several nodes: whole nodes
    assert (two_nodes.tasks_per_node, two_nodes.world_size) == (4, 8)
    assert golden_plan("fused", ["job.nodes=2", "job.gpus=1"]).world_size == 2


def test_multi_gpu_picks_fsdp_for_8b_and_ddp_where_a_replica_fits(tmp_path):
    def prepared(exp, over):
        return prepare(exp, "clariden", over, environ=ENV, dry_run=True, run_dir=str(tmp_path / exp))

    one = prepared("fused", [])
    assert one.strategy_note is None and one.train.distributed.strategy == "ddp"  # nothing to shard
    eight_b = prepared("fused", ["job.gpus=4"])
    assert eight_b.train.distributed.strategy == "fsdp"
    assert (
        "fsdp (chosen: DDP needs ~83.9 GiB per GPU, x1.15 = 96.5 GiB > 95.6 GiB of one GPU)"
        in eight_b.strategy_note
    )
    assert eight_b.memory.fits and eight_b.memory.estimate.strategy == "fsdp"
    small = prepared("fused", ["job.gpus=4", "model.preset=gpt2-small"])
    assert small.train.distributed.strategy == "ddp" and small.strategy_note.startswith("ddp (chosen")
    kept = prepared("fused", ["job.gpus=4", "distributed.strategy=ddp"])
    assert kept.train.distributed.strategy == "ddp" and "set by the experiment" in kept.strategy_note


def test_memory_estimate_next_to_the_gpu_in_dry_run_and_submit_refuses_what_does_not_fit(tmp_path, capsys):
    run = prepare("baseline", "clariden", environ=ENV, dry_run=True, run_dir=str(tmp_path / "b"))
    assert run.memory.fits and run.memory.device == 97871 * 2**20
    print_dry_run(run)
    out = capsys.readouterr().out
    assert "memory per GPU (lmtrain.memory estimate;" in out
    assert "AdamW moments" in out and "cuda context" in out and "one GPU (cluster profile)" in out
    assert "memory per GPU: ~79.8 GiB estimated (single x1, bf16, batch 1 x 2048) of 95.6 GiB: fits" in out
    big = ["data.batch_size=8"]
    with pytest.raises(
        UserError,
        match=r"does NOT fit; "
        r"data.batch_size=\d or data.sequence_length=\d+ would fit; job.memory_check=false",
    ):
        prepare("baseline", "clariden", big, environ=ENV, run_dir=str(tmp_path / "big"))
    dry = prepare("baseline", "clariden", big, environ=ENV, dry_run=True, run_dir=str(tmp_path / "big"))
    assert any("does NOT fit" in w for w in dry.warnings)  # the dry run says so without refusing
    anyway = prepare(
        "baseline", "clariden", [*big, "job.memory_check=false"], environ=ENV, run_dir=str(tmp_path / "x")
    )
    assert any("submitted anyway: job.memory_check=false" in w for w in anyway.warnings)
    ddp = ["job.gpus=4", "distributed.strategy=ddp", "data.batch_size=2"]
    with pytest.raises(
        UserError, match=r"\(ddp x4, bf16, batch 2 x 2048\).*does NOT fit; distributed.strategy=fsdp"
    ):
        prepare("baseline", "clariden", ddp, environ=ENV, run_dir=str(tmp_path / "ddp"))
    assert (
        prepare("smoke", "local", ["data.dataset=/"], dry_run=True, run_dir=str(tmp_path / "s")).memory
        is None
    )


def test_memory_check_must_be_a_boolean():
    with pytest.raises(UserError, match=r"job.memory_check = 'maybe' must be true or false"):
        load_experiment("fused", ["job.memory_check=maybe"])


def test_course_store_variable_on_a_cluster_without_it():
    with pytest.raises(
        UserError, match=r"data.dataset = .*uses \$\{COURSE_STORE\}, which cluster 'local' does not"
    ):
        prepare("baseline", "local", dry_run=True, run_dir="/tmp/never-written")


def test_numactl_per_rank_must_name_the_local_rank(tmp_path):
    data = read_yaml(REPO / "jobs/clusters/clariden.yaml")
    data["numactl"]["per_rank"] = "--membind=0"
    with pytest.raises(UserError, match=r"numactl.per_rank must be a string naming \{local_rank\}"):
        cluster_from_dict(data, "c.yaml")


def test_rank_command_binds_each_rank_to_its_numa_node():
    from jobs.task import rank_command

    cmd = list(golden_plan("fused", ["job.gpus=4"]).command)
    assert rank_command(cmd, "2")[:3] == ["numactl", "--cpunodebind=2", "--membind=2"]
    assert list(golden_plan("fused").command)[:2] == ["numactl", "--membind=0-3"]


def test_unknown_partition():
    with pytest.raises(UserError, match=r"'gpu' is not a partition of clariden: valid: normal, debug"):
        golden_plan("fused", ["job.partition=gpu"])


def test_clariden_without_account():
    e = load_experiment("fused")
    with pytest.raises(UserError, match=r"set `account:`.*CLARIDEN_ACCOUNT.*--account"):
        make_plan(e, load_cluster("clariden"), "/r", WORKDIR, {}, None, which_all)
    with pytest.raises(UserError, match="CLARIDEN_ACCOUNT"):
        prepare("fused", "clariden", environ={}, dry_run=False, run_dir="/tmp/x")


def test_nsys_on_a_cluster_without_it():
    e = load_experiment("profile")
    with pytest.raises(UserError, match=r"job.nsys = true but cluster 'local' has no nsys"):
        make_plan(e, load_cluster("local"), "/r", WORKDIR, {}, None, which=which_none)
    plan = make_plan(e, load_cluster("local"), "/r", WORKDIR, {}, None, which=which_all, python="py")
    assert plan.command[:2] == ("nsys", "profile")


def test_local_profile_uses_numactl_only_if_installed():
    e = load_experiment("smoke")
    without = make_plan(e, load_cluster("local"), "/r", WORKDIR, {}, None, which=which_none, python="py")
    assert without.command[0] == "py" and without.edf is None
    with_ = make_plan(e, load_cluster("local"), "/r", WORKDIR, {}, None, which=which_all, python="py")
    assert with_.command[:2] == ("numactl", "--membind=0")


def test_invalid_cluster_profile_names_the_key(tmp_path):
    data = read_yaml(REPO / "jobs/clusters/clariden.yaml")
    with pytest.raises(UserError, match=r"unknown cluster key\(s\) gpu_count; valid keys: name"):
        cluster_from_dict({**data, "gpu_count": 4}, "x.yaml")
    with pytest.raises(UserError, match=r"node.gpus must be an integer >= 0"):
        cluster_from_dict({**data, "node": {"gpus": "four", "cpus": 1, "mem_mb": 1}}, "x.yaml")
    with pytest.raises(UserError, match=r"default_partition must be one of"):
        cluster_from_dict({**data, "default_partition": "gpu"}, "x.yaml")


def test_missing_edf_is_reported(tmp_path):
    with pytest.raises(UserError, match=r"container environment file not found: .*nope.toml"):
        prepare("fused", "clariden", [f"job.environment={tmp_path}/nope.toml"], environ=ENV, run_dir="/tmp/x")


def test_invalid_edf_names_the_field(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('image = "/x/img.sqsh"\nwritable = "yes"\n')
    with pytest.raises(UserError, match=r"field 'writable'"):
        prepare("fused", "clariden", [f"job.environment={bad}"], environ=ENV, run_dir="/tmp/x")


def test_slurm_unreachable_says_how_to_check(tmp_path):
    # No Slurm commands on PATH (Python is called by its absolute path). A configured but dead controller
    # gives the same message after sinfo's own timeout ("sinfo timed out" / "sinfo failed: ...").
    env = {**os.environ, "PATH": str(tmp_path / "no-bin"), "LMTRAIN_JOBS_INDEX": str(tmp_path / "i")}
    out = subprocess.run(
        [sys.executable, "-m", "jobs.submit", "--exp", "smoke", "--cluster", "local", f"job.output_root={tmp_path}",
         f"data.dataset={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert out.returncode == 2
    assert "Slurm is not reachable" in out.stderr and "sinfo" in out.stderr
    assert not (tmp_path / "i").exists()


def test_missing_local_dataset_is_an_error_on_submit_and_a_warning_on_dry_run(tmp_path):
    over = [f"data.dataset={tmp_path}/no-corpus", f"job.output_root={tmp_path}"]
    with pytest.raises(UserError, match=r"data.dataset = .*no-corpus' does not exist.*lmtrain prepare"):
        prepare("smoke", "local", over)
    run = prepare("smoke", "local", over, dry_run=True)
    assert any("does not exist" in w for w in run.warnings)


def test_dataset_outside_the_container_mounts_is_flagged():
    run = prepare(
        "fused", "clariden", ["data.dataset=/scratch/x.parquet"], environ=ENV, dry_run=True, run_dir="/r"
    )
    assert any("not under a mount" in w for w in run.warnings)


def test_job_array_runs_share_resources_and_one_edf(tmp_path):
    from jobs.submit import parse_array, prepare_array

    assert parse_array(["optim.lr=1,2", "training.seed=3,4"]) == [
        ["optim.lr=1", "training.seed=3"],
        ["optim.lr=1", "training.seed=4"],
        ["optim.lr=2", "training.seed=3"],
        ["optim.lr=2", "training.seed=4"],
    ]
    runs = prepare_array(
        "fused",
        "clariden",
        [f"job.output_root={tmp_path}"],
        ["optim.lr=1e-4,2e-4"],
        account="acct",
        dry_run=True,
    )
    assert [r.train.optim.lr for r in runs] == [1e-4, 2e-4]
    shared = str(Path(runs[0].plan.run_dir).parent)
    assert shared.endswith("-array") and all(r.plan.edf == f"{shared}/env.toml" for r in runs)
    assert f"{shared}:{shared}" in runs[0].edf["mounts"]
    assert runs[0].train.training.output_dir != runs[1].train.training.output_dir


@pytest.mark.parametrize("bad", ["optim.lr", "optim.lr=", "=1,2", "job.nodes=1,2"])
def test_bad_array_specs(bad):
    from jobs.submit import parse_array

    with pytest.raises(UserError, match="--array"):
        parse_array([bad])


def test_an_explicit_output_dir_is_the_run_directory(tmp_path):
    mine = tmp_path / "my-run"
    run = prepare("smoke", "local", [f"training.output_dir={mine}", f"data.dataset={tmp_path}"], dry_run=True)
    assert run.plan.run_dir == str(mine) and run.train.training.output_dir == str(mine)
    assert run.plan.submitit_folder == f"{mine}/submitit"
    other = prepare(
        "smoke", "local", [f"job.output_root={tmp_path}", f"data.dataset={tmp_path}"], dry_run=True
    )
    assert Path(other.plan.run_dir).parent == tmp_path / "smoke"  # without it: a new directory per run
