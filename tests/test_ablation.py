"""jobs/ablation.py: the study's plan (seven configs, one switch each), resumability, bad input.

.venv/bin/python -m pytest tests/test_ablation.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from jobs import ablation
from lmtrain.config import config_from_dict, load_config
from lmtrain.errors import UserError

SWITCH_KEYS = ["model.norm", "model.mlp", "model.pos", "schedule.name", "schedule.warmup_steps"]


def flat(cfg: dict) -> dict:
    return {f"{s}.{k}": v for s, fields in cfg.items() for k, v in fields.items()}


def default_plan(tmp_path, **kw):
    return ablation.plan(ablation.load_study(ablation.DEFAULT_STUDY), tmp_path / "study", **kw)


def test_default_study_is_seven_runs_each_one_switch_from_the_baseline(tmp_path):
    runs = default_plan(tmp_path, steps=200)
    assert [r.variant for r in runs] == ["baseline", "swiglu", "rope", "warmup", "cosine", "rmsnorm", "all"]
    base = flat(runs[0].config)
    assert [base[k] for k in SWITCH_KEYS] == ["layernorm", "gelu", "learned", "constant", 0]
    expected = {
        "swiglu": {"model.mlp": "swiglu"},
        "rope": {"model.pos": "rope"},
        "warmup": {"schedule.warmup_steps": 20},  # 10% of 200 steps
        "cosine": {"schedule.name": "cosine"},
        "rmsnorm": {"model.norm": "rmsnorm"},
    }
    ignored = {"training.name", "training.output_dir"}
    for run in runs[1:]:
        cfg = flat(run.config)
        diff = {k: cfg[k] for k in cfg if cfg[k] != base[k] and k not in ignored}
        if run.variant == "all":
            assert diff == {k: v for d in expected.values() for k, v in d.items()}
        else:
            assert diff == expected[run.variant]
    # everything else is equal: data, steps, seed, model preset
    for run in runs:
        cfg = flat(run.config)
        assert cfg["training.steps"] == 200 and cfg["training.seed"] == 0
        assert cfg["model.preset"] == "ablation-small" and cfg["data.dataset"] == "data/stdlib-bytes"
        assert run.run_dir == tmp_path / "study" / f"{run.variant}-seed0"


def test_each_run_is_reproducible_from_its_command_line(tmp_path):
    """The printed command (base config + flags) resolves to exactly the planned config."""
    from lmtrain.config import parse_args

    for run in default_plan(tmp_path, steps=50):
        cmd = run.command("python")
        assert cmd[:5] == ["python", "-m", "lmtrain.train", "--config", str(run.config_path)]
        cfg, _ = parse_args(cmd[3:])
        assert flat(ablation.config_to_dict(cfg)) == flat(run.config)
        switch_flags = [f for f in run.flags if f.split("=")[0][2:] in SWITCH_KEYS]
        assert len(switch_flags) == {"baseline": 0, "all": 5}.get(run.variant, 1)


def test_seeds_repeat_the_study_and_variants_select(tmp_path):
    runs = default_plan(tmp_path, steps=10, n_seeds=2)
    assert len(runs) == 14 and {r.seed for r in runs} == {0, 1}
    assert len({r.run_dir for r in runs}) == 14
    sub = default_plan(tmp_path, steps=10, variants=["baseline", "rope"])
    assert [r.name for r in sub] == ["baseline-seed0", "rope-seed0"]


def test_extra_overrides_apply_to_every_run(tmp_path):
    runs = default_plan(tmp_path, steps=10, overrides=ablation.parse_overrides(["--model.dim=64"]))
    assert {r.config["model"]["dim"] for r in runs} == {64}


def test_finished_runs_are_skipped_and_foreign_runs_refused(tmp_path):
    runs = default_plan(tmp_path, steps=10, variants=["baseline"])
    run = runs[0]
    assert not run.done
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "summary.json").write_text("{}")
    (run.run_dir / "config.yaml").write_text(yaml.safe_dump(run.config))
    assert run.done
    ablation.check_existing(runs)  # same config: fine
    (run.run_dir / "summary.json").write_text('{"exit_reason": "signal"}')  # stopped for a requeue
    assert not run.done
    (run.run_dir / "summary.json").write_text('{"exit_reason": "completed"}')
    assert run.done
    ablation.run_local(runs, tmp_path / "logs", log=lambda msg: None)  # nothing to train
    assert not (tmp_path / "logs" / "baseline-seed0.log").exists()
    other = default_plan(tmp_path, steps=20, variants=["baseline"])
    with pytest.raises(UserError, match=r"another config \(training.steps differ\).*--out"):
        ablation.check_existing(other)


def test_plan_json_records_commands_atomically(tmp_path):
    study = ablation.load_study(ablation.DEFAULT_STUDY)
    runs = ablation.plan(study, tmp_path, steps=10)
    path = ablation.write_plan(runs, tmp_path, study)
    data = json.loads(path.read_text())
    assert [r["name"] for r in data["runs"]] == [r.name for r in runs]
    assert not list(tmp_path.glob("*.tmp"))


def test_study_yaml_and_base_config_are_valid_training_configs():
    base = load_config(ablation.DEFAULT_STUDY.parent / "base.yaml")
    assert (base.model.norm, base.model.mlp, base.model.pos) == ("layernorm", "gelu", "learned")
    assert (base.schedule.name, base.schedule.warmup_steps) == ("constant", 0)


def write_study(tmp_path: Path, **changes) -> Path:
    (tmp_path / "base.yaml").write_text(
        yaml.safe_dump({"training": {"steps": 10}, "model": {"preset": "tiny"}})
    )
    data = {
        "name": "t",
        "config": "base.yaml",
        "seeds": [0, 1],
        "variants": {"baseline": {}, "swiglu": {"model.mlp": "swiglu"}},
    }
    data.update(changes)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"config": "nope.yaml"}, r"`config` names .*nope.yaml, which does not exist"),
        ({"seeds": []}, "`seeds` must be a non-empty list"),
        ({"seeds": [1, 1]}, "duplicates"),
        ({"name": "a b"}, "`name` must be a word"),
        ({"colour": 1}, r"unknown keys \['colour'\]"),
        ({"variants": {"all": ["swiglu"]}}, "combines 'swiglu', which is not a variant defined above"),
        ({"variants": {"x": {"mlp": "gelu"}}}, "must be a dotted key"),
        ({"variants": {"x": 3}}, "must be a mapping of overrides or a list"),
        (
            {"variants": {"a": {"model.mlp": "gelu"}, "b": {"model.mlp": "swiglu"}, "c": ["a", "b"]}},
            "disagree",
        ),
    ],
)
def test_bad_study_file(tmp_path, changes, message):
    with pytest.raises(UserError, match=message):
        ablation.load_study(write_study(tmp_path, **changes))


def test_missing_and_malformed_study_file(tmp_path):
    with pytest.raises(UserError, match="--study: study file not found"):
        ablation.load_study(tmp_path / "missing.yaml")
    (tmp_path / "s.yaml").write_text("name: [\n")
    with pytest.raises(UserError, match="YAML syntax error"):
        ablation.load_study(tmp_path / "s.yaml")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seeds", "3"], "--seeds must be between 1 and 2"),
        (["--seeds", "0"], "--seeds must be between 1 and 2"),
        (["--variants", "baseline,gelu"], r"--variants: unknown \['gelu'\]"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--parallel", "0"], "--parallel must be >= 1"),
        (["--model.mlp=gelu"], "would change the switch that variant 'swiglu' tests"),
        (["--model.dimm=3"], "unknown key 'model.dimm'"),
        (["--model.norm=batchnorm"], "model.norm = 'batchnorm' is not a valid rmsnorm | layernorm"),
        (["stray"], "unexpected argument 'stray'"),
    ],
)
def test_bad_command_line(tmp_path, argv, message):
    study = write_study(tmp_path)
    with pytest.raises(UserError, match=message):
        ablation.main(["--study", str(study), "--out", str(tmp_path / "o"), "--dry-run", *argv])


def test_bad_percentage_in_study(tmp_path):
    study = write_study(tmp_path, variants={"baseline": {}, "w": {"schedule.warmup_steps": "ten%"}})
    with pytest.raises(UserError, match="not a percentage"):
        ablation.plan(ablation.load_study(study), tmp_path / "o")


def test_dry_run_prints_one_command_per_run(tmp_path, capsys):
    study = write_study(tmp_path)
    assert (
        ablation.main(["--study", str(study), "--out", str(tmp_path / "o"), "--dry-run", "--seeds", "2"]) == 0
    )
    out = capsys.readouterr().out
    assert out.count("-m lmtrain.train --config") == 4
    assert "--model.mlp=swiglu" in out and "--training.seed=1" in out
    cfg = config_from_dict(yaml.safe_load((tmp_path / "base.yaml").read_text()))
    assert cfg.training.steps == 10


# --------------------------------------------------------------------------------------------------
# The architecture study and variants from the command line
# --------------------------------------------------------------------------------------------------

ARCHITECTURE_SWITCHES = {
    "no_norm": {"model.norm": "none"},
    "post_norm": {"model.norm_position": "post"},
    "nope": {"model.pos": "none"},
    "silu": {"model.mlp": "silu"},
    "gelu": {"model.mlp": "gelu"},
    "gelu_exact": {"model.mlp": "gelu_exact"},
    "parallel": {"model.parallel_block": True},
    "dropout": {"model.dropout": 0.1},
    "wide_ffn": {"model.d_ff": 256},
}


def test_architecture_study_changes_one_switch_of_a_llama_baseline(tmp_path):
    study = ablation.load_study("architecture")
    assert study.config.name == "llama-base.yaml"
    runs = ablation.plan(study, tmp_path, steps=20)
    assert [r.variant for r in runs] == ["baseline", *ARCHITECTURE_SWITCHES]
    base = flat(runs[0].config)
    llama = ("rmsnorm", "swiglu", "rope", None, None, None, None)
    keys = ("norm", "mlp", "pos", "norm_position", "parallel_block", "dropout", "d_ff")
    assert tuple(base[f"model.{k}"] for k in keys) == llama
    ignored = {"training.name", "training.output_dir"}
    for run in runs[1:]:
        cfg = flat(run.config)
        diff = {k: cfg[k] for k in cfg if cfg[k] != base[k] and k not in ignored}
        assert diff == ARCHITECTURE_SWITCHES[run.variant]


def test_architecture_experiment_is_a_valid_launcher_experiment():
    from jobs.spec import load_experiment

    exp = load_experiment(str(ablation.STUDY_DIR / "llama-experiment.yaml"))
    assert (exp.train.model.norm, exp.train.model.mlp, exp.train.model.pos) == ("rmsnorm", "swiglu", "rope")


@pytest.mark.parametrize(
    "spec, name, overrides",
    [
        ("nope:model.pos=none", "nope", {"model.pos": "none"}),
        ("model.pos=none", "pos_none", {"model.pos": "none"}),
        (
            "model.norm_position=post,model.dropout=0.1",
            "norm_position_post_dropout_0_1",
            {"model.norm_position": "post", "model.dropout": "0.1"},
        ),
        ("tok:data.tokenizer=C:/tok.json", "tok", {"data.tokenizer": "C:/tok.json"}),
    ],
)
def test_parse_variant(spec, name, overrides):
    assert ablation.parse_variant(spec) == (name, overrides)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nope", r"'nope' is not section.field=value"),
        ("x:model.pos", r"'model.pos' is not section.field=value"),
        ("no pe:model.pos=none", "must be letters, digits and '_'"),
        ("swiglu:model.mlp=silu", "already defines a variant 'swiglu'"),
    ],
)
def test_bad_variant_on_the_command_line(tmp_path, spec, message):
    study = write_study(tmp_path)
    with pytest.raises(UserError, match=message):
        ablation.main(["--study", str(study), "--out", str(tmp_path / "o"), "--dry-run", "--variant", spec])


def test_dataset_tokenizer_and_variants_from_the_command_line(tmp_path, capsys):
    data = tmp_path / "mine.jsonl"
    data.write_text('{"text": "def f():\\n    return 1\\n"}\n')
    argv = ["--study", str(write_study(tmp_path)), "--out", str(tmp_path / "o"), "--dry-run"]
    argv += ["--dataset", str(data), "--tokenizer", "byte", "--variant", "nope:model.pos=none"]
    argv += ["--variant", "model.norm=none"]
    assert ablation.main(argv) == 0
    commands = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert len(commands) == 3  # the baseline and the two new variants; not the study's swiglu
    assert all(f"--data.dataset={data}" in c and "--data.tokenizer=byte" in c for c in commands)
    assert "--model.pos=none" in commands[1] and "--model.norm=none" in commands[2]
    assert "norm_none-seed0" in commands[2]
    # --variants still picks: here a study variant beside a new one
    assert ablation.main([*argv, "--variants", "swiglu,nope"]) == 0
    assert capsys.readouterr().out.count("-m lmtrain.train") == 2


def test_missing_dataset_is_a_user_error(tmp_path):
    argv = ["--study", str(write_study(tmp_path)), "--dry-run", "--dataset", str(tmp_path / "nothing")]
    with pytest.raises(UserError, match="--dataset .*nothing: no such file or directory"):
        ablation.main(argv)
