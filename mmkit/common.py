"""Small types and constants shared by several floors of mmkit (data, parallel, train, convert).

Holds only what more than one package needs and what depends on nothing but torch: the loss record
a training forward returns, the label value that means "no loss here", and the parameter-name
cleaner that strips wrapper prefixes. It holds no model, parallel or training logic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# label of a position that is not a target (prompt tokens, padding): PyTorch cross-entropy's default
IGNORE_INDEX = -100

# Largest image mmkit decodes, in pixels (8192 x 8192). Pillow's decompression-bomb limit is set to it
# explicitly wherever images are opened, and larger images are refused from their header, before decoding.
MAX_IMAGE_PIXELS = 8192 * 8192

# prefixes that activation checkpointing, torch.compile and FSDP1 insert into parameter names
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


@dataclass
class LossOut:
    """Summed loss and the count it averages over, plus throughput counters for metrics.

    Example: `LossOut(loss_sum=err.sum(), count=err.numel(), samples=2, tokens=96)`.
    """

    loss_sum: torch.Tensor
    count: torch.Tensor | int
    samples: int
    tokens: int


def clean_name(name: str) -> str:
    """A parameter name without wrapper prefixes. Example: `clean_name("blocks.0._orig_mod.w")` -> `"blocks.0.w"`."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name
