"""The training loop: one optimizer step = `grad_accum` micro-batches, each `task.loss(batch, g)`.

The trainer knows nothing about models: a *task* (see `train/tasks/`) owns the trainable
`task.model` and turns a batch into `(loss_sum, count)`. Losses are summed over the micro-batches
of a step and the gradient is divided once by the total count, so the step does not depend on
how the global batch is split.

Reproducibility: all randomness of a micro-batch (noise, timesteps, caption dropout) comes from
a generator seeded with (train.seed, step, micro-batch index), and the data order from the
sampler's (seed, epoch) permutation and its saved position. A run resumed from a checkpoint
therefore continues the identical loss curve, bit for bit on CPU.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from mmkit.config import Config
from mmkit.device import dist_backend, resolve_device
from mmkit.parallel.ac import apply_ac
from mmkit.train.checkpoint import CheckpointManager
from mmkit.train.ema import EMA
from mmkit.train.lr import build_lr_scheduler
from mmkit.train.metrics import MetricsLogger
from mmkit.train.optim import build_optimizer, clip_grad_norm_


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """The RNG of one micro-batch, a pure function of (seed, step, micro); with several data-parallel
    processes `micro` is the global micro-batch index (local index x world size + rank)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1009 + micro)


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size). Under torchrun, joins the process group (gloo on CPU, nccl on CUDA, hccl on
    NPU) with a timeout so a hang fails fast; a single process needs no group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(dist_backend(device), timeout=timedelta(minutes=10))
    return dist.get_rank(), dist.get_world_size()


class Trainer:
    """Example:
    cfg = parse_cli(["--config", "recipes/tiny/wan_t2v.toml", "--train.steps", "20"])
    Trainer(cfg).fit()
    """

    def __init__(self, cfg: Config):
        from mmkit.train.build import build_data, build_task

        self.cfg = cfg
        torch.manual_seed(cfg.train.seed)
        self.device = resolve_device(cfg.train.device)
        if self.device.type == "cuda" and "LOCAL_RANK" in os.environ:
            self.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        self.rank, self.world = init_distributed(self.device)
        if self.world > 1 and (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp) != (1, 1, 1):
            raise ValueError(
                "parallel.tp/pp/cp > 1: this trainer runs plain data parallelism so far; set them to 1"
            )
        self.task = build_task(cfg, self.device)  # builds model + frozen encoders
        self.model = self.task.model
        apply_ac(self.model, cfg.model.activation_checkpointing, cfg.model.ac_every_k)
        self.data, self.sampler, self.loader = build_data(cfg, self.task, self.rank, self.world)
        self.opt = build_optimizer(self.model, cfg.optim)
        self.sched = build_lr_scheduler(self.opt, cfg.optim, cfg.train.steps)
        self.ema = EMA(self.model, cfg.train.ema_decay) if cfg.train.ema else None
        self.ckpt = CheckpointManager(cfg.checkpoint, config=cfg)
        self.accum = cfg.grad_accum_steps
        self.amp = cfg.train.mixed_precision == "bf16"

    def _batches(self):
        """Endless batches; the sampler starts the next epoch when one ends."""
        while True:
            yield from self.loader
            if hasattr(self.data, "report"):
                self.data.report()

    def fit(self) -> list[float]:
        """Train to `train.steps`, resuming if a checkpoint exists; returns the per-step losses."""
        cfg = self.cfg
        resumed = self.ckpt.resume(self.model, self.opt, self.sched, ema=self.ema)
        start = resumed.step if resumed else 0
        if resumed and resumed.data_state:
            self.sampler.load_state_dict(resumed.data_state)
        log = MetricsLogger(
            cfg.logging,
            cfg.train.steps,
            start_step=start,
            device=self.device,
            compute_dtype=torch.bfloat16 if self.amp else torch.float32,
        )
        losses: list[float] = []
        batches = self._batches()
        data_state = resumed.data_state if resumed else None
        self.model.train()
        for step in range(start + 1, cfg.train.steps + 1):
            t0 = time.perf_counter()
            total = torch.zeros((), dtype=torch.float64)
            count, samples, tokens = 0, 0, 0
            self.opt.zero_grad(set_to_none=True)
            for micro in range(self.accum):
                batch = next(batches)
                data_state = batch.get("data_state", data_state)
                g = step_generator(cfg.train.seed, step, micro * self.world + self.rank)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                    out = self.task.loss(batch, g)
                out.loss_sum.backward()
                total += out.loss_sum.detach().double()
                count += int(out.count)
                samples, tokens = samples + out.samples, tokens + out.tokens
            if self.world > 1:  # sum losses, counts and gradients over the data-parallel processes
                total, count, samples, tokens = self._all_reduce_step(total, count, samples, tokens)
            for p in self.model.parameters():  # mean over everything the step saw
                if p.grad is not None:
                    p.grad.div_(count)
            grad_norm = clip_grad_norm_(
                [p for p in self.model.parameters() if p.grad is not None], cfg.train.grad_clip
            )
            lr = self.opt.param_groups[0]["lr"]
            self.opt.step()
            self.sched.step()
            if self.ema is not None:
                self.ema.update(self.model)
            loss = (total / count).item()
            losses.append(loss)
            log.step(
                {
                    "step": step,
                    "loss": loss,
                    "grad_norm": grad_norm,
                    "lr": lr,
                    "step_time_s": time.perf_counter() - t0,
                    "samples": samples,
                    "tokens": tokens,
                    "flops": self.task.train_flops(samples, tokens),
                }
            )
            self.ckpt.maybe_save(
                step, cfg.train.steps, self.model, self.opt, self.sched, ema=self.ema, data_state=data_state
            )
        log.close()
        if hasattr(self.data, "report"):
            self.data.report()
        return losses

    def _all_reduce_step(self, total, count, samples, tokens):
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])  # one collective for all gradients
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        stats = torch.tensor([total.item(), count, samples, tokens], dtype=torch.float64)
        dist.all_reduce(stats)
        return stats[0], int(stats[1]), int(stats[2]), int(stats[3])

    def close(self) -> None:
        """Leave the process group (with a barrier first: gloo can abort a rank exiting early)."""
        if self.world > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
