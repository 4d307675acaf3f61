"""Loading a checkpoint runs no code from it: crafted .metadata and byte entries are refused.

Each crafted file carries a pickle whose ``__reduce__`` would create a marker file when
unpickled; the tests check that the load fails with a clear CheckpointError and that the
marker file was never created. A crafted checkpoint keeps a consistent COMPLETE.json (an
attacker rewrites the checksums too), so the refusal cannot come from the checksums.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shlex
import zlib
from pathlib import Path

import pytest
import torch
from test_checkpoint import full_state

from launcher import checkpoint
from launcher.checkpoint import MARKER, CheckpointError, load, load_model_weights, save
from launcher.config import OptimConfig
from launcher.optimizer import build_optimizer
from launcher.safe_metadata import SafeFileSystemReader, load_metadata
from launcher.schedule import build_lr_scheduler
from launcher.train_state import ModelState, OptimizerState, TrainState
from lotus_dist.model import LlamaConfig, build_model


class RunsCode:
    """Unpickling this runs ``touch <path>``: what a malicious checkpoint would do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.path))}",)


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))


def rewrite_checksums(path: Path) -> None:
    """Make COMPLETE.json match the files again, as someone crafting a checkpoint would."""
    marker = json.loads((path / MARKER).read_text())
    for name in marker.get("files", {}):  # none in checkpoints from before checksums
        data = (path / name).read_bytes()
        marker["files"][name] = {"bytes": len(data), "crc32": f"{zlib.crc32(data):08x}"}
    (path / MARKER).write_text(json.dumps(marker))


def craft_metadata(path: Path, payload: RunsCode) -> None:
    """Replace .metadata by the genuine one with a payload hidden in planner_data: the
    unsafe reader would return a working Metadata after running the payload."""
    metadata = SafeFileSystemReader(path).read_metadata()
    metadata.planner_data = {"payload": payload, **(metadata.planner_data or {})}
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    rewrite_checksums(path)


def assert_refused(info: pytest.ExceptionInfo, path: Path, marker: Path) -> None:
    message = str(info.value)
    assert str(path) in message
    assert "contains objects a checkpoint never holds" in message
    assert "was not loaded" in message
    assert not marker.exists(), "the crafted pickle ran"


def test_crafted_metadata_is_refused_by_load(tmp_path):
    path = save(tmp_path / "ckpt", 1, full_state(0, 1)[0])
    marker = tmp_path / "pwned"
    craft_metadata(path, RunsCode(marker))
    with pytest.raises(CheckpointError) as info:
        load(path, full_state(1, 0)[0])
    assert_refused(info, path, marker)
    assert "posix.system" in str(info.value) or "os.system" in str(info.value)


def test_crafted_metadata_is_refused_by_export_readers(tmp_path):
    path = save(tmp_path / "ckpt", 1, {"model": ModelState(model())})
    marker = tmp_path / "pwned"
    craft_metadata(path, RunsCode(marker))
    with pytest.raises(CheckpointError) as info:
        checkpoint.stored_model_shapes(path)
    assert_refused(info, path, marker)
    with pytest.raises(CheckpointError) as info:
        load_model_weights(path, model())
    assert_refused(info, path, marker)


def test_crafted_metadata_is_refused_through_checkpoint_resume_path(tmp_path):
    path = save(tmp_path / "ckpt", 1, full_state(0, 1)[0])
    marker = tmp_path / "pwned"
    craft_metadata(path, RunsCode(marker))
    resolved = checkpoint.resolve_resume(tmp_path / "elsewhere", str(path))
    with pytest.raises(CheckpointError) as info:
        load(resolved, full_state(1, 0)[0])
    assert_refused(info, path, marker)


def test_crafted_byte_entry_is_refused(tmp_path):
    """A non-tensor value (DCP pickles those with torch.save) that would run code."""
    marker = tmp_path / "pwned"
    path = save(tmp_path / "ckpt", 1, {"train_state": {"step": 1, "note": RunsCode(marker)}})
    assert not marker.exists()  # saving pickles the payload without running it
    with pytest.raises(CheckpointError) as info:
        load(path, {"train_state": {"step": 0, "note": ""}})
    assert_refused(info, path, marker)
    assert "train_state.note" in str(info.value)


def test_metadata_that_is_not_dcp_metadata_is_refused(tmp_path):
    path = save(tmp_path / "ckpt", 1, full_state(0, 1)[0])
    (path / ".metadata").write_bytes(pickle.dumps({"just": "a dict"}))
    rewrite_checksums(path)
    with pytest.raises(CheckpointError, match="instead of DCP Metadata"):
        load(path, full_state(1, 0)[0])


def test_allowlist_covers_every_global_of_a_rich_checkpoint(tmp_path):
    """Every dtype, 0-d and empty tensors, Stateful and nested plain values: the globals
    of the genuine .metadata are all allowed, and the checkpoint loads back."""
    values = {"bf16": torch.ones(3, dtype=torch.bfloat16), "f16": torch.ones(2, dtype=torch.half),
              "i32": torch.arange(3, dtype=torch.int32), "u8": torch.zeros(2, dtype=torch.uint8),
              "bool": torch.tensor([True]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0)}
    plain = {"int": 3, "float": 1.5, "none": None, "str": "x", "tuple": (1, 2), "list": [1.0],
             "set": {1, 2}, "nested": {"a": {"b": [1, "c"]}}}
    state = {**full_state(0, 1)[0], "tensors": values, "plain": plain}
    path = save(tmp_path / "ckpt", 1, state)
    load_metadata(io.BytesIO((path / ".metadata").read_bytes()))  # nothing refused

    target = {**full_state(1, 0)[0],
              "tensors": {k: torch.empty_like(v) for k, v in values.items()},
              "plain": {"int": 0, "float": 0.0, "none": 1, "str": "", "tuple": (0,), "list": [],
                        "set": set(), "nested": {"a": {"b": []}}}}
    load(path, target)
    for key, value in values.items():
        assert torch.equal(target["tensors"][key], value), key
    assert target["plain"] == plain


def test_lotus_optimizer_and_schedule_state_pass_the_safe_loader(tmp_path):
    """The trainer's real state objects (LotusAdamW with its projectors, the lr schedule,
    train state, RNG) hold only what the allowlists admit, and round-trip exactly."""
    def build():
        cfg = LlamaConfig(dim=32, n_layers=1, n_heads=2, intermediate_size=48, vocab_size=64,
                          max_seq_len=16)
        net = build_model(cfg)
        opt = build_optimizer(OptimConfig(name="lotus", rank=4), net, seed=0)
        return net, opt, build_lr_scheduler(opt, 2, 10, 0.1)

    def step(net, opt, sched):
        tokens = torch.randint(64, (2, 9))
        net(tokens[:, :-1]).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()

    torch.manual_seed(0)
    net, opt, sched = build()
    for _ in range(3):
        step(net, opt, sched)
    state = {"model": ModelState(net), "optimizer": OptimizerState(net, opt),
             "lr_scheduler": sched, "train_state": TrainState(step=3),
             "rng": checkpoint.RNGState()}
    path = save(tmp_path, 3, state)

    net2, opt2, sched2 = build()
    step(net2, opt2, sched2)  # its state exists (and differs) before the load
    restored = TrainState()
    load(path, {"model": ModelState(net2), "optimizer": OptimizerState(net2, opt2),
                "lr_scheduler": sched2, "train_state": restored,
                "rng": checkpoint.RNGState()})
    assert restored.step == 3
    assert sched2.state_dict() == sched.state_dict()
    for p, p2 in zip(net.parameters(), net2.parameters(), strict=True):
        assert torch.equal(p, p2)
        for key, value in opt.state[p].items():
            other = opt2.state[p2][key]
            if torch.is_tensor(value):
                assert torch.equal(value, other), key
            else:  # plain numbers (nan where a statistic is not computed yet)
                assert value == other or (value != value and other != other), key
