"""lotus-dist: the Lotus low-rank optimizer and the pieces to pre-train LLaMA with it."""

# torch._dynamo, imported lazily by the first optimizer built, keeps references to the
# default process group if that exists when it is imported, so destroy_process_group then
# leaves gloo's threads running, and one of them can abort the interpreter at exit
# (SIGABRT while it frees a finished collective). Imported here, before any process
# group, it keeps no such reference.
import torch._dynamo  # noqa: F401

from lotus_dist.optim import LotusAdamW, NonFiniteGradientError
from lotus_dist.param_groups import lotus_param_groups
from lotus_dist.rso import RSOAdamW, install_rso

__all__ = ["LotusAdamW", "NonFiniteGradientError", "RSOAdamW", "install_rso",
           "lotus_param_groups"]
