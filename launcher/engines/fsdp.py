"""FSDP2: weights, gradients and optimizer state sharded over the ranks (ZeRO-3 semantics).

``build_fsdp_engine`` reads top to bottom: build on meta, choose placements, apply
activation checkpointing, ``fully_shard`` the blocks then the root, allocate and
initialise, build the optimizer on the sharded parameters and give Lotus its FSDP comm
(``lotus_dist.fsdp``: local projection of each shard, sharded rSVD refreshes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Literal

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from launcher.compile import maybe_compile
from launcher.config import PROJECTED_OPTIMIZERS, Config, clips_consumed
from launcher.distributed import DistInfo, all_reduce_sum, join_one_process_group
from launcher.engines.base import Engine, apply_activation_checkpointing, param_dtype
from launcher.optimizer import build_optimizer, prepare_model
from lotus_dist import LotusAdamW
from lotus_dist.comm import BYTES_KINDS as COMM_BYTES_KINDS
from lotus_dist.comm import partial_dot
from lotus_dist.fsdp import FSDPComm, lotus_shard_placement, projected_sides
from lotus_dist.model import Llama, LlamaConfig, build_model_on_meta
from lotus_dist.rso import start_period

#: FSDP's own parameter all-gathers, then what the Lotus comm counts.
BYTES_KINDS = ("param_allgathers", *COMM_BYTES_KINDS)


def build_fsdp_engine(cfg: Config, model_cfg: LlamaConfig, dist_info: DistInfo,
                      accum_steps: int) -> FSDPEngine:
    """The model sharded on a 1-D mesh over all ranks (one, launched without torchrun),
    with its optimizer; ``launcher.capabilities`` has checked the settings."""
    o = cfg.optim
    join_one_process_group(dist_info.device, cfg.parallel.timeout_s)
    mesh = init_device_mesh(dist_info.device.type, (dist_info.world_size,))
    model = build_model_on_meta(model_cfg).to(param_dtype(cfg.training.dtype))
    prepare_model(o, model, cfg.training.seed)  # rso: B on dim 0 like W, P replicated
    sides = (projected_sides(model, o.rank, o.target_modules, o.proj_type)
             if o.name in PROJECTED_OPTIMIZERS else {})
    bf16 = uses_bf16(cfg, dist_info.device)
    mp_policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                 if bf16 else MixedPrecisionPolicy())
    maybe_compile(model, cfg)  # lazy: compiles each block's call with the hooks added next
    parallelize_llama(model, mesh, lotus_shard_placement(sides, dist_info.world_size),
                      mp_policy, cfg.parallel.activation_checkpointing)
    # Allocate only the local shards, then fill them from full-size draws seeded by
    # (seed, name): the weights equal a single process's at any world size.
    model.to_empty(device=dist_info.device)
    model.init_weights(cfg.training.seed)
    if o.name == "rso":
        start_period(model, cfg.training.seed, 0)
    comm = FSDPComm(mesh, check_consistency=cfg.parallel.check_consistency,
                    shard_bases=cfg.parallel.fsdp_shard_bases,
                    shard_lowrank_accumulation=cfg.parallel.fsdp_grad_accumulation == "sharded")
    optimizer = build_optimizer(o, model, seed=cfg.training.seed, comm=comm)
    if o.projected_backward:  # projected weights then skip FSDP's reduce-scatter
        optimizer.project_in_backward(model)
    engine = FSDPEngine(model, optimizer, dist_info, mesh, accum_steps,
                        param_bytes=2 if bf16 else param_dtype(cfg.training.dtype).itemsize,
                        grad_accumulation=cfg.parallel.fsdp_grad_accumulation)
    engine.clip_consumed = clips_consumed(cfg)
    return engine


def uses_bf16(cfg: Config, device: torch.device) -> bool:
    """Whether FSDP gathers bf16 weights (``parallel.mixed_precision``): bf16 asks for it;
    auto does on CUDA when the compute is bf16 anyway (``training.dtype`` auto or bf16),
    so that an explicit fp32 or fp64 run, and any CPU run, keep their dtype."""
    mp = cfg.parallel.mixed_precision
    return mp == "bf16" or (mp == "auto" and device.type == "cuda"
                            and cfg.training.dtype in ("auto", "bf16"))


def parallelize_llama(model: Llama, mesh: DeviceMesh,
                      shard_placement_fn: Callable[[nn.Parameter], object],
                      mp_policy: MixedPrecisionPolicy, activation_checkpointing: bool) -> None:
    """Apply activation checkpointing and FSDP2 to ``model`` in place, in this order:

    1. Activation checkpointing per block, before sharding, so that the recomputation
       in backward runs after FSDP's pre-backward all-gather of that block. The
       composable API adds hooks instead of a wrapper: parameter names (init seeds,
       checkpoints, optimizer groups) stay those of a bare ``Llama``.
    2. ``fully_shard`` per transformer block: one all-gather and one reduce-scatter unit
       each, so only a block or two are unsharded at a time.
    3. The embeddings, then the final norm with the head as one unit; that unit stays
       unsharded after forward because backward starts with it.
    4. The root last: it owns what is left (no parameters) and schedules the rest.

    ``shard_placement_fn`` puts each projected matrix on the dimension its projection
    keeps (``lotus_dist.fsdp``); everything else is sharded on dim 0.
    """
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    kwargs = {"mesh": mesh, "mp_policy": mp_policy, "shard_placement_fn": shard_placement_fn}
    for block in model.layers:
        fully_shard(block, **kwargs)
    fully_shard(model.embed_tokens, **kwargs)
    fully_shard([model.norm, model.lm_head], reshard_after_forward=False, **kwargs)
    fully_shard(model, **kwargs)


class FSDPEngine(Engine):
    """One step: forward/backward per micro-batch, each reduce-scattering its gradient
    into the sharded ``.grad`` (``grad_accumulation="sharded"``), or only the last one,
    earlier ones summing whole fp32 gradients on every rank (``"unsharded"``); clipping
    on the global norm of the sharded gradients, then the optimizer on local shards.
    Either way the gradient is the global batch's mean: the trainer divides each
    micro-batch's loss by the accumulation steps, and the reduce-scatter averages over
    ranks, so only the order of the sums differs (sum of averages, or average of sums).

    Checkpoints are DCP's sharded state dicts (``Engine.checkpoint_items``): parameters
    and the DTensor optimizer state reshard on load, so a run resumes on any world size.
    """

    name = "fsdp"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, dist_info: DistInfo,
                 mesh: DeviceMesh, accum_steps: int, param_bytes: int,
                 grad_accumulation: Literal["sharded", "unsharded"]) -> None:
        super().__init__(model, model, optimizer, dist_info)
        self.mesh, self.group = mesh, mesh.get_group()
        self.comm = optimizer.comm if isinstance(optimizer, LotusAdamW) else None  # FSDPComm
        self.accum_steps, self.param_bytes = accum_steps, param_bytes
        self.grad_accumulation = grad_accumulation
        self.steps = 0  # since this process started: the comm's counts are per session

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        if self.steps == 0 and self.comm is not None:
            self.comm.bytes.clear()  # drop a checkpoint load's state-initialising step
        if self.grad_accumulation == "unsharded":
            self.model.set_requires_gradient_sync(last)
        yield
        self.steps += last

    def clip_grad_norm(self, max_norm: float) -> float:
        """The norm of the whole gradient from per-shard partial sums (one all-reduce),
        scaling the local shards as ``torch.nn.utils.clip_grad_norm_`` would."""
        if self.clip_consumed:
            return super().clip_grad_norm(max_norm)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        sq = all_reduce_sum(torch.stack([partial_dot(g, g) for g in grads]).sum().reshape(1),
                            self.group)
        norm = float(sq.sqrt())
        coef = max_norm / (norm + 1e-6)
        if max_norm > 0 and coef < 1.0:
            torch._foreach_mul_([g.to_local() for g in grads], coef)
        return norm

    def comm_bytes_per_step(self) -> dict[str, int]:
        """Per optimizer step, in bytes of the tensors each collective produces or reduces
        (as DDP counts its all-reduce): parameter all-gathers in forward and again in
        backward for every unit resharded after forward, per micro-batch; the gradient
        reduce-scatter (in the masters' dtype) per micro-batch, or once per step with
        unsharded accumulation; and what the Lotus comm measured (low-rank
        all-reduces of the dim-0 fallback matrices, rSVD sketches and svd gathers
        amortised over the steps run, switch statistics)."""
        numel = sum(p.numel() for p in self.model.parameters())
        head = sum(p.numel() for m in (self.raw_model.norm, self.raw_model.lm_head)
                   for p in m.parameters())
        out = dict.fromkeys(BYTES_KINDS, 0)
        out["param_allgathers"] = self.accum_steps * (2 * numel - head) * self.param_bytes
        reduce_scatters = self.accum_steps if self.grad_accumulation == "sharded" else 1
        # with the projected backward a projected weight has a gradient to reduce-scatter
        # only on the steps that refresh it (one step per refresh), amortised here
        sites = (self.optimizer.projection_sites() if isinstance(self.optimizer, LotusAdamW)
                 else {})
        grads = sum(p.numel() * p.element_size()
                    * (self.optimizer.state[p].get("refresh_count", 0) / max(self.steps, 1)
                       if p in sites else 1)
                    for p in self.model.parameters() if p.requires_grad)  # rso: W is frozen
        out["full_gradients"] = int(reduce_scatters * grads)
        if self.comm is not None:
            for kind, total in self.comm.bytes.items():
                out[kind] += total // max(self.steps, 1)
        return out

