"""Profiling step hooks and the NVTX backend on CPU: torch.profiler window, summaries, NVTX switching."""

from __future__ import annotations

import json

import pytest

from lmtrain import nvtx
from lmtrain.config import ProfilingConfig
from lmtrain.hooks import StepHooks
from lmtrain.profiler import ProfilingHooks, build_step_hooks
from lmtrain.profiling.smoke import run


@pytest.fixture(autouse=True)
def _nvtx_off_afterwards():
    yield
    nvtx.disable()


def test_nothing_enabled_gives_base_hooks(tmp_path):
    hooks = build_step_hooks(ProfilingConfig(), tmp_path, "cpu")
    assert type(hooks) is StepHooks
    assert nvtx.nvtx_range("x") is nvtx.nvtx_range("y")  # the shared no-op: free when disabled


@pytest.mark.parametrize("backend", ["libnvtoolsext", "nvtx"])
def test_nvtx_backends_load_and_balance(backend):
    try:
        assert nvtx.enable(backend) == backend
    except RuntimeError as exc:
        if backend == "libnvtoolsext":
            pytest.skip(f"libnvToolsExt.so.1 is not installed (apt-get install libnvtoolsext1): {exc}")
        raise
    assert nvtx.enabled() and nvtx.backend() == backend
    with nvtx.nvtx_range("outer"):
        with nvtx.nvtx_range("inner"):
            pass
    nvtx.disable()
    assert not nvtx.enabled()


def test_unknown_nvtx_backend():
    with pytest.raises(ValueError, match="unknown NVTX backend"):
        nvtx.enable("roctx")


def test_nvtx_hooks_enable_ranges(tmp_path):
    hooks = build_step_hooks(ProfilingConfig(nvtx=True), tmp_path, "cpu")
    assert isinstance(hooks, ProfilingHooks) and hooks.nvtx_on and nvtx.enabled()
    hooks.on_step_start(1)
    with hooks.forward():
        pass
    hooks.close()  # closes the step range left open
    assert not hooks.step_open
    assert not (tmp_path / "torch_trace.json").exists()


@pytest.mark.slow
def test_torch_profile_window_on_cpu(tmp_path):
    run(4, tmp_path, torch_profile=True, window=(2, 3))
    trace = json.loads((tmp_path / "torch_trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"lmtrain/forward", "lmtrain/backward", "lmtrain/optimizer", "lmtrain/data_wait"} <= names
    summary = (tmp_path / "torch_profile.md").read_text()
    for phase in ("data-loader wait", "forward", "backward", "optimizer"):
        assert f"| {phase} | 2 |" in summary  # two steps in the window, one call each
    assert "aten::mm" in summary  # the top operators by self time


@pytest.mark.slow
def test_profile_on_cpu_drives_torch_profiler_and_close_ends_window(tmp_path):
    # profile=True on CPU: no CUDA capture range, the window runs torch.profiler instead. The run ends
    # (step 2) before the window's last step (5): close() must stop it and still write the outputs.
    run(2, tmp_path, profile=True, window=(2, 5))
    assert (tmp_path / "torch_trace.json").is_file()
    assert "| forward | 1 |" in (tmp_path / "torch_profile.md").read_text()


def test_window_outside_run_writes_nothing(tmp_path):
    hooks = build_step_hooks(ProfilingConfig(torch_profile=True, profile_step_start=10, profile_step_end=12),
                             tmp_path, "cpu")  # fmt: skip
    for step in (1, 2):
        hooks.on_step_start(step)
        with hooks.forward(), hooks.backward(), hooks.optimizer():
            pass
        hooks.on_step_end(step)
    hooks.close()
    assert not list(tmp_path.iterdir())
