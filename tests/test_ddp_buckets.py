"""Low-rank DDP's buckets: flat buffers allocated once and reused, hooks writing into them,
full gradients that are views of their bucket, and refresh steps whose holes change what
is sent (lotus_dist.ddp.LowRankReducer)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_ddp_lowrank import (
    _free_port,
    _join,
    clipped_step,
    loss_of,
    refresh_counts,
    two_micro_batch_step,
)
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lotus_dist import LotusAdamW, lotus_param_groups
from lotus_dist.comm import LocalComm
from lotus_dist.ddp import LowRankDDPComm, LowRankReducer, _project_into
from lotus_dist.projection import project

WORLD = 2
#: Steps with set_to_none=True (the engine's zero_grad), then with set_to_none=False.
STEPS, KEPT = 12, 3
#: Displacement switching every 2 steps: all four matrices refresh at steps 1 and 5,
#: all but mlp.0.2 at 9 and 13, only mlp.0.2 at 7, 11 and 15, none at the others.
OPTIONS = {"projection": "rsvd", "switch": "displacement", "verify_gap": 2, "gamma": 0.5}
#: About 520 elements: two buckets, [head.bias, head.weight, R of mlp.1.2 and mlp.1.0]
#: and [embed, R of mlp.0.2 and mlp.0.0], each mixing full gradients and R. Slots start
#: at multiples of 256 bytes (32 fp64 elements).
BUCKET_MB = 0.002
COPIES = {"aten.copy_.default", "aten.cat.default", "aten.clone.default",
          "aten._to_copy.default"}


class Branches(nn.Module):
    """Two projected branches whose order in forward, and so the order in which backward
    finishes their gradients, flips every step; an embedding, a head and its bias."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 12)
        self.mlp = nn.ModuleList([nn.Sequential(nn.Linear(12, 40, bias=False), nn.Tanh(),
                                                nn.Linear(40, 12, bias=False))
                                  for _ in range(2)])
        self.head = nn.Linear(12, 30)
        self.flip = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = out = self.embed(x)
        for i in ([1, 0] if self.flip else [0, 1]):
            out = out + self.mlp[i](e)
        return self.head(out)


def make(comm: LocalComm | None = None, dtype: torch.dtype = torch.float64
         ) -> tuple[Branches, LotusAdamW]:
    torch.manual_seed(0)
    model = Branches().to(dtype)
    groups = lotus_param_groups(model, 3, target_modules=["mlp"], **OPTIONS)
    return model, LotusAdamW(groups, lr=0.02, seed=5, comm=comm)


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 30, (4 * WORLD, 9), generator=g) for _ in range(STEPS + KEPT)]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def run_single() -> dict:
    """One process on the global batches, flipping the branches like the ranks."""
    model, opt = make()
    norms, weights = [], []
    for step, batch in enumerate(batches(), 1):
        model.flip = step % 2 == 0
        opt.zero_grad()
        loss_of(model, batch).backward()
        norms.append(clipped_step(opt))
        if step in (STEPS, STEPS + KEPT):
            weights.append(snapshot(model))
    return {"norms": norms, "weights": weights, "refreshes": refresh_counts(opt)}


class _Count(TorchDispatchMode):
    """Counts new storages and copies made by the ops run inside it."""

    def __init__(self, stats: dict) -> None:
        super().__init__()
        self.stats = stats

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                if t.untyped_storage().data_ptr() not in inputs:
                    self.stats["new_bytes"] += t.untyped_storage().nbytes()
                if str(func) in COPIES:
                    self.stats["copies"] += 1
        return out


def _instrument(record: dict) -> None:
    """Count what the reducer's hooks and finish() allocate and copy, per step, and the
    order in which the hooks ran (this spawned process only)."""
    hook, finish = LowRankReducer._on_grad_ready, LowRankReducer.finish
    send = LowRankDDPComm.all_reduce_async
    record["steps"] = [{"new_bytes": 0, "copies": 0, "order": [], "sent": []}]

    def counted_hook(self, p):
        if self.boundary:
            record["steps"][-1]["order"].append(record["names"].get(p))
        with _Count(record["steps"][-1]):
            hook(self, p)

    def counted_finish(self):
        with _Count(record["steps"][-1]):
            finish(self)
        record["steps"].append({"new_bytes": 0, "copies": 0, "order": [], "sent": []})

    def counted_send(self, flat, kinds):
        record["steps"][-1]["sent"].append(flat.numel())
        return send(self, flat, kinds)

    LowRankReducer._on_grad_ready, LowRankReducer.finish = counted_hook, counted_finish
    LowRankDDPComm.all_reduce_async = counted_send


def _bucket_state(reducer: LowRankReducer, names: dict) -> dict:
    """After finish(): each bucket's buffer, and where each full gradient lives."""
    full = {}
    for p, (bucket, slot) in reducer._slots.items():
        if slot.kind == "full_gradients":
            full[names[p]] = {
                "shares_bucket": p.grad.untyped_storage().data_ptr()
                == bucket.flat.untyped_storage().data_ptr(),
                "at_slot": p.grad.data_ptr() == slot.view.data_ptr()}
    aligned = all((s.view.data_ptr() - b.flat.data_ptr()) % 256 == 0
                  and s.view.data_ptr() % 64 == 0 for b, s in reducer._slots.values())
    return {"aligned": aligned, "buffers": [b.flat.data_ptr() if b.flat is not None else None
                        for b in reducer._buckets],
            "numels": [b.numel for b in reducer._buckets], "full": full}


def _step(model, opt, comm, reducer, local, step: int, set_to_none: bool) -> float:
    model.flip = step % 2 == 0
    return two_micro_batch_step(model, opt, comm, reducer, local, set_to_none)


def _bf16_check(rank: int) -> dict:
    """bf16 parameters: buffers in fp32, the rank mean rounded back into the bf16
    p.grad, which is not a view of the bucket."""
    comm = LowRankDDPComm()
    model, opt = make(comm, torch.bfloat16)
    reducer = LowRankReducer(model, opt, comm, bucket_mb=BUCKET_MB)
    out = {"equal": [], "views": [], "r_close": []}
    for step, batch in enumerate(batches()[:3], 1):
        local = batch[rank * 4:(rank + 1) * 4]
        opt.zero_grad()
        comm.reset()
        loss_of(model, local).backward()
        means = {p: p.grad.float() for p in model.parameters()}
        for t in means.values():
            dist.all_reduce(t)
            t /= WORLD
        reducer.finish()
        for p, (_, slot) in reducer._slots.items():
            if slot.kind == "full_gradients":
                out["equal"].append(p.grad.dtype == torch.bfloat16
                                    and torch.equal(p.grad, means[p].to(torch.bfloat16)))
                out["views"].append(p.grad.data_ptr() == slot.view.data_ptr())
            elif step > 1:
                basis, side = opt.current_basis(p)
                r = comm._ready[p]
                out["r_close"].append(r.dtype == torch.float32 and torch.allclose(
                    r, project(means[p], basis, side), rtol=1e-2, atol=1e-4))
        clipped_step(opt)
    return out


def _worker(rank: int, port: int, out: str) -> None:
    _join(rank, WORLD, port)
    comm = LowRankDDPComm()
    model, opt = make(comm)
    record: dict = {"names": {p: n for n, p in model.named_parameters()}}
    _instrument(record)
    reducer = LowRankReducer(model, opt, comm, bucket_mb=BUCKET_MB)
    projected = [(n, p) for n, p in model.named_parameters() if p in reducer.projected]
    due, states, norms, weights = [], [], [], []
    for step, batch in enumerate(batches(), 1):
        due.append([n for n, p in projected if opt.current_basis(p) is None])
        local = batch[rank * 4:(rank + 1) * 4]
        norms.append(_step(model, opt, comm, reducer, local, step, set_to_none=step <= STEPS))
        states.append(_bucket_state(reducer, record["names"]))
        if step in (STEPS, STEPS + KEPT):
            weights.append(snapshot(model))
    steps = record["steps"][:-1]
    result = {"norms": norms, "weights": weights, "refreshes": refresh_counts(opt),
              "due": due, "states": states, "new_bytes": [s["new_bytes"] for s in steps],
              "copies": [s["copies"] for s in steps], "orders": [s["order"] for s in steps],
              "sent": [s["sent"] for s in steps],
              "bf16": _bf16_check(rank)}
    torch.save(result, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = str(tmp_path_factory.mktemp("buckets") / "rank")
    mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD)
    return [torch.load(f"{out}.{r}", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("side", ["left", "right"])
def test_writing_r_into_an_aligned_slot_is_project_bitwise(dtype, side):
    """MKL's GEMM rounds differently into a buffer that is not 16-byte aligned, hence the
    reducer's 256-byte aligned slots; here a slot at 256 bytes into its buffer."""
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(40, 24, generator=g, dtype=dtype)
    basis = torch.linalg.qr(torch.randn(40 if side == "left" else 24, 5, generator=g,
                                        dtype=dtype))[0]
    expected = project(grad, basis, side)
    start = 256 // expected.element_size()
    flat = torch.full((start + expected.numel() + 7,), torch.nan, dtype=dtype)
    slot = flat[start:start + expected.numel()].view(expected.shape)
    _project_into(grad, basis, side, slot)
    assert torch.equal(slot, expected)
    assert flat[:start].isnan().all() and flat[start + expected.numel():].isnan().all()


def test_no_buffer_is_allocated_after_the_first_step(ranks):
    for r in ranks:
        buffers = [s["buffers"] for s in r["states"]]
        assert len(buffers[0]) == 2 and None not in buffers[0]  # every bucket, from step 1
        assert all(b == buffers[0] for b in buffers), buffers
        # the first step allocates the buffers; no later step allocates anything in the
        # reducer (the old path cat'ed a new buffer and allocated every R, every step)
        assert r["new_bytes"][0] >= 8 * sum(r["states"][0]["numels"])
        assert r["new_bytes"][1:] == [0] * (STEPS + KEPT - 1), r["new_bytes"]


def test_full_gradients_are_views_of_their_bucket(ranks):
    for r in ranks:
        for state in r["states"]:
            assert set(state["full"]) == {"embed.weight", "head.weight", "head.bias"}
            assert all(f["shares_bucket"] and f["at_slot"] for f in state["full"].values())
            assert state["aligned"]


def test_copies_are_one_per_full_gradient_and_none_for_kept_views(ranks):
    for r in ranks:
        # set_to_none=True: each full gradient is copied in once (no copy back, R none)
        assert r["copies"][:STEPS] == [3] * STEPS, r["copies"]
        # set_to_none=False keeps p.grad the slot, which backward accumulates into
        assert r["copies"][STEPS:] == [0] * KEPT, r["copies"]


def test_hook_order_changes_between_steps(ranks):
    orders = ranks[0]["orders"]
    assert len(set(map(tuple, orders))) == 2  # the flipped branches: two orders
    assert sorted(orders[0]) == sorted(orders[1]) and orders[0] != orders[1]


def test_refresh_steps_change_membership_and_equal_one_process(ranks):
    ref = run_single()
    due = ranks[0]["due"]
    assert len(due[0]) == len(due[4]) == 4
    assert due[6] == due[10] == ["mlp.0.2.weight"]  # a hole between two filled slots
    assert len(due[8]) == 3 and "mlp.0.2.weight" not in due[8]
    assert any(d == [] for d in due[1:])
    # buckets [head.bias 30 | head.weight 360 | R 120 | R 120] (slots at 0, 32, 416, 544)
    # and [embed 360 | R 120 | R 120] (at 0, 384, 512): whole when nothing refreshes,
    # only the runs of filled slots when something does
    sent = ranks[0]["sent"]
    assert sent[0] == sent[4] == [392, 360]
    assert sent[6] == sent[10] == [664, 360, 120]
    assert sent[8] == [392, 504]
    assert sent[1] == sent[2] == [664, 632]
    for r in ranks:
        assert r["due"] == due
        assert r["refreshes"] == ref["refreshes"]
        assert r["norms"] == pytest.approx(ref["norms"], rel=1e-10)
        for got, want in zip(r["weights"], ref["weights"], strict=True):
            for name, w in want.items():
                torch.testing.assert_close(got[name], w, rtol=1e-10, atol=1e-12, msg=name)
    for name, w in ranks[0]["weights"][-1].items():
        assert torch.equal(ranks[1]["weights"][-1][name], w), name


def test_bf16_parameters_reduce_in_fp32_and_copy_the_mean_back(ranks):
    for r in ranks:
        bf16 = r["bf16"]
        assert bf16["equal"] and all(bf16["equal"])
        assert not any(bf16["views"])
        assert bf16["r_close"] and all(bf16["r_close"])
