"""Process rank and the module inside a data-parallel wrapper, for code that runs with and without DDP."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["rank", "unwrap"]


def rank() -> int:
    """This process' rank in the default process group; 0 when not distributed."""
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_rank() if initialized else 0


def unwrap(network: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper, or ``network`` itself.

    Only those wrappers are opened: other modules with a ``module`` attribute (an EMA holder, say)
    are returned as they are.
    """
    if isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return network.module
    return network
