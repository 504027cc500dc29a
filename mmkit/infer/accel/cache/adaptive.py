"""Adaptive step cache: each step decides from a cheap signal whether to run the blocks or reuse them.

One knob, `threshold`: the step reuses the cached residual of the skipped blocks while the signal,
accumulated since the last computed step, stays below it. Two signals:

- `"first_block"` (FBCache-like): block 0 always runs; the signal is the relative L1 change of its
  residual since the last computed step (`mean|r0 - r0_ref| / mean|r0_ref|`), times `scale` (from
  calibration: how much the skipped residual changes per unit of first-block change, 1.0 without).
  Blocks 1..N-1 are skipped.
- `"magnitude"` (MagCache-like, needs calibration): no block runs to decide; the calibration curve
  gives, per timestep, how fast the whole residual's magnitude ratio drifts from 1 (per unit of
  timestep), so the accumulated error is `sum rate(t) * |dt|`. All blocks are skipped. The curve is
  indexed by timestep, not by step number, but a calibration does not reliably carry over to another
  step count (measured on a tiny 8-block Wan: a 50-step calibration used at 20 steps lost 7 dB PSNR
  at threshold 0.1 against one made at 20 steps): calibrate at the step count you sample with;
  `mmkit generate` warns when they differ.

Optional: `max_skips` consecutive skipped steps at most; `taylor` forecasts the skipped residual as a
first-order Taylor step in the timestep from the last two computed residuals
(`R_k + (R_k - R_j) / (t_k - t_j) * (t - t_k)`) instead of reusing `R_k`; `warmup` first steps
always run. State is per guidance branch (cond and uncond decide independently).

Multi-process: every rank of one video must take the same decision. Under sequence parallelism each
rank holds a shard of the tokens; the first-block signal's sums run over the whole sequence's real
tokens (`hooks.token_sums`: partial sums all-gathered over the sequence group and added in rank
order), so every rank computes the single-process signal, bit for bit the same on every rank. Under
CFG parallelism each half runs one branch and keeps that branch's state, as one process does. The
magnitude signal depends on the timestep only. `decide` can also all-reduce (max) any signal over a
`process_group` given in the config.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mmkit.infer.accel.cache.common import register, repeated_blocks, step_counter
from mmkit.infer.accel.hooks import ModelHook, token_sums
from mmkit.infer.guidance import current_cfg_branch

HOOK = "mmkit_cache_adaptive"
SIGNALS = ("first_block", "magnitude")


@dataclass
class AdaptiveCacheConfig:
    """`threshold` (the one knob; <= 0 never skips), `signal`, `max_skips` (None: unbounded), `taylor`,
    `warmup` steps that always run, `scale` (first_block) and `calibration` (a dict or JSON path from
    `calibrate_adaptive`; required by "magnitude", gives `scale` for "first_block").

    The defaults (first-block signal, threshold 0.15, 5 warm-up steps) skipped 61% of the block
    evaluations of a tiny 8-block Wan at 50 steps at 38.5 dB mean PSNR (worst prompt 30.7 dB), with
    its one-sample calibration (scale 1.17).
    Example: `AdaptiveCacheConfig(threshold=0.15, max_skips=3, taylor=True)`.
    """

    threshold: float = 0.15
    signal: str = "first_block"
    max_skips: int | None = None
    taylor: bool = False
    warmup: int = 5
    scale: float | None = None
    calibration: dict | str | None = None
    process_group: object = field(default=None, repr=False, compare=False)
    method = "adaptive"

    def validate(self) -> AdaptiveCacheConfig:
        if self.signal not in SIGNALS:
            raise ValueError(f"adaptive_cache.signal={self.signal!r}: choose one of {SIGNALS}")
        if self.max_skips is not None and (not isinstance(self.max_skips, int) or self.max_skips < 0):
            raise ValueError(f"adaptive_cache.max_skips={self.max_skips!r}: an integer >= 0, or null")
        if not isinstance(self.warmup, int) or self.warmup < 1:
            raise ValueError(f"adaptive_cache.warmup={self.warmup!r}: an integer >= 1 (step 0 always runs)")
        if isinstance(self.calibration, (str, Path)):
            self.calibration = load_calibration(self.calibration)
        if self.signal == "magnitude" and not self.calibration:
            raise ValueError(
                "adaptive_cache.signal='magnitude' needs a calibration: run `mmkit accel calibrate` and pass "
                "its JSON as calibration"
            )
        if self.scale is None:
            self.scale = float((self.calibration or {}).get("first_block_scale", 1.0))
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("process_group")
        return {"method": self.method, **d}


def load_calibration(path) -> dict:
    """A calibration JSON written by `calibrate_adaptive` / `mmkit accel calibrate`."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"adaptive_cache.calibration: file not found: {p} (run `mmkit accel calibrate`)"
        )
    return json.loads(p.read_text())


def decide(signal: float, threshold: float, group=None) -> tuple[bool, float]:
    """(skip, signal): skip when `signal < threshold`; with a process group the signal is first
    all-reduced to its maximum, so every rank takes the same decision.

    Example: `skip, s = decide(0.03, 0.1, group=sp_group)`.
    """
    if group is not None:
        import torch.distributed as dist

        t = torch.tensor([signal], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        signal = float(t[0])
    return signal < threshold, signal


def rel_l1(a: torch.Tensor, ref: torch.Tensor) -> float:
    """sum|a - ref| / sum|ref| over the tokens (B, S, D) (the whole sequence's, under token shards)."""
    a, ref = a.float(), ref.float()
    num, den = token_sums((a - ref).abs(), ref.abs())
    return num / max(den, 1e-12)


def _rate_at(curve: dict, t: float) -> float:
    """The calibrated drift rate at timestep t (linear interpolation; curves store t descending)."""
    ts, rates = np.asarray(curve["t"], dtype=np.float64), np.asarray(curve["rate"], dtype=np.float64)
    order = np.argsort(ts)
    return float(np.interp(t, ts[order], rates[order]))


class _AdaptiveHook(ModelHook):
    """On every block; block 0 decides for the step, the region's first block adds the cached residual,
    the last block stores the new residual."""

    def __init__(self, counter, cfg: AdaptiveCacheConfig, index: int, num_blocks: int, recorder=None):
        self.counter, self.cfg, self.index, self.n = counter, cfg, index, num_blocks
        self.start = 1 if cfg.signal == "first_block" else 0  # first block of the skipped region
        self.recorder = recorder

    # -- the decision, taken once per step at block 0 -------------------------------------------------
    def _decide(self, s: dict, r0: torch.Tensor | None) -> None:
        cfg, step = self.cfg, s["step"]
        if cfg.signal == "first_block":
            signal = rel_l1(r0, s["ref_r0"]) * cfg.scale if s.get("ref_r0") is not None else float("inf")
        else:
            curve = cfg.calibration["magnitude"][current_cfg_branch() or "cond"]
            dt = abs(s["t"] - s["t_prev"]) if s.get("t_prev") is not None else 0.0
            signal = s.get("acc", 0.0) + _rate_at(curve, s["t"]) * dt
        can = (
            step >= cfg.warmup
            and s.get("R") is not None
            and (cfg.max_skips is None or s.get("run", 0) < cfg.max_skips)
        )
        skip, signal = decide(signal if can else float("inf"), cfg.threshold, cfg.process_group)
        s["skip"] = skip
        s["run"] = s.get("run", 0) + 1 if skip else 0
        if cfg.signal == "magnitude":
            s["acc"] = signal if skip else 0.0
        if not skip and r0 is not None:
            s["ref_r0"] = r0
        if self.recorder is not None and r0 is not None and s.get("prev_r0") is not None:
            self.recorder.setdefault("d", {})[(current_cfg_branch(), step)] = rel_l1(r0, s["prev_r0"])
        s["prev_r0"] = r0 if self.recorder is not None else None
        s["t_prev"] = s["t"]

    def _forecast(self, s: dict) -> torch.Tensor:
        R = s["R"]
        if self.cfg.taylor and s.get("R_prev") is not None and s["t_R"] != s["t_R_prev"]:
            slope = (R - s["R_prev"]) / (s["t_R"] - s["t_R_prev"])
            return R + slope * (s["t"] - s["t_R"])
        return R

    def new_forward(self, module: nn.Module, x, *rest, **kwargs):
        s, stats = self.counter.state, self.counter.stats
        if self.index == 0 and self.start == 0:
            self._decide(s, None)
        if self.index >= self.start and s.get("skip"):
            stats.blocks_skipped += 1
            return x + self._forecast(s) if self.index == self.start else x
        stats.blocks_run += 1
        if self.index == self.start:
            s["x_in"] = x
        out = self.call_inner(x, *rest, **kwargs)
        if self.index == 0 and self.start == 1:
            self._decide(s, out - x)  # block 0's residual, (B, S, D)
        if self.index == self.n - 1:
            R = out - s.pop("x_in")  # what the region added, (B, S, D)
            if self.recorder is not None and s.get("R") is not None:
                rec = self.recorder.setdefault("R", {})
                a, b = R.float().abs().mean(), s["R"].float().abs().mean()
                rec[(current_cfg_branch(), s["step"])] = (s["t"], s["t_R"], rel_l1(R, s["R"]), float(a / b))
            s["R_prev"], s["t_R_prev"] = s.get("R"), s.get("t_R")
            s["R"], s["t_R"] = R, s["t"]
        return out


def apply_adaptive_cache(
    transformer: nn.Module, cfg: AdaptiveCacheConfig, recorder: dict | None = None
) -> None:
    """Install the adaptive cache; `remove_cache(transformer)` undoes it. `recorder` (a dict) collects
    the per-step signals that `calibrate_adaptive` fits.

    Example: `apply_adaptive_cache(pipe.transformer, AdaptiveCacheConfig(threshold=0.08, taylor=True))`.
    """
    cfg.validate()
    blocks = repeated_blocks(transformer)
    if cfg.signal == "first_block" and len(blocks) < 2:
        raise ValueError("adaptive_cache.signal='first_block' needs a model with at least 2 blocks")
    counter = step_counter(transformer)
    for i, block in enumerate(blocks):
        register(block, _AdaptiveHook(counter, cfg, i, len(blocks), recorder), HOOK)


def fit_calibration(recorder: dict, steps: int) -> dict:
    """The calibration JSON from one never-skipping recorded generation (see `calibrate_adaptive`).

    `first_block_scale`: least-squares a in `change(skipped residual) ~ a * change(first-block residual)`
    over consecutive steps; `magnitude[branch]`: per timestep, |1 - magnitude ratio| of the whole
    residual per unit of timestep (the drift rate), ordered by descending t.
    """
    d, R = recorder.get("d", {}), recorder.get("R", {})
    keys = [k for k in R if k in d]
    xs = np.array([d[k] for k in keys]), np.array([R[k][2] for k in keys])
    scale = float((xs[0] * xs[1]).sum() / max((xs[0] ** 2).sum(), 1e-12)) if keys else 1.0
    mag: dict[str, dict] = {}
    for (branch, _step), (t, t_prev, _change, ratio) in sorted(R.items(), key=lambda kv: kv[0][1]):
        curve = mag.setdefault(branch or "cond", {"t": [], "rate": []})
        curve["t"].append(t)
        curve["rate"].append(abs(1.0 - ratio) / max(abs(t_prev - t), 1e-6))
    return {"steps": steps, "first_block_scale": scale, "magnitude": mag}


def calibrate_adaptive(pipe, prompt: str, steps: int = 50, **gen_kwargs) -> dict:
    """Calibration from one sample: one uncached generation with the signals recorded, then
    `fit_calibration`. The result (a dict, JSON-ready) goes to `AdaptiveCacheConfig(calibration=...)`.

    Example: `calib = calibrate_adaptive(pipe, "a red circle moves left", steps=50, height=480, width=832)`.
    """
    from mmkit.infer.accel.cache import remove_cache

    recorder: dict = {}
    apply_adaptive_cache(pipe.transformer, AdaptiveCacheConfig(threshold=0.0), recorder)
    try:
        pipe(prompt, num_inference_steps=steps, output_type="latent", **gen_kwargs)
    finally:
        remove_cache(pipe.transformer)
    return fit_calibration(recorder, steps)
