"""torch.compile of the repeated blocks, applied from outside the model (after TP/CP and activation
checkpointing, before FSDP2, as torchtitan orders it). Each block is compiled in place
(`nn.Module.compile`), so parameter names and checkpoints are unchanged.
"""

from __future__ import annotations

import torch.nn as nn

from mmkit.parallel.ac import block_lists


def apply_compile(model: nn.Module, backend: str = "none") -> int:
    """Compile every block of `model` with `backend` ("none" = leave eager); returns how many.

    Example: `apply_compile(dit, "inductor")`.
    """
    if backend == "none":
        return 0
    n = 0
    for blocks in block_lists(model):
        for block in blocks:
            block.compile(backend=backend)
            n += 1
    return n
