"""Step hooks: the points of the training step that profilers and instrumentation attach to.

The training loop calls these unconditionally; the base class does nothing, so an uninstrumented run
pays one method call per hook. `lmtrain.profiler.build_step_hooks(...)` returns a subclass that opens NVTX
ranges, Nsight Systems capture ranges or a torch.profiler window.
"""

from __future__ import annotations

import contextlib

_NULL = contextlib.nullcontext()


class StepHooks:
    def on_step_start(self, step: int) -> None:
        """Before the data of `step` is fetched (steps count from 1)."""

    def on_step_end(self, step: int) -> None:
        """After the optimizer step of `step` (and its metrics) completed."""

    def forward(self):
        """Context manager around the forward pass(es) of a step."""
        return _NULL

    def backward(self):
        """Context manager around the backward pass(es) of a step."""
        return _NULL

    def optimizer(self):
        """Context manager around clipping and the optimizer step."""
        return _NULL

    def close(self) -> None:
        """End of training (also on error): stop whatever is still open."""
