"""The compute dtype: fp32 for bf16, fp16 and fp32 tensors, fp64 for fp64 ones.

Mixed-precision runs keep their optimizer maths in fp32; ``training.dtype=fp64`` keeps
everything in fp64, where N ranks must equal 1 rank to rounding that cannot hide a real
difference.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype computations on ``t`` run in: at least fp32, fp64 for fp64 tensors."""
    return torch.promote_types(t.dtype, torch.float32)


def upcast(t: torch.Tensor) -> torch.Tensor:
    """``t`` in its compute dtype (no copy when it already is)."""
    return t.to(compute_dtype(t))


@contextlib.contextmanager
def no_autocast() -> Iterator[None]:
    """Autocast off on CUDA and CPU: optimizer maths must not be cast to bf16 because a
    caller stepped inside its forward's autocast region."""
    with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
        yield


def without_autocast(fn: F) -> F:
    """Run ``fn`` with autocast off (``no_autocast``)."""
    @functools.wraps(fn)
    def inner(*args, **kwargs):
        with no_autocast():
            return fn(*args, **kwargs)
    return inner  # type: ignore[return-value]
