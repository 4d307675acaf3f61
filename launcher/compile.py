"""``training.compile``: torch.compile per transformer block, as torchtitan does.

Per block rather than the whole model: every block has the same code and shapes, so one
compiled graph serves them all (torch compiles once, however many layers) and the
compilation time does not grow with the depth. ``Module.compile()`` compiles in place,
without the ``OptimizedModule`` wrapper that ``torch.compile(module)`` returns: parameter
names, and with them init seeds, optimizer groups, per-layer hooks and checkpoint keys,
stay those of a bare ``Llama`` (no ``_orig_mod.``), so compiled and eager runs resume
from each other's checkpoints.

It is lazy (compilation happens at the first forward) and compiles the block's whole
call, hooks included, so activation checkpointing and FSDP2 (whose hooks dynamo runs
eagerly) may be applied before or after it: engines call ``maybe_compile`` once, on the
model they built, before wrapping it.
"""

from __future__ import annotations

import torch

from launcher.config import Config, ConfigError
from lotus_dist.model import Llama


def maybe_compile(model: Llama, cfg: Config) -> None:
    """Compile each of ``model``'s blocks in place when ``training.compile`` is set."""
    if not cfg.training.compile:
        return
    if not torch.cuda.is_available():  # then the run is on the CPU (launcher.distributed)
        require_cpp_compiler()
    for block in model.layers:
        block.compile()


def require_cpp_compiler() -> None:
    """Inductor builds C++ kernels for CPU tensors: fail at start-up, not at the first
    forward, where there is no compiler (asking inductor's own search: $CXX, else g++)."""
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        get_cpp_compiler()
    except InvalidCxxCompiler:
        raise ConfigError("training.compile=true on the CPU needs a C++ compiler for "
                          "inductor's kernels ($CXX, else g++): install g++ or set "
                          "training.compile=false") from None
