"""Container environment files: the shipped ones are valid, every bad field is named, per-run rendering."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from jobs.edf import EdfError, check_edf, environment_path_warnings, render_edf, write_edf

REPO = Path(__file__).resolve().parents[1]


def edf(tmp_path, text, name="e.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("name", ["ngc_pt_jan.toml", "ngc_pt_25_10.toml"])
def test_shipped_files_are_valid(name):
    assert check_edf(REPO / "toml_envs" / name, search=[]) == []
    data = tomllib.loads((REPO / "toml_envs" / name).read_text())
    assert data["writable"] is True and data["workdir"]
    assert data["annotations"] == {
        "com.hooks.aws_ofi_nccl.enabled": "true",
        "com.hooks.aws_ofi_nccl.variant": "cuda12",
    }
    assert {"/capstor:/capstor", "/iopsstor:/iopsstor", "/users:/users"} <= set(data["mounts"])


def test_course_image_and_current_image():
    jan = tomllib.loads((REPO / "toml_envs/ngc_pt_jan.toml").read_text())
    assert jan["image"].endswith("ngc_pt_jan.sqsh") and jan["image"].startswith("/capstor/")
    cur = tomllib.loads((REPO / "toml_envs/ngc_pt_25_10.toml").read_text())
    assert cur["image"] == "nvcr.io#nvidia/pytorch:25.10-py3"


def test_cli_check(tmp_path):
    ok = subprocess.run(
        [sys.executable, "-m", "jobs.edf", "check", "toml_envs/ngc_pt_jan.toml"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and "valid" in ok.stdout
    bad = edf(tmp_path, "image = 3\n")
    out = subprocess.run(
        [sys.executable, "-m", "jobs.edf", "check", str(bad)], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 2 and "field 'image'" in out.stderr


@pytest.mark.parametrize(
    "text, field",
    [
        ("image = 3\n", "image"),
        ('image = "relative/img.sqsh"\n', "image"),
        ('image = "not an image!"\n', "image"),
        ('image = "a:b"\nwritable = "true"\n', "writable"),
        ('image = "a:b"\nentrypoint = 1\n', "entrypoint"),
        ('image = "a:b"\nworkdir = "relative"\n', "workdir"),
        ('image = "a:b"\nmounts = "/capstor:/capstor"\n', "mounts"),
        ('image = "a:b"\nmounts = ["capstor:/capstor"]\n', "mounts"),
        ('image = "a:b"\nmounts = ["/a:/b:bogus"]\n', "mounts"),
        ('image = "a:b"\n[env]\nN = 1\n', "env"),
        ('image = "a:b"\nenv = "x"\n', "env"),
        ('image = "a:b"\n[annotations]\n"com.hooks.aws_ofi_nccl.enabled" = true\n', "annotations"),
        ('image = "a:b"\nbase_environment = 3\n', "base_environment"),
        ('image = "a:b"\nbase_environment = "missing-env"\n', "base_environment"),
    ],
)
def test_bad_fields_are_named(tmp_path, text, field):
    with pytest.raises(EdfError, match=f"field '{field}'"):
        check_edf(edf(tmp_path, text), search=[tmp_path / "edfdir"])


def test_unknown_field_and_bad_toml(tmp_path):
    with pytest.raises(EdfError, match=r"unknown field\(s\) imagee; valid fields: base_environment, image"):
        check_edf(edf(tmp_path, 'imagee = "x"\n'), search=[])
    with pytest.raises(EdfError, match="not valid TOML"):
        check_edf(edf(tmp_path, "image = \n"), search=[])
    with pytest.raises(EdfError, match="not found"):
        check_edf(tmp_path / "absent.toml", search=[])


def test_base_environment_resolves_beside_and_in_dot_edf(tmp_path):
    home_edf = tmp_path / "home" / ".edf"
    home_edf.mkdir(parents=True)
    (home_edf / "pytorch.toml").write_text('image = "nvcr.io#nvidia/pytorch:25.10-py3"\n')
    edf(tmp_path, 'mounts = ["/x:/x"]\n', "sibling.toml")
    child = edf(tmp_path, 'base_environment = ["pytorch", "sibling.toml"]\nworkdir = "/x"\n')
    assert check_edf(child, search=[home_edf]) == []
    broken = edf(home_edf, "writable = 2\n", "broken.toml")
    assert broken.is_file()
    with pytest.raises(EdfError, match=r"broken.toml: field 'writable'"):
        check_edf(edf(tmp_path, 'base_environment = "broken"\n', "c2.toml"), search=[home_edf])
    cyc = edf(tmp_path, 'base_environment = "cyc.toml"\n', "cyc.toml")
    with pytest.raises(EdfError, match="cycle"):
        check_edf(cyc, search=[])


def test_user_placeholders_in_the_environment_path_warn():
    assert environment_path_warnings("/users/%u/env.toml")
    assert environment_path_warnings("/users/$USER/env.toml")
    assert environment_path_warnings("/users/alice/env.toml") == []


def test_render_mounts_run_dir_and_sets_env(tmp_path):
    base = tomllib.loads((REPO / "toml_envs/ngc_pt_jan.toml").read_text())
    out = render_edf(base, "/iopsstor/scratch/a/run", "/home/alice/lmtrain", {"OMP_NUM_THREADS": "72"})
    assert "/home/alice/lmtrain:/home/alice/lmtrain" in out["mounts"]
    assert not any(m.startswith("/iopsstor/scratch/a/run") for m in out["mounts"])  # under /iopsstor already
    assert out["workdir"] == "/home/alice/lmtrain"
    assert out["env"]["OMP_NUM_THREADS"] == "72" and out["env"]["PYTHONPATH"] == "/home/alice/lmtrain"
    assert base["workdir"] != out["workdir"]  # the input is not modified
    path = tmp_path / "env.toml"
    write_edf(out, path)
    assert check_edf(path, search=[]) == []
    assert tomllib.loads(path.read_text()) == out
