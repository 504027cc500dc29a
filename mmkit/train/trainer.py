"""The training loop: one optimizer step = `grad_accum` micro-batches, each `task.loss(batch, g)`.

The trainer knows nothing about models: a *task* (see `train/tasks/`) owns the trainable
`task.model` and turns a batch into `(loss_sum, count)`. Losses are summed over the micro-batches
of a step and the gradient is divided once by the total count, so the step does not depend on
how the global batch is split.

Several processes (torchrun): the `parallel` section becomes a DeviceMesh (`parallel/dims.py`); the
family's plan (`parallel/plans/`) applies TP/SP, CP, activation checkpointing and FSDP2 and runs
`task.prepare(batch, g)` -> loss on this rank's piece of the sequence; or, with `parallel.pp > 1`, the
plan applies everything but FSDP2, the model is cut into pipeline stages (`parallel/pp.py`, FSDP2 per
stage) that run the plan's pieces and all micro-batches of a step. Either way
gradients end up summed over every process that saw different tokens, and divided once by the global
count: every layout reproduces the single-process loss curve (tests/distributed/test_layouts.py).

Reproducibility: all randomness of a sample (noise, timestep, caption dropout) comes from a generator
seeded with (train.seed, step) and the sample's (epoch, dataset index), whatever process or
micro-batch it lands in; the data order comes from the sampler's (seed, epoch) permutation and its
saved position. A run resumed from a checkpoint therefore continues the identical loss curve, bit for
bit on CPU, and a checkpoint saved under one layout resumes under another (DCP reshards).
"""

from __future__ import annotations

import math
import os
import time

import torch
import torch.distributed as dist

from mmkit import registry
from mmkit.config import Config
from mmkit.device import dist_backend, resolve_device
from mmkit.parallel.ac import apply_ac
from mmkit.parallel.compile import apply_compile
from mmkit.parallel.dims import ParallelDims, check_model_layout, process_group_timeout
from mmkit.parallel.plans import parallelize
from mmkit.train.checkpoint import CheckpointManager
from mmkit.train.ema import EMA
from mmkit.train.lr import build_lr_scheduler, rebase_scheduler
from mmkit.train.metrics import MetricsLogger
from mmkit.train.optim import build_optimizer, clip_grad_norm_


class TrainingDiverged(ValueError):
    """The numerics guard stopped the run: a non-finite loss or gradient (train.nan_policy)."""


def step_generator(seed: int, step: int, micro: int = 0) -> torch.Generator:
    """The RNG of a step, a pure function of (seed, step, micro). Tasks key each sample's stream off its
    seed and the sample's (epoch, index), so the draws do not depend on the process layout."""
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
        dist.init_process_group(dist_backend(device), timeout=process_group_timeout())
    return dist.get_rank(), dist.get_world_size()


def _counts(prep: dict) -> tuple[int, int]:
    """(samples, tokens) of a prepared micro-batch (for throughput metrics under pipeline parallelism)."""
    if "cu_seqlens" in prep:
        return len(prep["cu_seqlens"]) - 1, int(prep["input_ids"].shape[1])
    if "labels" in prep:
        return prep["labels"].shape[0], int(prep["attention_mask"].sum())
    return prep["latents"].shape[0], int(prep["target"][:, 0].numel())


class Trainer:
    """Example (the block leaves the process group however `fit` ends):
    cfg = parse_cli(["--config", "recipes/tiny/wan_t2v.toml", "--train.steps", "20"])
    with Trainer(cfg) as trainer:
        losses = trainer.fit()
    """

    def __init__(self, cfg: Config):
        from mmkit.train.build import build_data, build_task

        self.cfg = cfg
        torch.manual_seed(cfg.train.seed)
        self.device = resolve_device(cfg.train.device)
        if self.device.type == "cuda" and "LOCAL_RANK" in os.environ:
            self.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        self.rank, self.world = init_distributed(self.device)
        self.dims = ParallelDims.from_config(cfg.parallel, self.world)
        self.mesh = self.dims.build_mesh(self.device.type) if self.world > 1 else None
        self.task = build_task(cfg, self.device)  # builds model + frozen encoders
        self.model = self.task.model
        p = cfg.parallel
        check_model_layout(
            cfg.model.family, self.model.cfg, tp=p.tp, cp=p.cp, cp_algo=p.cp_algo,
            ulysses_degree=p.ulysses_degree, pp=p.pp, pp_layers=p.pp_layers,
        )  # fmt: skip
        self.accum = cfg.grad_accum_steps
        self.plan = self.pipe = None
        self.owned = self.model  # the parameters this process optimises and checkpoints
        if self.dims.pp > 1:  # the plan without FSDP2 -> stages -> FSDP2 per stage
            self.plan = parallelize(self.task, self.dims, self.mesh, cfg, fsdp=False)
            self._build_pipeline()
        elif self.world > 1:  # TP/SP -> CP -> activation checkpointing -> FSDP2 (parallel/plans/)
            self.plan = parallelize(self.task, self.dims, self.mesh, cfg)
        else:
            apply_ac(self.model, cfg.model.activation_checkpointing, cfg.model.ac_every_k)
            apply_compile(self.model, cfg.model.compile)
        dp_rank = self.mesh["dp"].get_local_rank() if self.mesh is not None else 0
        self.data, self.sampler, self.loader = build_data(cfg, self.task, dp_rank, self.dims.dp)
        self.opt = build_optimizer(self.owned, cfg.optim)
        self.sched = build_lr_scheduler(self.opt, cfg.optim, cfg.train.steps)
        self.ema = EMA(self.owned, cfg.train.ema_decay) if cfg.train.ema else None
        self.ckpt = CheckpointManager(cfg.checkpoint, config=cfg)
        self.amp = cfg.train.mixed_precision == "bf16"
        # autocast keeps a bf16 copy of every weight until the forward ends: full-size, so with sharded
        # weights (FSDP2) it would undo the sharding; there the copies are made per use instead
        self.amp_cache = not (self.dims.fsdp or self.pipe is not None)
        self.skipped = self.bad_streak = 0  # steps dropped by the numerics guard: in all, in a row

    def _batches(self):
        """Endless batches; the sampler starts the next epoch when one ends."""
        while True:
            yield from self.loader
            if hasattr(self.data, "report"):
                self.data.report()

    def fit(self) -> list[float]:
        """Train to `train.steps`, resuming if a checkpoint exists; returns the per-step losses."""
        cfg = self.cfg
        start, data_state = self._resume()
        log = MetricsLogger(
            cfg.logging,
            cfg.train.steps,
            start_step=start,
            device=self.device,
            compute_dtype=torch.bfloat16 if self.amp else torch.float32,
        )
        losses: list[float] = []
        batches = self._batches()
        self.model.train()
        for step in range(start + 1, cfg.train.steps + 1):
            t0 = time.perf_counter()
            self.opt.zero_grad(set_to_none=True)
            g = step_generator(cfg.train.seed, step)  # per-sample streams are keyed off it (tasks)
            run = self._pipeline_step if self.pipe is not None else self._plain_step
            (total, count, samples, tokens), data_state = run(batches, g, data_state)
            grad_norm = self._finish_grads(count)
            lr = self.opt.param_groups[0]["lr"]
            loss = (total / count).item()
            # the numerics guard: loss and grad norm are one host number each (the norm is one reduction
            # over every gradient, equal on every rank), so checking them adds no sync per parameter
            finite = math.isfinite(loss) and math.isfinite(grad_norm)
            if finite:
                self._update()
                self.bad_streak = 0
            else:
                self._bad_step(step, loss, grad_norm, log)
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
                    "skipped_steps": self.skipped,
                }
            )
            self.ckpt.maybe_save(
                step, cfg.train.steps, self.owned, self.opt, self.sched, ema=self.ema, data_state=data_state
            )
        log.close()
        if hasattr(self.data, "report"):
            self.data.report()
        if self.skipped and self.rank == 0:
            print(
                f"train: skipped {self.skipped} step(s) with a non-finite loss or gradient (train.nan_policy=skip)"
            )
        return losses

    def _bad_step(self, step: int, loss: float, grad_norm: float, log) -> None:
        """A non-finite loss or gradient: drop the update (the lr schedule still advances, so the rate stays a
        function of the step number); stop at once under nan_policy=stop, or after max_bad_steps in a row."""
        t = self.cfg.train
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        self.skipped += 1
        self.bad_streak += 1
        what = f"step {step}: loss {loss}, grad norm {grad_norm} (not finite)"
        if t.nan_policy == "skip" and self.bad_streak < t.max_bad_steps:
            if self.rank == 0:
                print(f"train: {what}; update skipped (train.nan_policy=skip, {self.bad_streak} in a row)")
            return
        log.close()
        last = self.ckpt.latest_step()
        why = (
            f"train.nan_policy=skip and {self.bad_streak} bad steps in a row (train.max_bad_steps={t.max_bad_steps})"
            if t.nan_policy == "skip"
            else "train.nan_policy=stop"
        )
        raise TrainingDiverged(
            f"{what}; stopped ({why}). Nothing was saved from this step"
            + (f"; the newest checkpoint, {last}, holds the last finite weights" if last else "")
            + ". Lower optim.lr, set train.grad_clip, check the data, or set train.nan_policy=skip to drop "
            "such steps"
        )

    # ---- the steps of one optimizer step -----------------------------------------------------------
    def _resume(self) -> tuple[int, dict | None]:
        """(the step to continue after, the sampler state) from the latest checkpoint; (0, None) fresh."""
        resumed = self.ckpt.resume(
            self.owned, self.opt, self.sched, ema=self.ema, total_steps=self.cfg.train.steps
        )
        if resumed is None:
            return 0, None
        # the schedule of this config from the saved step: a new optim.lr is the new base, a new
        # train.steps continues the decay from the rate reached (train/lr.py)
        note = rebase_scheduler(
            self.sched, self.opt, self.cfg.optim, self.cfg.train.steps, resumed.step, resumed.scheduler
        )
        if note and self.rank == 0:
            print(f"resume: {note}", flush=True)
        if resumed.data_state:
            self.sampler.load_state_dict(resumed.data_state)
        return resumed.step, resumed.data_state

    def _autocast(self):
        return torch.autocast(
            self.device.type, torch.bfloat16, enabled=self.amp, cache_enabled=self.amp_cache
        )

    def _pipeline_step(self, batches, g: torch.Generator, data_state):
        """All micro-batches of the step through the pipeline at once; returns the global
        (loss sum, count, samples, tokens) and the sampler state after the last micro-batch."""
        micro = [next(batches) for _ in range(self.accum)]
        data_state = micro[-1].get("data_state", data_state)
        with self._autocast():
            preps = [self.task.prepare(b, g) for b in micro]
            preps = [{k: v for k, v in pr.items() if v is not None} for pr in preps]
            loss_sum, count = self.pipe.step(preps)  # count: complete; the loss: partial over cp/tp
        total = self.plan.reduce_stats(loss_sum.detach().double().cpu().reshape(1))[0]
        samples = tokens = 0
        for pr in preps:
            n, t = _counts(pr)
            samples, tokens = samples + n, tokens + t
        if self.dims.dp > 1:
            stats = torch.tensor([total.item(), count, samples, tokens], dtype=torch.float64)
            dist.all_reduce(stats, group=self.mesh["dp"].get_group())
            total, count, samples, tokens = stats[0], int(stats[1]), int(stats[2]), int(stats[3])
        self.plan.finalize_grads()  # tp partials (FSDP2 summed the rest over dp x cp)
        return (total, count, samples, tokens), data_state

    def _plain_step(self, batches, g: torch.Generator, data_state):
        """Gradient accumulation over `accum` micro-batches, one process or under a plan; returns the
        global (loss sum, count, samples, tokens) and the sampler state after the last micro-batch."""
        total = torch.zeros((), dtype=torch.float64)
        count, samples, tokens = 0, 0, 0
        for _ in range(self.accum):
            batch = next(batches)
            data_state = batch.get("data_state", data_state)
            with self._autocast():
                if self.plan is None:
                    out = self.task.loss(batch, g)
                else:
                    out = self.plan(self.task.prepare(batch, g))
            out.loss_sum.backward()
            total += out.loss_sum.detach().double()
            count += int(out.count)
            samples, tokens = samples + out.samples, tokens + out.tokens
        if self.plan is not None:  # gradients: FSDP2 summed them over dp x cp; tp partials here
            self.plan.finalize_grads()
            total, count, samples, tokens = self._reduce_stats(total, count, samples, tokens)
        return (total, count, samples, tokens), data_state

    def _finish_grads(self, count: int) -> torch.Tensor:
        """Mean over everything the step saw, then clip; returns the global gradient norm."""
        for p in self.owned.parameters():
            if p.grad is not None:
                p.grad.div_(count)
        return clip_grad_norm_(
            [p for p in self.owned.parameters() if p.grad is not None],
            self.cfg.train.grad_clip,
            extra_group=self.mesh["pp"].get_group() if self.pipe is not None else None,
            norm_params=self.pipe.unique_parameters() if self.pipe is not None else None,
        )

    def _update(self) -> None:
        """Optimizer, lr schedule and EMA."""
        self.opt.step()
        self.sched.step()
        if self.ema is not None:
            self.ema.update(self.owned)

    # ---- set-up --------------------------------------------------------------------------------
    def _build_pipeline(self) -> None:
        """Split the model into this rank's pipeline stages (parallel/pp.py), FSDP2 per stage over the
        data-parallel ranks, and the schedule that runs the step's micro-batches."""
        from torch.distributed.fsdp import fully_shard

        from mmkit.parallel.pp import Pipeline, merge_stages, split_stages

        cfg, d = self.cfg, self.dims
        pp_mesh = self.mesh["pp"]
        layers = cfg.parallel.pp_layers
        nested = bool(layers) and all(isinstance(x, (list, tuple)) for x in layers)
        virtual = len(layers) if nested else (2 if cfg.parallel.pp_schedule == "interleaved_1f1b" else 1)
        stages = split_stages(
            self.model, cfg.model.family, d.pp, pp_mesh.get_local_rank(), layers if not nested or virtual > 1
            else layers[0], virtual=virtual, plan=self.plan,
        )  # fmt: skip
        if d.fsdp:
            dp_mesh = (
                self.mesh["dp_replicate", "dp_shard_cp"] if d.dp_replicate > 1 else self.mesh["dp_shard_cp"]
            )
            for st in stages:
                fully_shard(st, mesh=dp_mesh)
                st.set_gradient_divide_factor(1.0)
                st.set_force_sum_reduction_for_comms(True)
        seq_len = cfg.data.cutoff_len if registry.get(cfg.model.family).packed else None  # fixed-length rows
        self.pipe = Pipeline(
            stages, cfg.model.family, pp_mesh.get_group(), cfg.parallel.pp_schedule, self.accum, self.device,
            seq_len=seq_len, tied_group=self._tied_group(),
        )  # fmt: skip
        self.owned = merge_stages(stages)

    def _tied_group(self):
        """With tied Qwen embeddings and pp > 2: a group of the first- and last-stage ranks of this rank's
        pipeline (their copies' gradients are summed; middle ranks hold none and get None). None with pp = 2
        (the pp group is that pair) or untied embeddings."""
        cfg = self.model.cfg
        if self.dims.pp <= 2 or not getattr(cfg, "tie_word_embeddings", False):
            return None
        ranks = self.mesh.mesh.reshape(self.dims.pp, -1)  # (pp, the other dimensions flattened)
        mine = None
        for j in range(ranks.shape[1]):  # every rank creates every group, in the same order
            pair = [int(ranks[0, j]), int(ranks[-1, j])]
            g = dist.new_group(pair, timeout=process_group_timeout())
            if self.rank in pair:
                mine = g
        return mine

    def _reduce_stats(self, total, count, samples, tokens):
        """Loss sum, count and tokens are partial over sequence shards and data ranks; samples over data ranks."""
        stats = torch.tensor([total.item(), count, tokens], dtype=torch.float64)
        self.plan.reduce_stats(stats)
        per_dp = torch.tensor([*stats.tolist(), samples], dtype=torch.float64)
        if self.dims.dp > 1:
            dist.all_reduce(per_dp, group=self.mesh["dp"].get_group())
        return per_dp[0], int(per_dp[1]), int(per_dp[3]), int(per_dp[2])

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Leave the process group (with a barrier first: gloo can abort a rank exiting early)."""
        if self.world > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
