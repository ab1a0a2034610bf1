"""Container environment files: the shipped ones are valid, EDFs in the form CSCS's documentation writes
them are read as the container engine reads them, every bad field is named, per-run rendering."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from jobs.edf import EdfError, check_edf, environment_path_warnings, read_edf, render_edf, write_edf

REPO = Path(__file__).resolve().parents[1]
COURSE = {"COURSE_STORE": "/capstor/store/cscs/ethz/large-sc-2"}
HOOKS = {"com.hooks.aws_ofi_nccl.enabled": "true", "com.hooks.aws_ofi_nccl.variant": "cuda12"}


def edf(tmp_path, text, name="e.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("name", ["ngc_pt_jan.toml", "ngc_pt_25_10.toml"])
def test_shipped_files_are_valid(name):
    warnings = check_edf(REPO / "toml_envs" / name, search=[], variables=COURSE)
    if not Path("/capstor").is_dir():  # away from CSCS the files there cannot be checked: one warning says so
        assert len(warnings) == 1 and "/capstor, /iopsstor, /users is not mounted on this host" in warnings[0]
    data = read_edf(REPO / "toml_envs" / name)
    assert data["writable"] is True and data["workdir"]
    assert data["annotations"] == HOOKS
    assert {"/capstor:/capstor", "/iopsstor:/iopsstor", "/users:/users"} <= set(data["mounts"])


def test_course_image_is_in_the_course_store_and_current_image():
    from jobs.spec import load_cluster

    jan = read_edf(REPO / "toml_envs/ngc_pt_jan.toml")
    assert jan["image"] == "${COURSE_STORE}/images/ngc_pt_jan.sqsh"
    rendered = render_edf(jan, "/iopsstor/r", "/users/a/lmtrain", {}, load_cluster("clariden").variables())
    assert rendered["image"] == "/capstor/store/cscs/ethz/large-sc-2/images/ngc_pt_jan.sqsh"
    cur = read_edf(REPO / "toml_envs/ngc_pt_25_10.toml")
    assert cur["image"] == "nvcr.io#nvidia/pytorch:25.10-py3"


# EDFs as CSCS's documentation (docs.cscs.ch, container engine) and clariden users write them: unquoted
# dotted annotation keys, the table form of the same, bare mount paths, registry images.
CSCS_DOCS_EDFS = {
    "nccl_tests": """image = "quay.io#ethcscs/nccl-tests:2.17.1-ompi5.0.8-ofi1.22-cuda12.8"

[env]
PMIX_MCA_psec="native"

[annotations]
com.hooks.aws_ofi_nccl.enabled = "true"
com.hooks.aws_ofi_nccl.variant = "cuda12"
""",
    "pytorch_home_edf": """image = "nvcr.io#nvidia/pytorch:25.01-py3"
mounts = ["/capstor", "/iopsstor", "/users"]
workdir = "/workspace"

[annotations]
com.hooks.aws_ofi_nccl.enabled = "true"
com.hooks.aws_ofi_nccl.variant = "cuda12"
""",
    "table_form": """image = "nvcr.io#nvidia/pytorch:25.01-py3"
mounts = ["/capstor", "/users"]
writable = true

[annotations.com.hooks.aws_ofi_nccl]
enabled = "true"
variant = "cuda12"

[env]
FI_CXI_DISABLE_HOST_REGISTER = "1"
FI_MR_CACHE_MONITOR = "userfaultfd"
NCCL_DEBUG = "INFO"
""",
}


@pytest.mark.parametrize("name", sorted(CSCS_DOCS_EDFS))
def test_edfs_in_the_form_of_cscs_docs_are_accepted_and_read_back_dotted(tmp_path, name):
    path = edf(tmp_path, CSCS_DOCS_EDFS[name])
    warnings = check_edf(path, search=[], variables={})
    assert all("no ':DST'" not in w for w in warnings)  # a bare path is the documented same-place mount
    data = read_edf(path)
    assert data["annotations"] == HOOKS
    out = render_edf(data, str(tmp_path / "run"), str(tmp_path / "checkout"), {"OMP_NUM_THREADS": "72"})
    written = tmp_path / "env.toml"
    write_edf(out, written)
    assert read_edf(written) == out  # the per-run file reads back to the same dotted names
    assert tomllib.loads(written.read_text())["annotations"] == HOOKS  # written quoted: one level
    (tmp_path / "run").mkdir()
    (tmp_path / "checkout").mkdir()
    check_edf(written, search=[], variables={})


def test_the_same_annotation_twice_is_named(tmp_path):
    text = '[annotations]\n"com.hooks.ssh.enabled" = "true"\ncom.hooks.ssh.enabled = "false"\n'
    with pytest.raises(EdfError, match="field 'annotations': 'com.hooks.ssh.enabled' is set twice"):
        check_edf(edf(tmp_path, text), search=[])


def test_dotted_env_names_are_named(tmp_path):
    with pytest.raises(
        EdfError, match="field 'env': 'A' is a table: environment variable names have no dots"
    ):
        check_edf(edf(tmp_path, 'image = "a:b"\n[env]\nA.B = "1"\n'), search=[])


def test_missing_image_and_mount_source_on_a_visible_file_system_fail(tmp_path):
    absent = tmp_path / "absent"
    with pytest.raises(EdfError, match=f"field 'image': image file {absent}/img.sqsh does not exist"):
        check_edf(edf(tmp_path, f'image = "{absent}/img.sqsh"\n'), search=[], variables={})
    with pytest.raises(
        EdfError, match=rf"field 'mounts': mount source {absent} does not exist \(\$\{{D\}}\)"
    ):
        check_edf(
            edf(tmp_path, 'image = "a:b"\nmounts = ["${D}:/data"]\n'), search=[], variables={"D": str(absent)}
        )
    absent.mkdir()
    (absent / "img.sqsh").write_bytes(b"hsqs")
    assert check_edf(edf(tmp_path, f'image = "{absent}/img.sqsh"\nmounts = ["{absent}"]\n'), search=[]) == []


def test_paths_on_a_file_system_this_host_cannot_see_only_warn(tmp_path):
    top = "/capstor-not-on-this-host"
    warnings = check_edf(
        edf(tmp_path, f'image = "{top}/img.sqsh"\nmounts = ["{top}/data:/data"]\n'), search=[], variables={}
    )
    assert warnings == [
        f"{(tmp_path / 'e.toml').resolve()}: {top} is not mounted on this host: the image and mount sources "
        "there are not checked (they are on the cluster)"
    ]
    # a variable only the job's environment has is left to the container engine
    assert (
        check_edf(
            edf(tmp_path, 'image = "a:b"\nmounts = ["${SCRATCH}:${SCRATCH}"]\n'), search=[], variables={}
        )
        == []
    )


def test_cli_check(tmp_path):
    ok = subprocess.run(
        [sys.executable, "-m", "jobs.edf", "check", "toml_envs/ngc_pt_jan.toml", "--cluster", "clariden"],
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
    edf(tmp_path, f'mounts = ["{tmp_path}:/x"]\n', "sibling.toml")
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
    base = read_edf(REPO / "toml_envs/ngc_pt_jan.toml")
    checkout = str(tmp_path)
    out = render_edf(base, "/iopsstor/scratch/a/run", checkout, {"OMP_NUM_THREADS": "72"}, COURSE)
    assert f"{checkout}:{checkout}" in out["mounts"]
    assert not any(m.startswith("/iopsstor/scratch/a/run") for m in out["mounts"])  # under /iopsstor already
    assert out["workdir"] == checkout
    assert out["env"]["OMP_NUM_THREADS"] == "72" and out["env"]["PYTHONPATH"] == checkout
    assert base["workdir"] != out["workdir"]  # the input is not modified
    path = tmp_path / "env.toml"
    write_edf(out, path)
    check_edf(path, search=[])
    assert read_edf(path) == out
