"""The configuration system: precedence, `base:` inheritance, errors, round trip, course flags."""

from __future__ import annotations

import pytest

from lmtrain.config import (
    COURSE_FLAGS,
    ConfigError,
    TrainConfig,
    build_parser,
    config_from_dict,
    field_docs,
    load_config,
    parse_args,
    save_config,
    sections,
)


def write(path, text):
    path.write_text(text)
    return path


def test_precedence_defaults_then_yaml_then_command_line(tmp_path):
    cfg_file = write(
        tmp_path / "a.yaml", "optim:\n  lr: 3.0e-4\n  weight_decay: 0.05\ntraining:\n  steps: 50\n"
    )
    cfg, _ = parse_args(["--config", str(cfg_file), "--learning-rate", "1e-3"])
    assert cfg.optim.lr == 1e-3  # command line beats YAML
    assert cfg.optim.weight_decay == 0.05  # YAML beats default
    assert cfg.training.steps == 50
    assert cfg.optim.beta2 == TrainConfig().optim.beta2  # default where nobody sets it


def test_dotted_override_both_spellings(tmp_path):
    cfg, _ = parse_args(["--optim.weight_decay=0.2", "--training.steps", "7"])
    assert cfg.optim.weight_decay == 0.2
    assert cfg.training.steps == 7


@pytest.mark.parametrize(
    "flag,value,key,expected",
    [
        ("--dataset", "/capstor/train.parquet", "data.dataset", "/capstor/train.parquet"),
        ("--tokenizer-name-or-path", "byte", "data.tokenizer", "byte"),
        ("--sequence-length", "2048", "data.sequence_length", 2048),
        ("--batch-size", "4", "data.batch_size", 4),
        ("--fused-optimizer", None, "optim.fused", True),
        ("--learning-rate", "5e-5", "optim.lr", 5e-5),
        ("--lr-warmup-steps", "100", "schedule.warmup_steps", 100),
        ("--training-steps", "1000", "training.steps", 1000),
        ("--logging-frequency", "10", "logging.frequency", 10),
        ("--profile", None, "profiling.profile", True),
        ("--profile-step-start", "3", "profiling.profile_step_start", 3),
        ("--profile-step-end", "30", "profiling.profile_step_end", 30),
        ("--grad-max-norm", "0.5", "optim.grad_max_norm", 0.5),
        ("--model-dtype", "fp32", "precision.model_dtype", "fp32"),
        ("--compile", None, "training.compile", True),
    ],
)
def test_each_course_flag_lands_on_its_field(flag, value, key, expected):
    argv = [flag] if value is None else [flag, value]
    cfg, _ = parse_args(argv)
    section, name = key.split(".")
    assert getattr(getattr(cfg, section), name) == expected
    assert COURSE_FLAGS[flag] == key


def test_every_course_flag_is_covered_by_the_parametrized_test():
    assert len(COURSE_FLAGS) == 15


def test_base_inheritance_and_override(tmp_path):
    write(tmp_path / "base.yaml", "optim:\n  lr: 1.0e-3\n  fused: true\ndata:\n  batch_size: 8\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\noptim:\n  lr: 2.0e-3\n")
    cfg = load_config(child)
    assert cfg.optim.lr == 2e-3
    assert cfg.optim.fused is True
    assert cfg.data.batch_size == 8


def test_base_chain_of_three(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "root.yaml", "training:\n  steps: 11\n  seed: 3\n")
    write(tmp_path / "sub" / "mid.yaml", "base: ../root.yaml\ntraining:\n  steps: 22\n")
    leaf = write(tmp_path / "sub" / "leaf.yaml", "base: mid.yaml\ntraining:\n  seed: 9\n")
    cfg = load_config(leaf)
    assert (cfg.training.steps, cfg.training.seed) == (22, 9)


def test_base_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_unknown_key_suggests_the_closest(tmp_path):
    bad = write(tmp_path / "bad.yaml", "optim:\n  weight_decy: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*unknown key 'optim.weight_decy'.*optim.weight_decay"):
        load_config(bad)


def test_unknown_section_suggests_the_closest():
    with pytest.raises(ConfigError, match="unknown section 'optimizer'.*'optim'"):
        config_from_dict({"optimizer": {"lr": 1.0}})


def test_unknown_flag_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown flag '--learning-rat'.*--learning-rate"):
        parse_args(["--learning-rat", "1e-3"])
    with pytest.raises(ConfigError, match=r"unknown flag '--optim.weight_decy'.*--optim.weight_decay"):
        parse_args(["--optim.weight_decy=0.1"])


def test_type_error_names_field_value_and_type(tmp_path):
    bad = write(tmp_path / "t.yaml", "data:\n  batch_size: many\n")
    with pytest.raises(ConfigError, match=r"t.yaml: data.batch_size = 'many' is not a valid int"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"optim.lr = 'fast' is not a valid float"):
        parse_args(["--learning-rate", "fast"])
    with pytest.raises(ConfigError, match=r"precision.model_dtype = 'fp8' is not one of: fp32, bf16, fp16"):
        parse_args(["--model-dtype", "fp8"])
    with pytest.raises(ConfigError, match=r"optim.fused = 'maybe' is not a valid bool"):
        parse_args(["--optim.fused=maybe"])


def test_value_validation_names_the_field():
    with pytest.raises(ConfigError, match=r"data.sequence_length must be >= 2, got 1"):
        parse_args(["--sequence-length", "1"])
    with pytest.raises(ConfigError, match="profile_step_end"):
        parse_args(["--profile-step-start", "12", "--profile-step-end", "3"])


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = write(tmp_path / "broken.yaml", "optim:\n  lr: 1.0\n  betas: [0.9, 0.95\ntraining:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:\d+:\d+: YAML syntax error"):
        load_config(bad)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        parse_args(["--config", str(tmp_path / "nope.yaml")])


def test_saved_config_round_trips(tmp_path):
    cfg, _ = parse_args(
        ["--learning-rate", "5e-5", "--model.preset", "tiny", "--model.dim=128", "--optim.fused"]
    )
    save_config(cfg, tmp_path / "config.yaml")
    again, _ = parse_args(["--config", str(tmp_path / "config.yaml")])
    assert again == cfg
    assert not (tmp_path / "config.yaml.tmp").exists()


def test_help_documents_every_field_from_its_docstring(capsys):
    help_text = build_parser().format_help()
    for section, cls in sections().items():
        docs = field_docs(cls)
        for name, doc in docs.items():
            assert f"--{section}.{name}" in help_text
            # argparse rewraps text: compare the first few words of each docstring
            first_words = " ".join(doc.split()[:3])
            assert first_words in " ".join(help_text.split()), (section, name)
        import dataclasses

        assert set(docs) == {f.name for f in dataclasses.fields(cls)}, (
            f"{section} has a field without a docstring"
        )


def test_optional_field_accepts_null_and_values():
    cfg, _ = parse_args(["--model.dim=null", "--model.ffn_dim_multiplier=1.3", "--model.norm=layernorm"])
    assert cfg.model.dim is None
    assert cfg.model.ffn_dim_multiplier == 1.3
    assert cfg.model.norm == "layernorm"
