"""``training.profile_steps``: a torch.profiler trace of optimizer steps N..M.

The window is in the run's step numbers, so a resumed run traces it only if it has not
passed it yet, and a rollback does not trace it twice. The trace goes to
``run_dir/profile/`` through ``tensorboard_trace_handler``, so ``tensorboard --logdir``
on the runs shows it beside the scalars (and Perfetto or chrome://tracing open the
``.pt.trace.json`` file). Each step is a ``ProfilerStep#<step>`` range named with the
run's step number (the name TensorBoard's profiler plugin splits steps by). Step N also
pays the profiler's warm-up, so trace a few steps.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function, tensorboard_trace_handler


class StepProfiler:
    """Starts torch.profiler before step ``first`` and writes the trace after ``last``.

    Args:
        window: (first, last) optimizer steps, inclusive; None profiles nothing.
        out_dir: where the trace file is written.
        rank: names the trace file (``rank{r}.<id>.pt.trace.json``).
        device: CUDA kernels are recorded too on a CUDA device.
    """

    def __init__(self, window: tuple[int, int] | None, out_dir: Path, rank: int,
                 device: torch.device) -> None:
        self.window, self.out_dir, self.rank, self.device = window, out_dir, rank, device
        self._profiler: profile | None = None
        self._step_range = contextlib.ExitStack()
        self._done = window is None

    def before_step(self, step: int) -> None:
        """Called before optimizer step ``step`` (counted from 1) runs."""
        if self._done or not self.window[0] <= step <= self.window[1]:
            return
        if self._profiler is None:
            activities = [ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            self._profiler = profile(
                activities=activities, record_shapes=True,
                on_trace_ready=tensorboard_trace_handler(str(self.out_dir),
                                                         worker_name=f"rank{self.rank}"))
            self._profiler.start()
        self._step_range.enter_context(record_function(f"ProfilerStep#{step}"))

    def after_step(self, step: int) -> None:
        """Called after optimizer step ``step``; the last step of the window ends it."""
        self._step_range.close()
        if self._profiler is not None and step >= self.window[1]:
            self.close()

    def close(self) -> None:
        """Write the trace of what was recorded (a run that stops inside the window
        still leaves one); later steps are not traced."""
        self._step_range.close()
        if self._profiler is not None:
            self._profiler.stop()
            self._profiler = None
        self._done = True
