"""The compute dtype: fp32 for bf16, fp16 and fp32 tensors, fp64 for fp64 ones.

Mixed-precision runs keep their optimizer maths in fp32; ``training.dtype=fp64`` keeps
everything in fp64, where N ranks must equal 1 rank to rounding that cannot hide a real
difference.
"""

from __future__ import annotations

import torch


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype computations on ``t`` run in: at least fp32, fp64 for fp64 tensors."""
    return torch.promote_types(t.dtype, torch.float32)


def upcast(t: torch.Tensor) -> torch.Tensor:
    """``t`` in its compute dtype (no copy when it already is)."""
    return t.to(compute_dtype(t))
