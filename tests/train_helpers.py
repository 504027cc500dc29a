"""Small models and training loops shared by tests/unit/train/ (CPU, milliseconds per step)."""

import random

import numpy as np
import torch
from torch import nn

from mmkit.config import OptimConfig
from mmkit.train.lr import build_lr_scheduler
from mmkit.train.optim import build_optimizer


class Toy(nn.Module):
    """Shapes chosen so FSDP2 shards unevenly (3 rows over 2 ranks) and one rank gets an empty shard
    (`modulation` has 1 row); has a norm and a modulation table (no weight decay) and linears (decay)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 3)
        self.modulation = nn.Parameter(torch.randn(1, 8) * 0.1)

    def forward(self, x):
        return self.out(self.norm(self.inp(x) + self.modulation))


OPTIM = OptimConfig(lr=1e-2, warmup_steps=2, weight_decay=0.1, min_lr=1e-3)


def build(seed: int = 0, total_steps: int = 10):
    """(model, AdamW, LambdaLR) with weights from `seed`."""
    torch.manual_seed(seed)
    model = Toy()
    opt = build_optimizer(model, OPTIM)
    return model, opt, build_lr_scheduler(opt, OPTIM, total_steps)


def train_step(model, opt, sched, ema=None) -> float:
    """One step on data drawn from every global RNG (torch, numpy, python), so a resume that restores
    any of them wrongly changes the loss."""
    x = torch.randn(5, 4) * (1 + random.random()) + float(np.random.rand())
    loss = model(x).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    sched.step()
    if ema is not None:
        ema.update(model)
    return loss.item()
