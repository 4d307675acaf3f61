"""Only the comm layer calls torch.distributed collectives.

A collective called from anywhere else creates its own tensors (on the CPU, say, where
NCCL rejects them) and hides a rank-synchronising call from the code that must make
every rank reach it. The layer is ``lotus_dist.comm`` with the comms of
``lotus_dist.ddp`` and ``lotus_dist.fsdp``, and ``launcher.distributed``.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMM_LAYER = {"lotus_dist/comm.py", "lotus_dist/ddp.py", "lotus_dist/fsdp.py",
              "launcher/distributed.py"}
COLLECTIVES = ("all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_object",
               "all_gather_into_tensor", "broadcast", "broadcast_object_list", "reduce",
               "reduce_scatter", "reduce_scatter_tensor", "barrier", "monitored_barrier",
               "gather", "gather_object", "scatter", "scatter_object_list", "all_to_all",
               "all_to_all_single", "send", "recv", "isend", "irecv", "new_group")
CALL = re.compile(r"\b(?:dist|torch\.distributed|distributed_c10d)\.(" +
                  "|".join(COLLECTIVES) + r")\(")


def collective_calls_outside_the_comm_layer(root: Path) -> list[str]:
    found = []
    for path in sorted([*root.glob("lotus_dist/**/*.py"), *root.glob("launcher/**/*.py")]):
        rel = path.relative_to(root).as_posix()
        if rel in COMM_LAYER:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if CALL.search(line.split("#")[0]):
                found.append(f"{rel}:{n}: {line.strip()}")
    return found


def test_only_the_comm_layer_calls_collectives():
    assert collective_calls_outside_the_comm_layer(REPO) == []


def test_the_scan_finds_a_collective_where_one_is_called(tmp_path):
    """The scan itself can fail: it sees the calls the layer exists to hold."""
    (tmp_path / "launcher").mkdir()
    (tmp_path / "launcher" / "engine.py").write_text(
        "import torch.distributed as dist\n\n\ndef step(t):\n    dist.all_reduce(t)\n"
        "    torch.distributed.barrier()  # a comment\n")
    assert collective_calls_outside_the_comm_layer(tmp_path) == [
        "launcher/engine.py:5: dist.all_reduce(t)",
        "launcher/engine.py:6: torch.distributed.barrier()  # a comment"]
