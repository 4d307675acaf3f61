"""RSO, randomized subspace optimization (Chen et al. 2025, arXiv 2502.07222).

Each targeted linear y = x W^T (W is out x in) trains, for a period of ``period_steps``
optimizer steps, only a low-rank correction in a random subspace of its input:

    y = x W^T + (x P) B^T        P: in x r, P_ij ~ N(0, 1/r), so E[P P^T] = I
                                 B: out x r (the paper's B, stored transposed)

W is frozen for the period and Adam solves the subproblem min_B f(W + B P^T) +
(proximal / 2) ||B||^2 (the paper's 1 / eta_k) from B = 0. When the period ends W
absorbs the correction (W += B P^T), B and its moments reset, and P is redrawn from
the generator of (seed, input name, period), so every rank draws the same P and a
resumed run draws the same numbers as an uninterrupted one.

Memory: the backward of B needs only x P (T x r), so ``_RSOLinear`` saves that instead
of x (T x in), and the dense dW is never formed; B's gradient (out x r) is all DDP
all-reduces and all FSDP reduce-scatters for a targeted weight: W has no gradient. The
linears that read the same input (q/k/v, gate/up; ``SHARED_INPUTS``) share one P and
one saved x P, as the paper's activation formula 8bsn + 4bsr assumes.

Layout: B is a parameter ``rso_b`` of its ``nn.Linear`` and P a persistent buffer ``p``
of an ``InputProjection`` module beside the linears it serves (``rso_<first linear>``),
so model state dicts, DDP, FSDP2 (which shards W and B on dim 0 alike, making the merge
shard-local) and checkpoints carry them with no special case; ``fold_rso`` turns the
model back into a plain ``Llama`` (export, evaluation of a run's checkpoint).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from lotus_dist.model import _tensor_seed, canonical_name
from lotus_dist.projected_linear import linear_compute_dtype

#: Linears that read one tensor (the Attention and MLP forwards of ``lotus_dist.model``,
#: and Hugging Face's LlamaAttention / LlamaMLP), by the end of the parent module's class
#: name: they share P and its saved x P. Any other targeted linear gets a P of its own.
#: Sharing is safe whatever the forward does: u is reused only for the very tensor it
#: was computed from.
SHARED_INPUTS: dict[str, tuple[tuple[str, ...], ...]] = {
    "Attention": (("q_proj", "k_proj", "v_proj"),),
    "MLP": (("gate_proj", "up_proj"),),
}


class _ProjectInput(torch.autograd.Function):
    """u = x P, whose backward needs only P: nothing of x is saved."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        dtype = linear_compute_dtype(x)
        ctx.p, ctx.dtype, ctx.x_dtype = p, dtype, x.dtype
        with torch.autocast(x.device.type, enabled=False):
            return x.to(dtype) @ p.to(dtype)

    @staticmethod
    def backward(ctx: Any, du: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        return (du.to(ctx.dtype) @ ctx.p.to(ctx.dtype).T).to(ctx.x_dtype), None


class _RSOLinear(torch.autograd.Function):
    """y = x W^T + u B^T with u = x P: saves u, never x, and gives W no gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, u: torch.Tensor, weight: torch.Tensor,
                b: torch.Tensor) -> torch.Tensor:
        dtype = linear_compute_dtype(x)
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        with torch.autocast(x.device.type, enabled=False):
            ctx.save_for_backward(u, weight, b)
            return x.to(dtype) @ weight.to(dtype).T + u.to(dtype) @ b.to(dtype).T

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        u, weight, b = ctx.saved_tensors
        dy = dy.to(ctx.dtype)
        dx = (dy @ weight.to(ctx.dtype)).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        du = (dy @ b.to(ctx.dtype)).to(u.dtype) if ctx.needs_input_grad[1] else None
        db = None
        if ctx.needs_input_grad[3]:
            db = (dy.reshape(-1, dy.shape[-1]).T @ u.reshape(-1, u.shape[-1]).to(ctx.dtype))
            db = db.to(b.dtype)
        return dx, du, None, db


class InputProjection(nn.Module):
    """P (in x r) of one input, shared by the linears that read it (``members``).

    The first member to see an input computes u = x P, and the others reuse that very
    tensor (so autograd saves one u for all of them); the reference is dropped once
    every member has used it, so no activation outlives the step.
    """

    def __init__(self, in_features: int, rank: int, members: Sequence[str],
                 device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("p", torch.empty(in_features, rank, device=device, dtype=dtype))
        self.members = tuple(members)
        self._x: weakref.ref | None = None
        self._u: torch.Tensor | None = None
        self._uses = 0

    def project(self, x: torch.Tensor) -> torch.Tensor:
        if self._u is None or self._x is None or self._x() is not x:
            self._x, self._u, self._uses = weakref.ref(x), _ProjectInput.apply(x, self.p), 0
        u = self._u
        self._uses += 1
        if self._uses >= len(self.members):
            self._x, self._u = None, None
        return u


def install_rso(model: nn.Module, rank: int, target_modules: Sequence[str], seed: int = 0
                ) -> list[tuple[str, nn.Linear, InputProjection]]:
    """Turn every bias-free ``nn.Linear`` whose name contains a target into an RSO linear:
    W frozen, a parameter ``rso_b`` (out x min(r, in)) and a shared ``InputProjection``,
    filled for period 0 of ``seed`` (B zero, P drawn). On the meta device (FSDP builds
    there) nothing is filled: call ``start_period(model, seed, 0)`` after allocating.
    Returns (name, linear, projection) per targeted linear."""
    if next(rso_layers(model), None) is not None:
        raise ValueError("install_rso: the model already has RSO linears")
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    installed: list[tuple[str, nn.Linear, InputProjection]] = []
    for parent_name, parent in list(model.named_modules()):
        children = {n: m for n, m in parent.named_children() if isinstance(m, nn.Linear)
                    and any(t in canonical_name(f"{parent_name}.{n}") for t in targets)}
        kind = next((k for k in SHARED_INPUTS if type(parent).__name__.endswith(k)), None)
        shared = [g for g in SHARED_INPUTS.get(kind, ()) if all(n in children for n in g)]
        groups = shared + [(n,) for n in children if not any(n in g for g in shared)]
        for members in groups:
            first = children[members[0]]
            weight = first.weight
            r = min(rank, first.in_features)
            proj = InputProjection(first.in_features, r, members, weight.device, weight.dtype)
            parent.add_module(f"rso_{members[0]}", proj)
            for n in members:
                linear = children[n]
                if linear.bias is not None:
                    raise ValueError(f"optim.name=rso: {parent_name}.{n} has a bias; RSO "
                                     "covers bias-free linears (LLaMA's) only")
                linear.weight.requires_grad_(False)
                linear.register_parameter("rso_b", nn.Parameter(torch.empty(
                    linear.out_features, r, device=weight.device, dtype=weight.dtype)))
                object.__setattr__(linear, "_rso_input", proj)  # not a submodule
                linear.forward = _rso_forward(linear, proj)  # type: ignore[method-assign]
                installed.append((canonical_name(f"{parent_name}.{n}"), linear, proj))
    if not installed:
        raise ValueError(f"optim.name=rso: target_modules={targets} match no bias-free "
                         "linear of the model")
    if installed[0][1].weight.device.type != "meta":
        start_period(model, seed, 0)
    return installed


def _rso_forward(linear: nn.Linear, proj: InputProjection
                 ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The replacement forward; it reads the parameters at call time (FSDP swaps in the
    unsharded ones for the forward)."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        return _RSOLinear.apply(x, proj.project(x), linear.weight, linear.rso_b)
    return forward


def rso_layers(model: nn.Module) -> Iterator[tuple[str, nn.Linear, InputProjection]]:
    """(canonical name, linear, its InputProjection) of every RSO linear of ``model``,
    found again after any wrapping (FSDP2 replaces the parameters, not the modules)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and hasattr(module, "_rso_input"):
            yield canonical_name(name), module, module._rso_input


def projections(model: nn.Module) -> Iterator[tuple[str, InputProjection]]:
    for name, module in model.named_modules():
        if isinstance(module, InputProjection):
            yield canonical_name(name), module


@torch.no_grad()
def draw_projection(seed: int, name: str, period: int, shape: tuple[int, int]) -> torch.Tensor:
    """P for ``period`` of the input ``name``: N(0, 1/r) entries, drawn in fp32 on the CPU
    from a generator of (seed, name, period), so no device or world size changes it."""
    generator = torch.Generator().manual_seed(_tensor_seed(seed, f"rso/{name}/{period}"))
    return torch.randn(shape, generator=generator) / math.sqrt(shape[1])


@torch.no_grad()
def start_period(model: nn.Module, seed: int, period: int) -> None:
    """Draw every P of ``period`` and zero every B: the state a period starts from."""
    for name, proj in projections(model):
        proj.p.copy_(draw_projection(seed, name, period, tuple(proj.p.shape)).to(proj.p.device))
    for _, linear, _ in rso_layers(model):
        linear.rso_b.zero_()


@torch.no_grad()
def merge_period(model: nn.Module) -> None:
    """W += B P^T for every RSO linear. Under FSDP, W and B are both sharded on dim 0 (their
    out rows) and P is replicated, so each rank updates its own rows, communication-free."""
    for name, linear, proj in rso_layers(model):
        w, b = _local(linear.weight), _local(linear.rso_b)
        if w.shape[0] != b.shape[0]:
            raise RuntimeError(f"RSO merge of {name}: local weight rows {tuple(w.shape)} and "
                               f"B rows {tuple(b.shape)} differ (both must be sharded on dim 0)")
        w.addmm_(b, proj.p.to(b.dtype).T)


def fold_rso(model: nn.Module) -> None:
    """Merge the current period into W and make every RSO linear a plain one again (no
    ``rso_b``, no P): the model a run's checkpoint means, for export and evaluation."""
    merge_period(model)
    for _, linear, _ in list(rso_layers(model)):
        del linear.rso_b
        object.__delattr__(linear, "_rso_input")
        del linear.forward  # the class's forward again
        linear.weight.requires_grad_(True)
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, InputProjection):
                delattr(parent, child_name)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class RSOAdamW(torch.optim.Optimizer):
    """AdamW on every B (the RSO subproblems) and on the untargeted parameters.

    Two groups: ``plain`` (embeddings, norms, head: AdamW with decoupled weight decay) and
    ``rso`` (the B's: Adam on grad + ``proximal`` * B, the gradient of the subproblem's
    proximal term, no weight decay: W is frozen within the period and the proximal term
    is the subproblem's regulariser). After every ``period_steps``-th step W absorbs
    B P^T, P is redrawn for the next period, and B, its moments and their bias correction
    restart from zero. The counters (``step`` per group, ``period`` and ``period_step``)
    are group entries, so the state dict (and every checkpoint) carries them.

    Args:
        model: a model after ``install_rso`` (and any wrapping, DDP or FSDP2).
        seed: the seed P is drawn from (``draw_projection``).
        period_steps: optimizer steps per subspace (the paper's inner iterations).
        proximal: 1 / eta_k of the proximal term (0 turns it off).
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, period_steps: int = 200, proximal: float = 0.0,
                 seed: int = 0) -> None:
        if period_steps < 1:
            raise ValueError(f"RSO period_steps must be >= 1, got {period_steps}")
        if proximal < 0:
            raise ValueError(f"RSO proximal must be >= 0, got {proximal}")
        bs = [linear.rso_b for _, linear, _ in rso_layers(model)]
        if not bs:
            raise ValueError("RSOAdamW needs a model with RSO linears: call install_rso first")
        ids = {id(b) for b in bs}
        plain = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        groups = [{"params": plain, "name": "plain", "rso": False, "step": 0},
                  {"params": bs, "name": "rso", "rso": True, "step": 0, "period": 0,
                   "period_step": 0}]
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                    "period_steps": period_steps, "proximal": proximal}
        super().__init__([g for g in groups if g["params"]], defaults)
        self.model, self.seed = model, seed

    @property
    def rso_group(self) -> dict[str, Any]:
        return next(g for g in self.param_groups if g["rso"])

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._adam(group)
        group = self.rso_group
        group["period_step"] += 1
        if group["period_step"] >= group["period_steps"]:
            self.next_period()
        return loss

    def _adam(self, group: dict[str, Any]) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        beta1, beta2 = group["betas"]
        group["step"] += 1
        t, lr = group["step"], group["lr"]
        for p in params:
            if not self.state[p]:
                self.state[p] = {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        ps = [_local(p) for p in params]
        grads = [_local(p.grad) for p in params]
        ms = [_local(self.state[p]["exp_avg"]) for p in params]
        vs = [_local(self.state[p]["exp_avg_sq"]) for p in params]
        if group["rso"] and group["proximal"] > 0:
            grads = torch._foreach_add(grads, ps, alpha=group["proximal"])
        torch._foreach_lerp_(ms, grads, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, math.sqrt(1 - beta2 ** t))
        torch._foreach_add_(denom, group["eps"])
        if group["weight_decay"] > 0 and not group["rso"]:
            torch._foreach_mul_(ps, 1 - lr * group["weight_decay"])
        torch._foreach_addcdiv_(ps, ms, denom, value=-lr / (1 - beta1 ** t))

    @torch.no_grad()
    def next_period(self) -> None:
        """End the period: W += B P^T, draw the next P, restart B and its moments."""
        group = self.rso_group
        merge_period(self.model)
        group["period"] += 1
        group["period_step"] = 0
        group["step"] = 0
        start_period(self.model, self.seed, group["period"])
        for p in group["params"]:
            for value in self.state[p].values():
                value.zero_()

    def telemetry(self) -> dict[str, dict[str, float]]:
        """Per RSO linear, keyed by weight name as LotusAdamW's: subspaces redrawn so far
        (``refresh_count``, the period index) and steps into the current one."""
        group = self.rso_group
        return {f"{name}.weight": {"refresh_count": group["period"],
                                   "steps_since_refresh": group["period_step"]}
                for name, _, _ in rso_layers(self.model)}
