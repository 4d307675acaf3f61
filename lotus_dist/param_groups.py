"""Build GaLore-style param groups for a model, so users need not write them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

#: GaLore projects the attention and MLP linear weights; everything else is plain AdamW.
DEFAULT_TARGET_MODULES = ("self_attn", "mlp")


def lotus_param_groups(
    model: nn.Module,
    rank: int,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    **projected_options: Any,
) -> list[dict[str, Any]]:
    """Two named groups: 2-D weights of modules whose name contains a target -> projected
    with ``rank`` (and any Lotus/GaLore group key in ``projected_options``); the rest
    (embeddings, norms, head) -> plain AdamW.

    Names travel with the parameters, so ``LotusAdamW.telemetry()`` reports per layer.
    A target list that matches nothing is an error rather than a silent full-rank run.
    """
    projected, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        module_name = name.rsplit(".", 1)[0]
        if p.dim() == 2 and any(t in module_name for t in target_modules):
            projected.append((name, p))
        else:
            plain.append((name, p))
    if not projected:
        raise ValueError(f"optim.target_modules={list(target_modules)} matches no 2-D weight "
                         "of the model; nothing would be projected")
    groups: list[dict[str, Any]] = [{"params": projected, "rank": rank, **projected_options}]
    if plain:
        groups.insert(0, {"params": plain})
    return groups
