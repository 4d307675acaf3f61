"""Build GaLore-style param groups for a model, so users need not write them."""

from __future__ import annotations

import logging
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any

from torch import nn

from lotus_dist.optim import DEFAULTS

#: GaLore projects the attention and MLP linear weights; everything else is plain AdamW.
DEFAULT_TARGET_MODULES = ("self_attn", "mlp")
#: Keys every projected group carries, so ``galore_torch.GaLoreAdamW`` runs it too.
GALORE_KEYS = ("update_proj_gap", "scale", "proj_type")

logger = logging.getLogger("lotus_dist")


def lotus_param_groups(
    model: nn.Module,
    rank: int,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    **projected_options: Any,
) -> list[dict[str, Any]]:
    """Two named groups: 2-D weights of modules whose name contains a target -> projected
    with ``rank`` (and any Lotus/GaLore group key in ``projected_options``); the rest
    (embeddings, norms, head) -> plain AdamW.

    The projected group always holds GaLore's keys (``rank``, ``update_proj_gap``,
    ``scale``, ``proj_type``: LotusAdamW's defaults unless given here), so the same groups
    drive ``galore_torch.GaLoreAdamW``; being group keys, they beat LotusAdamW keyword
    defaults, so set them here. Names travel with the parameters, so
    ``LotusAdamW.telemetry()`` reports per layer. The matrices matched are logged (logger
    ``lotus_dist``, INFO); a target that matches nothing is a warning, and a list that
    matches nothing at all an error rather than a silent full-rank run.
    """
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    projected, plain = [], []
    matched: dict[str, int] = dict.fromkeys(targets, 0)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        module_name = name.rsplit(".", 1)[0]
        hits = [t for t in targets if t in module_name] if p.dim() == 2 else []
        for t in hits:
            matched[t] += 1
        (projected if hits else plain).append((name, p))
    if not projected:
        matrices = [name for name, p in model.named_parameters() if p.dim() == 2]
        raise ValueError(f"lotus_param_groups: target_modules={targets} matches no 2-D weight "
                         f"of the model, so nothing would be projected; its 2-D weights: "
                         f"{compact_names(matrices) or 'none'}")
    missed = [t for t, count in matched.items() if count == 0]
    if missed:
        warnings.warn(f"lotus_param_groups: target_modules entries {missed} match no 2-D weight "
                      f"of the model (the other targets match {len(projected)}); check the "
                      "module names, e.g. GPT-2 calls attention 'attn' and LLaMA 'self_attn'",
                      stacklevel=2)
    logger.info("lotus_param_groups: %d matrices projected at rank %d: %s", len(projected), rank,
                compact_names([name for name, _ in projected]))
    galore = {key: DEFAULTS[key] for key in GALORE_KEYS}
    groups: list[dict[str, Any]] = [
        {"params": projected, "rank": rank, **galore, **projected_options}]
    if plain:
        groups.insert(0, {"params": plain})
    return groups


def compact_names(names: Sequence[str]) -> str:
    """Parameter names with layer indices folded: 'layers.*.mlp.up_proj.weight x4, ...'."""
    counts = Counter(re.sub(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)", "*", name) for name in names)
    return ", ".join(f"{name} x{n}" if n > 1 else name for name, n in counts.items())
