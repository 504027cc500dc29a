"""Activation checkpointing, applied from outside the model (models stay plain PyTorch).

`full` recomputes every transformer block in backward; `selective` recomputes every k-th block
(k = `ac_every_k`), trading part of the memory saving for less recompute, and in every block turns
on the cheaper recomputes the model's modules offer: a module class with a `recompute_hidden`
attribute (`WanBlock`) then keeps only what is costly to recompute for backward (its norm outputs
and MLP hidden activations are recomputed there, the MLP chunk by chunk). That matters because a checkpointed block is recomputed whole in
backward: its full activations are alive at once, so a block's own footprint bounds the peak however
many blocks are checkpointed. Blocks are the ModuleLists the model class names in `_repeated_blocks`
(as diffusers does): `("blocks",)` for a DiT, `("language.layers", "visual.blocks")` for a VLM.
"""

from __future__ import annotations

import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

MODES = ("none", "full", "selective")


def block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """The ModuleLists of repeated blocks that activation checkpointing wraps (and FSDP2 makes units of),
    at the dotted paths `type(model)._repeated_blocks`. Example: `block_lists(dit)` -> `[dit.blocks]`."""
    found = []
    for path in getattr(type(model), "_repeated_blocks", ()):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList):
            found.append(obj)
    return found


def apply_ac(model: nn.Module, mode: str = "full", every_k: int = 1) -> int:
    """Wrap blocks of `model` in place; returns how many were wrapped.

    Example: `apply_ac(dit, "selective", every_k=2)` checkpoints blocks 0, 2, 4, ... and turns on
    `recompute_hidden` in all blocks.
    """
    if mode not in MODES:
        raise ValueError(f"model.activation_checkpointing={mode!r}: choose one of {', '.join(MODES)}")
    if every_k < 1:
        raise ValueError(f"model.ac_every_k={every_k}: must be >= 1")
    if mode == "none":
        return 0
    k = 1 if mode == "full" else every_k
    n = 0
    for blocks in block_lists(model):
        for i in range(len(blocks)):
            if mode == "selective":
                for mod in blocks[i].modules():
                    if hasattr(type(mod), "recompute_hidden"):
                        mod.recompute_hidden = True
            if i % k == 0:
                blocks[i] = checkpoint_wrapper(blocks[i], preserve_rng_state=False)
                n += 1
    return n
