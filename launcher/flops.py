"""Throughput per device and model FLOPs utilisation (MFU), for metrics rows and summary.json.

Model FLOPs per token are ``Llama.flops_per_token``: 6 N + 12 L d T, with N the parameters
but the input embedding, L layers, width d and sequence length T (PaLM, appendix B).
MFU divides the FLOP/s those imply by the device's dense bf16 peak, whatever
``training.dtype``, as PaLM and torchtitan report it; activation-checkpointing recompute
is not counted (that would be hardware FLOPs utilisation).
"""

from __future__ import annotations

from typing import Any

import torch

#: Dense (no sparsity) bf16 tensor-core peak in FLOP/s, from the vendors' datasheets, as
#: (fragment of ``torch.cuda.get_device_name``, peak); the first fragment found wins, so
#: variants come before their family ("H100 PCIe" before "H100", which is the SXM part).
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("B200", 2.25e15),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 125e12),
    ("RTX 4090", 165e12),
)


def peak_bf16_flops(device_name: str) -> float | None:
    """The table's peak for a CUDA device name; None for a device it does not list."""
    return next((peak for fragment, peak in PEAK_BF16_FLOPS if fragment in device_name), None)


def device_peak_flops(device: torch.device) -> float | None:
    """This device's dense bf16 peak; None on CPU and on unlisted GPUs, which then report
    no MFU rather than one against a guessed peak."""
    if device.type != "cuda":
        return None
    return peak_bf16_flops(torch.cuda.get_device_name(device))


def throughput(tokens_per_s: float, world_size: int, flops_per_token: float,
               peak_flops: float | None) -> dict[str, Any]:
    """``tokens_per_s`` (the whole job's) per device, the model TFLOP/s it implies per
    device, and MFU against ``peak_flops`` (omitted when the peak is unknown)."""
    per_device = tokens_per_s / world_size
    flops = flops_per_token * per_device
    out: dict[str, Any] = {"tokens_per_s_per_device": per_device,
                           "tflops_per_device": flops / 1e12}
    if peak_flops is not None:
        out["mfu"] = flops / peak_flops
    return out


def cuda_memory_bytes(device: torch.device) -> dict[str, int]:
    """The CUDA caching allocator's peaks since start: tensors allocated, and memory
    reserved from the driver (what an out-of-memory error is about). Empty off CUDA."""
    if device.type != "cuda":
        return {}
    return {"cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(device),
            "cuda_max_reserved_bytes": torch.cuda.max_memory_reserved(device)}
