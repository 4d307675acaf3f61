"""`lotus-train bench projector`: one rSVD refresh against one exact SVD refresh.

For LLaMA weight shapes at the paper's ranks, on matrices with a controlled singular
spectrum (sigma_i = i^-decay: 1.0 is gradient-like, 0.5 is flat and hard; ``--gap``
multiplies the values after the r-th so that the top-r subspace is well defined), it
reports the time of each refresh, rsvd/svd time ratio, the energy rSVD captures relative
to the exact top-r basis (||B^T G||_F^2 / ||U_r^T G||_F^2), the subspace error (sine of
the largest principal angle between the rSVD and the exact basis: 0 is the same
subspace, 1 means a direction was missed; without a gap at r it is large for any
method, since the top-r subspace itself is then ill-defined) and the peak workspace.

Each measurement runs in a fresh spawned process. After one warm-up refresh (library
buffers resident, as in training), the workspace of the next refresh is, on CPU, the peak
RSS (VmHWM, reset through /proc/self/clear_refs) above the resident set before it; on
CUDA, the allocator's peak above what was allocated before it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lotus_dist.projection import (
    project,
    projection_side,
    refresh_generator,
    rsvd_basis,
    subspace_error,
    svd_basis,
)

# (m, n, rank): 60m MLP, 1b attention, 1b MLP (paper ranks), 7b MLP
DEFAULT_SHAPES = "512x1376:128,2048x2048:512,2048x5461:512"
SHAPE_7B = "4096x11008:1024"


def _parse_shapes(text: str) -> list[tuple[int, int, int]]:
    out = []
    for item in text.split(","):
        dims, rank = item.split(":")
        m, n = dims.lower().split("x")
        out.append((int(m), int(n), int(rank)))
    return out


def spectrum_matrix(m: int, n: int, decay: float, seed: int = 0, rank: int | None = None,
                    gap: float = 1.0) -> torch.Tensor:
    """U diag(sigma) V^T with random orthonormal U (m x k) and V (n x k), k = min(m, n),
    sigma_i = i^-decay, and sigma_i multiplied by ``gap`` for i > ``rank``."""
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=gen)).Q
    sigmas = torch.arange(1, k + 1, dtype=torch.float32).pow(-decay)
    if rank is not None:
        sigmas[rank:] *= gap
    return (u * sigmas) @ v.T


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, the peak resident set size."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _measure(path: str, method: str, rank: int, power_iters: int, oversample: int,
             repeats: int, device: str) -> dict:
    """Runs in a spawned child: load the gradient, refresh ``repeats`` times."""
    grad = torch.load(path, mmap=False, weights_only=True).to(device)
    side = projection_side(grad.shape, "std")

    def refresh(i: int, g: torch.Tensor = grad, r: int = rank) -> torch.Tensor:
        if method == "svd":
            return svd_basis(g, r, side)
        return rsvd_basis(g, r, side, oversample=oversample, power_iters=power_iters,
                          generator=refresh_generator(0, 0, i))

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    # a first full-size refresh leaves BLAS/LAPACK buffers and allocator caches resident,
    # as in a training run; the workspace is what the next refresh needs on top of that
    refresh(0)
    sync()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        base = _rss_bytes()
    basis = refresh(0)
    sync()
    if device.startswith("cuda"):
        workspace = torch.cuda.max_memory_allocated() - base
    else:
        workspace = _peak_rss_bytes() - base
    times = []
    for i in range(repeats):
        sync()
        start = time.perf_counter()
        refresh(i + 1)
        sync()
        times.append(time.perf_counter() - start)
    energy = float(project(grad, basis, side).pow(2).sum())
    return {"seconds": statistics.median(times), "workspace_bytes": max(workspace, 0),
            "energy": energy, "basis": basis.cpu()}


def _run_in_child(*args) -> dict:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_measure, args)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lotus-train bench projector", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=DEFAULT_SHAPES,
                        help="comma-separated MxN:RANK (default: %(default)s)")
    parser.add_argument("--include-7b", action="store_true",
                        help=f"add {SHAPE_7B} (minutes of exact SVD on a small CPU)")
    parser.add_argument("--decays", default="1.0,0.5", help="spectrum exponents to test")
    parser.add_argument("--gap", type=float, default=1.0,
                        help="factor on the singular values after the r-th (1: no gap)")
    parser.add_argument("--power-iters", type=int, default=1)
    parser.add_argument("--oversample", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed refreshes (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    shapes = _parse_shapes(args.shapes + ("," + SHAPE_7B if args.include_7b else ""))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for m, n, rank in shapes:
            for decay in (float(d) for d in args.decays.split(",")):
                path = str(Path(tmp) / f"g{m}x{n}_{decay}.pt")
                torch.save(spectrum_matrix(m, n, decay, rank=rank, gap=args.gap), path)
                svd = _run_in_child(path, "svd", rank, 0, 0, max(1, args.repeats - 1),
                                    args.device)
                rsvd = _run_in_child(path, "rsvd", rank, args.power_iters, args.oversample,
                                     args.repeats, args.device)
                row = {"shape": f"{m}x{n}", "rank": rank, "decay": decay, "gap": args.gap,
                       "power_iters": args.power_iters, "oversample": args.oversample,
                       "svd_s": round(svd["seconds"], 4), "rsvd_s": round(rsvd["seconds"], 4),
                       "time_ratio": round(rsvd["seconds"] / svd["seconds"], 4),
                       "energy_ratio": round(rsvd["energy"] / svd["energy"], 5),
                       "subspace_error": round(subspace_error(rsvd["basis"], svd["basis"]), 5),
                       "svd_workspace_mb": round(svd["workspace_bytes"] / 2**20, 1),
                       "rsvd_workspace_mb": round(rsvd["workspace_bytes"] / 2**20, 1)}
                rows.append(row)
                print(f"{row['shape']:>11} r={rank:<5} decay={decay:<4} svd {row['svd_s']:8.3f}s "
                      f"rsvd {row['rsvd_s']:7.3f}s  ratio {row['time_ratio']:.3f}  "
                      f"energy {row['energy_ratio']:.4f}  subspace {row['subspace_error']:.4f}  "
                      f"workspace svd "
                      f"{row['svd_workspace_mb']:.0f} MB / rsvd {row['rsvd_workspace_mb']:.0f} MB",
                      flush=True)
    print(json.dumps({"bench": "projector", "device": args.device,
                      "threads": torch.get_num_threads(), "rows": rows}))
