"""lotus-dist: the Lotus low-rank optimizer and the pieces to pre-train LLaMA with it."""

from lotus_dist.optim import LotusAdamW, NonFiniteGradientError
from lotus_dist.param_groups import lotus_param_groups

__all__ = ["LotusAdamW", "NonFiniteGradientError", "lotus_param_groups"]
