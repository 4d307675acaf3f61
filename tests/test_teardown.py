"""Ending a multi-rank run leaves no communication thread behind to crash the exit."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import os
import lotus_dist
import torch
import torch.distributed as dist

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
dist.init_process_group("gloo", rank=0, world_size=1)
model = torch.nn.Linear(4, 4)
opt = lotus_dist.LotusAdamW(lotus_dist.lotus_param_groups(model, 2, target_modules=[""]))
model(torch.ones(2, 4)).sum().backward()
dist.all_reduce(model.weight.grad)
opt.step()
dist.destroy_process_group()
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print(sorted(names))
"""


def test_destroying_the_process_group_stops_gloo_threads_after_an_optimizer_was_built():
    """torch._dynamo, first imported by an optimizer after init_process_group, would keep
    the process group (and its worker threads) alive past destroy_process_group; a worker
    thread freeing a finished collective during interpreter shutdown aborts the process.
    ``import lotus_dist`` imports it first."""
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         check=True).stdout
    assert "gloo" not in out, out
