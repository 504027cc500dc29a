"""Exponential moving average of the trainable weights (`train.ema`).

After each optimizer step: `shadow = decay * shadow + (1 - decay) * param`, in fp32, on the same
device and with the same sharding as the parameter (a DTensor parameter gets a DTensor shadow),
so the EMA costs one extra copy of the trainable weights per process. Names are the model's
parameter names without wrapper prefixes (activation checkpointing, torch.compile, FSDP1), so a
checkpoint's EMA loads into any layout.
"""

from __future__ import annotations

import torch
from torch import nn

from mmkit.common import clean_name


class EMA:
    """Shadow weights of `model`'s trainable parameters.

    Example:
        >>> ema = EMA(model, decay=0.999)
        >>> ...; opt.step(); ema.update(model)
        >>> ema.copy_to(model)   # evaluate / export with the averaged weights
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay={decay}: must be in (0, 1), e.g. 0.9999")
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {
            clean_name(n): p.detach().clone().float() for n, p in model.named_parameters() if p.requires_grad
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move every shadow weight towards the current parameter by (1 - decay)."""
        for n, p in model.named_parameters():
            if p.requires_grad:
                self.shadow[clean_name(n)].lerp_(p.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's trainable parameters with the shadow weights."""
        for n, p in model.named_parameters():
            if clean_name(n) in self.shadow:
                p.copy_(self.shadow[clean_name(n)])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow tensors themselves (not copies), so a checkpoint load fills them in place."""
        return self.shadow

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise ValueError(f"EMA state: missing {len(missing)} weights, e.g. {missing[:3]}")
        for n, t in self.shadow.items():
            if state[n] is not t:
                t.copy_(state[n])
