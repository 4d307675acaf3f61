"""`lotus-train bench optimizer`: optimizer-step time against the number of matrices.

A 7B model has 224 projected matrices; an optimizer that loops over them in Python pays a
few kernel launches per matrix and operation, and on a GPU those launches, not the FLOPs,
set the step time. Small matrices on the CPU are the proxy: the arithmetic is negligible
and what is left is per-tensor overhead. For each matrix count this times
``LotusAdamW.step()`` (projection, switch statistics, Adam on R, update; no refresh) with
the per-tensor loop (``foreach=False``) and with foreach kernels (``foreach=True``) in the
same run, and reports the ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Iterator

import torch

from lotus_dist import LotusAdamW


def _optimizer(count: int, shape: tuple[int, int], rank: int, foreach: bool,
               verify_gap: int = 10**6) -> tuple[LotusAdamW, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(*shape, generator=gen)) for _ in range(count)]
    norms = [torch.nn.Parameter(torch.ones(shape[0])) for _ in range(count)]
    groups = [{"params": weights, "rank": rank, "switch": "displacement",
               "verify_gap": verify_gap, "update_proj_gap": 10**6, "gamma": 1e-9},
              {"params": norms}]
    opt = LotusAdamW(groups, lr=1e-3, weight_decay=0.01, foreach=foreach)
    params = weights + norms
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()  # the first step draws the bases; the timed ones do not refresh
    return opt, params


@contextlib.contextmanager
def count_host_syncs() -> Iterator[list[int]]:
    """Count the device-to-host copies of tensor values (``item``, ``tolist``, ``float``,
    ``int``, ``bool``): each one waits for the GPU to drain its queue. On the CPU they
    cost nothing, which makes counting them the way to see what a GPU step would wait
    for. Yields a one-element list holding the count."""
    names = ("item", "tolist", "__float__", "__int__", "__bool__")
    saved = {name: getattr(torch.Tensor, name) for name in names}
    count = [0]

    def counting(method):
        def wrapper(self, *args, **kwargs):
            count[0] += 1
            return method(self, *args, **kwargs)
        return wrapper

    for name, method in saved.items():
        setattr(torch.Tensor, name, counting(method))
    try:
        yield count
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def syncs_per_check_step(count: int, shape: tuple[int, int], rank: int) -> int:
    """Host syncs of one ``step()`` on which every matrix checks its switch (the
    displacement policy's verify step, where all 224 of a 7B model check together)."""
    opt, _ = _optimizer(count, shape, rank, foreach=True, verify_gap=2)
    with count_host_syncs() as syncs:
        opt.step()  # step 2 of each basis: a verify step
    return syncs[0]


def time_steps(count: int, shape: tuple[int, int], rank: int,
               steps: int) -> tuple[float, float]:
    """Median seconds of one ``step()`` with the loop and with foreach kernels, stepping
    the two optimizers alternately so that load on the machine hits both alike."""
    loop, _ = _optimizer(count, shape, rank, foreach=False)
    fused, _ = _optimizer(count, shape, rank, foreach=True)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(steps):
        for foreach, opt in ((False, loop), (True, fused)):
            start = time.perf_counter()
            opt.step()
            times[foreach].append(time.perf_counter() - start)
    return tuple(sorted(t)[len(t) // 2] for t in (times[False], times[True]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lotus-train bench optimizer", description=__doc__)
    parser.add_argument("--counts", default="28,112,224",
                        help="numbers of projected matrices (tiny has 28, 7b 224)")
    parser.add_argument("--shape", default="64x32", help="matrix shape MxN")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = tuple(int(x) for x in args.shape.lower().split("x"))
    rows = []
    print(f"{'matrices':>8} {'loop ms':>9} {'foreach ms':>11} {'loop/foreach':>13} "
          f"{'foreach us/matrix':>18} {'syncs/check step':>17}")
    for count in (int(c) for c in args.counts.split(",")):
        loop, fused = time_steps(count, shape, args.rank, args.steps)
        syncs = syncs_per_check_step(count, shape, args.rank)
        rows.append({"matrices": count, "loop_s": loop, "foreach_s": fused,
                     "speedup": loop / fused, "host_syncs_per_check_step": syncs})
        print(f"{count:>8} {loop * 1e3:>9.2f} {fused * 1e3:>11.2f} {loop / fused:>13.2f} "
              f"{fused / count * 1e6:>18.1f} {syncs:>17}")
    print(json.dumps({"bench": "optimizer", "shape": list(shape), "rank": args.rank,
                      "threads": args.threads, "rows": rows}))
