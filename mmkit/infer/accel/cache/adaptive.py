"""Adaptive step cache: each step decides from a cheap signal whether to run the model or reuse it.

One knob, `threshold`, on an estimate of the error the skipped steps put into the sample. Per
guidance branch, `drift` is the skipped residual's relative L1 change since the last computed step
and each skipped step adds `weight(sigma) * drift * |d sigma|` to `err` (the residual's error times the
sigma the step moves the sample by, times how much an error at that sigma changes the final video);
a step is skipped while `err` stays below the threshold, and a computed step resets both (as TeaCache
and MagCache reset their accumulators). Two signals give the drift:

- `"magnitude"` (MagCache-like, needs a calibration; the default when one is given): nothing runs
  to decide; the calibration's curve gives, per sigma, the whole residual's relative L1 change per
  unit of sigma, so each step adds `rate(sigma) * |d sigma|` to the drift. A skipped step skips the
  whole model call (embeddings and head too): the hook sits on the transformer and returns the last
  computed output (or its Taylor step). Every branch reads the largest of the branches' rates, so cond
  and uncond take one decision per step: a step where one branch is forecast and the other computed
  multiplies the forecast's error by the guidance scale (on the shapes model, per-branch curves
  disagreed on 24 of 50 steps at threshold 0.005 and 4 prompts fell to 10-17 dB; with one decision,
  23-36 dB).
- `"first_block"` (the default without calibration): block 0 always runs; each step adds the relative
  L1 change of block 0's residual since the previous step, times the calibrated scale at this sigma
  (the skipped blocks' change per unit of block-0 change; 1.0 without calibration). Blocks 1..N-1
  are skipped and their residual reused.

`weight(sigma)` is the calibration's sensitivity curve (`probe_sensitivity`, 1 without one): one
generation per probed step that skips that step alone, its final latents' change divided by the
error the signal estimates for that skip. On the shapes Wan model a skip above sigma 0.9 changes the
final latents 3.5-8.7x more than the median step at the same estimated error, and one at the last step
3x more; without the weight the cache skipped there as readily as in the middle.

Why one calibration and threshold serve 20, 30 and 50 steps: the drift and the error are sums of
(change per unit of sigma) x (sigma moved), so they measure sigma, not steps; the curves are indexed
by sigma; the guard band `sigma_max` (steps above it always run: the layout forms there) and
`sigma_min` are sigmas. Sigma is the model's timestep / 1000 (flow matching, sigma from 1 to 0).
Fewer steps skip a smaller fraction at the same threshold (each step moves further), by design.
`warmup` counts steps; `max_skips` counts steps of a 50-step schedule (see below).

Optional: `max_skips` consecutive skipped steps at most, counted in steps of a 50-step schedule: a run
whose sigma steps are larger than a 50-step schedule's at the same sigma (read from the calibration's
schedule and step count) allows proportionally fewer (`floor(max_skips * 50-step step / this step)`, at
least 1), so a run of skips covers about the same sigma at 20, 30 or 50 steps.

`forecast`, what a skipped step returns: `"reuse"` the last computed tensor (the output, or the blocks'
residual); `"taylor"` a first-order step in sigma from the last two computed ones
(`R_k + (R_k - R_j) / (t_k - t_j) * (t - t_k)`); `"noise"` (magnitude signal, models that predict the
flow velocity: `_prediction = "flow"` on the transformer, as Wan) holds the predicted noise of the last
computed step, `eps_k = x_k + (1 - sigma_k) v_k`, and returns the velocity that matches it at this
step's input, `(eps_k - x) / (1 - sigma)`; the predicted clean sample moves with the input;
`"noise_taylor"` moves that noise by half its last slope, `eps_k + 0.5 (eps_k - eps_j) / (sigma_k -
sigma_j) (sigma - sigma_k)` (`NOISE_SLOPE`: on the shapes model at threshold 0.008, 8 prompts, mean PSNR
39.1, 40.6 and 39.0 dB for 0.3, 0.5 and 0.7, 33.8 for the full slope, 36.3 for none). None: `"noise_taylor"` where the model predicts flow velocity,
else `"reuse"`.

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
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from mmkit.infer.accel.cache.common import repeated_blocks, step_counter
from mmkit.infer.accel.hooks import ModelHook, register, token_sums
from mmkit.infer.guidance import current_cfg_branch

HOOK = "mmkit_cache_adaptive"
SIGNALS = ("first_block", "magnitude")
T_SCALE = 1000.0  # the model's timestep is sigma * 1000 (num_train_timesteps of Wan's flow schedulers)


# Per-signal defaults of the fields left None, chosen on the shapes Wan model at 50 steps (see
# docs/acceleration.md, "Measured"): magnitude 0.01 on the sensitivity-weighted error, no limit on a
# run of skips, steps above sigma 0.94 always run; first_block 0.005, above sigma 0.95.
FORECASTS = ("reuse", "taylor", "noise", "noise_taylor")
# "noise_taylor" takes no slope where this run's sigma step is over 1 / 0.9 of a 50-step schedule's (measured
# at 30 and 20 steps on the shapes model: worst prompt 22.1 and 14.6 dB with the slope, 28.9 and 21.2 without)
NOISE_TAYLOR_MIN_RATIO = 0.9
NOISE_SLOPE = 0.5  # the share of the predicted noise's last slope "noise_taylor" extrapolates (measured)
DEFAULTS = {
    "magnitude": {"threshold": 0.01, "max_skips": None, "sigma_max": 0.94},
    "first_block": {"threshold": 0.005, "max_skips": None, "sigma_max": 0.95},
}
CALIBRATION_VERSION = 3  # sigma-indexed curves with the relative-change rate and the sensitivity probes


@dataclass
class AdaptiveCacheConfig:
    """`threshold` (the one knob: the estimated error of the skipped steps, sensitivity-weighted
    relative residual change x sigma; <= 0 never skips), `signal` ("magnitude" with a calibration, else
    "first_block"), `max_skips` in a row (None: unbounded), `forecast` ("reuse", "taylor", "noise",
    "noise_taylor"; None: "noise_taylor" for flow-velocity models under the magnitude signal, else "reuse"), `warmup` first steps that always
    run, the sigma guard band [`sigma_min`, `sigma_max`] outside which steps always run, `scale` (a
    constant first-block scale instead of the calibrated curve) and `calibration` (a dict or JSON path
    from `calibrate_adaptive`). None fields take the signal's `DEFAULTS`.

    With a 50-step calibration (12 sensitivity probes) on the retrained shapes Wan asset, the defaults
    skipped 64% of the block evaluations at 50 steps (2.58x on the denoise loop) at 37.9 dB mean PSNR
    against the uncached video, worst of 8 prompts 31.0 dB (docs/acceleration.md, "Measured").
    Example: `AdaptiveCacheConfig(calibration="calib.json")`, `AdaptiveCacheConfig(0.005, max_skips=3)`.
    """

    threshold: float | None = None
    signal: str | None = None
    max_skips: int | None = -1  # -1: the signal's default
    forecast: str | None = None
    warmup: int = 1
    sigma_max: float | None = None
    sigma_min: float = 0.0
    scale: float | None = None
    calibration: dict | str | None = None
    process_group: object = field(default=None, repr=False, compare=False)
    method = "adaptive"

    def validate(self) -> AdaptiveCacheConfig:
        if isinstance(self.calibration, (str, Path)):
            self.calibration = load_calibration(self.calibration)
        if self.signal is None:
            self.signal = "magnitude" if self.calibration else "first_block"
        if self.signal not in SIGNALS:
            raise ValueError(f"adaptive_cache.signal={self.signal!r}: choose one of {SIGNALS}")
        if self.signal == "magnitude" and not self.calibration:
            raise ValueError(
                "adaptive_cache.signal='magnitude' needs a calibration: run `mmkit accel calibrate` and pass "
                "its JSON as calibration"
            )
        if self.calibration and self.calibration.get("version") != CALIBRATION_VERSION:
            raise ValueError(
                f"adaptive_cache.calibration: version {self.calibration.get('version')!r}, this mmkit reads "
                f"version {CALIBRATION_VERSION}: rerun `mmkit accel calibrate`"
            )
        defaults = DEFAULTS[self.signal]
        if self.threshold is None:
            self.threshold = defaults["threshold"]
        if self.forecast is not None and self.forecast not in FORECASTS:
            raise ValueError(
                f"adaptive_cache.forecast={self.forecast!r}: choose one of {FORECASTS} (or null)"
            )
        if self.forecast in ("noise", "noise_taylor") and self.signal != "magnitude":
            raise ValueError(
                f"adaptive_cache.forecast={self.forecast!r} forecasts the model's predicted noise and needs "
                "signal='magnitude'; the first-block signal forecasts the blocks' residual ('reuse' or 'taylor')"
            )
        if self.max_skips == -1:
            self.max_skips = defaults["max_skips"]
        if self.sigma_max is None:
            self.sigma_max = defaults["sigma_max"]
        if self.max_skips is not None and (not isinstance(self.max_skips, int) or self.max_skips < 0):
            raise ValueError(f"adaptive_cache.max_skips={self.max_skips!r}: an integer >= 0, or null")
        if not isinstance(self.warmup, int) or self.warmup < 1:
            raise ValueError(f"adaptive_cache.warmup={self.warmup!r}: an integer >= 1 (step 0 always runs)")
        if not 0.0 <= self.sigma_min <= self.sigma_max <= 1.0:
            raise ValueError(
                f"adaptive_cache.sigma_min={self.sigma_min}, sigma_max={self.sigma_max}: need "
                "0 <= sigma_min <= sigma_max <= 1 (steps with sigma outside [sigma_min, sigma_max] always run)"
            )
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


def curve_at(curve: dict, key: str, sigma: float) -> float:
    """A calibration curve's `key` at `sigma` (linear interpolation; curves store sigma descending)."""
    xs, ys = np.asarray(curve["sigma"], dtype=np.float64), np.asarray(curve[key], dtype=np.float64)
    order = np.argsort(xs)
    return float(np.interp(sigma, xs[order], ys[order]))


def step_signal(cfg: AdaptiveCacheConfig, s: dict, r0: torch.Tensor | None, branch: str) -> float:
    """The estimated error if this step is skipped: `s["err"] + drift * |d sigma|`, with `drift` the
    skipped residual's relative change since the last computed step (`s["drift"]` plus this step's
    term, kept in `s["drift_now"]`); inf when the step must run (no cached residual yet, warm-up, or
    sigma outside [sigma_min, sigma_max]). `r0` is block 0's residual (first_block signal).

    Example: `skip, signal = decide(step_signal(cfg, state, r0, "cond"), cfg.threshold, group)`.
    """
    sigma, prev = s["t"] / T_SCALE, s.get("t_prev")
    s["drift_now"] = math.inf
    if (
        s.get("R") is None
        or prev is None
        or s["step"] < cfg.warmup
        or not cfg.sigma_min <= sigma <= cfg.sigma_max
    ):
        return math.inf
    dsigma = abs(sigma - prev / T_SCALE)  # the last step's sigma move, for this step's
    if cfg.signal == "first_block":
        term = rel_l1(r0, s["r0_prev"])
        if cfg.scale is not None:
            term *= cfg.scale
        elif cfg.calibration:
            term *= curve_at(cfg.calibration["first_block"][_key(cfg, branch)], "scale", sigma)
    else:  # every branch reads the largest of the branches' rates: one decision per step for all of them
        term = max(curve_at(c, "rate", sigma) for c in cfg.calibration["magnitude"].values()) * dsigma
    s["drift_now"] = s.get("drift", 0.0) + term
    return s.get("err", 0.0) + sensitivity_at(cfg.calibration, sigma) * s["drift_now"] * dsigma


def sensitivity_at(calibration: dict | None, sigma: float) -> float:
    """The calibration's sensitivity weight at `sigma` (1.0 without a sensitivity curve): how much a
    skipped step's error here changes the final latents, relative to the median step (`probe_sensitivity`).

    Example: `sensitivity_at(load_calibration("calib.json"), 0.9)  # > 1: early steps weigh more`.
    """
    curve = (calibration or {}).get("sensitivity")
    if not curve:
        return 1.0
    return curve_at(curve, "weight", sigma)


MAX_SKIPS_STEPS = 50  # `max_skips` counts steps of a schedule of this many steps (Wan's default)


def calibration_step(calibration: dict | None, sigma: float) -> float | None:
    """The calibration run's sigma step at `sigma` (interpolated; None without a calibration curve).

    Example: `calibration_step(load_calibration("calib.json"), 0.5)  # ~0.027 for 50 steps, shift 3`.
    """
    curves = (calibration or {}).get("magnitude") or {}
    curve = next(iter(curves.values()), None)  # every branch ran the same schedule
    if curve is None or len(curve["sigma"]) < 2:
        return None
    xs = np.asarray(curve["sigma"], dtype=np.float64)  # descending
    steps = np.abs(np.diff(xs))
    return float(np.interp(sigma, xs[1:][::-1], steps[::-1]))


def step_ratio(cfg: AdaptiveCacheConfig, s: dict) -> float | None:
    """The sigma step a `MAX_SKIPS_STEPS`-step schedule takes at this step's sigma (the calibration's step
    there, rescaled by its step count) over this run's last sigma step: 1 at 50 steps, 0.4 at 20; None
    without a calibration or before the second step."""
    prev = s.get("t_prev")
    made_at = (cfg.calibration or {}).get("steps")
    ref = calibration_step(cfg.calibration, s["t"] / T_SCALE)
    if prev is None or ref is None or not made_at or s["t"] == prev:
        return None
    return ref * made_at / MAX_SKIPS_STEPS / (abs(s["t"] - prev) / T_SCALE)


def skip_limit(cfg: AdaptiveCacheConfig, s: dict) -> int:
    """`cfg.max_skips` at this step. It counts steps of a `MAX_SKIPS_STEPS`-step schedule: where this
    run's sigma step is larger than such a schedule's at the current sigma (`step_ratio` < 1),
    proportionally fewer, at least 1. Example: 4 at 50 steps, 2 at 30 and 1 at 20, whatever step count
    the calibration was made at."""
    ratio = step_ratio(cfg, s)
    if ratio is None or ratio >= 1.0:
        return cfg.max_skips
    return max(1, math.floor(cfg.max_skips * ratio + 1e-6))


def _key(cfg: AdaptiveCacheConfig, branch: str) -> str:
    curves = cfg.calibration["magnitude" if cfg.signal == "magnitude" else "first_block"]
    return branch if branch in curves else "cond"


def _take_decision(cfg: AdaptiveCacheConfig, s: dict, r0: torch.Tensor | None, recorder: dict | None) -> None:
    """Decide this step for the current branch (signal -> run limit -> reduce -> decide) and update `s`.
    A calibration's probe run (`recorder["force"]`, a set of steps) skips exactly those steps."""
    branch = current_cfg_branch() or "cond"
    signal = step_signal(cfg, s, r0, branch)
    if cfg.max_skips is not None and s.get("run", 0) >= skip_limit(cfg, s):
        signal = math.inf
    force = (recorder or {}).get("force")
    if force is not None:
        signal = 0.0 if s["step"] in force and s.get("R") is not None else math.inf
    skip, signal = decide(signal, cfg.threshold, cfg.process_group)
    s["skip"] = skip
    s["run"] = s.get("run", 0) + 1 if skip else 0
    s["err"] = signal if skip else 0.0
    s["drift"] = s["drift_now"] if skip else 0.0
    if recorder is not None and r0 is not None and s.get("r0_prev") is not None:
        recorder.setdefault("d", {})[(branch, s["step"])] = rel_l1(r0, s["r0_prev"])
    s["r0_prev"], s["t_prev"] = r0, s["t"]


def _forecast(forecast: str, s: dict, x: torch.Tensor | None = None) -> torch.Tensor:
    """The cached tensor `R` at this step: reused, a first-order step in sigma from the last two
    computed ones (`"taylor"`), or (`"noise"`, `R` a flow velocity) the velocity that keeps the last
    computed step's predicted noise at this step's input latents `x` (`"noise_taylor"`: that noise moved
    by `NOISE_SLOPE` of its last slope in sigma)."""
    R = s["R"]
    sigma, sigma_k = s["t"] / T_SCALE, s["t_R"] / T_SCALE
    if forecast in ("noise", "noise_taylor") and x is not None and 1.0 - sigma > 1e-3:
        eps = s["eps"]  # the noise predicted at the last computed step
        if forecast == "noise_taylor" and s.get("eps_prev") is not None and s["t_R"] != s["t_R_prev"]:
            sigma_j = s["t_R_prev"] / T_SCALE  # ... and at the one before
            eps = eps + NOISE_SLOPE * (eps - s["eps_prev"]) / (sigma_k - sigma_j) * (sigma - sigma_k)
        return (eps - x[:, : R.shape[1]].to(R.dtype)) / (1.0 - sigma)
    if forecast == "taylor" and s.get("R_prev") is not None and s["t_R"] != s["t_R_prev"]:
        slope = (R - s["R_prev"]) / (s["t_R"] - s["t_R_prev"])
        return R + slope * (s["t"] - s["t_R"])
    return R.clone()  # the caller may write into what it gets


def _store(s: dict, R: torch.Tensor) -> None:
    s["R_prev"], s["t_R_prev"] = s.get("R"), s.get("t_R")
    s["R"], s["t_R"] = R, s["t"]


class _OutputHook(ModelHook):
    """On the transformer (magnitude signal): decides each call from the timestep before anything runs;
    a skipped call returns the forecast of the model's output (`forecast`: the last computed output, its
    Taylor step, or the velocity that keeps the last predicted noise) and runs nothing, not even the
    embeddings and the head."""

    def __init__(self, counter, cfg: AdaptiveCacheConfig, num_blocks: int, forecast: str, recorder=None):
        self.counter, self.cfg, self.n, self.recorder = counter, cfg, num_blocks, recorder
        self.forecast = forecast

    def new_forward(self, module: nn.Module, *args, **kwargs):
        s, stats = self.counter.state, self.counter.stats
        x = args[0] if args else kwargs.get("latents")  # the latents (B, C, T, H, W)
        forecast = self.forecast
        if forecast == "noise_taylor" and (step_ratio(self.cfg, s) or 1.0) < NOISE_TAYLOR_MIN_RATIO:
            forecast = "noise"  # steps coarser than a 50-step schedule's: the slope would overshoot
        _take_decision(self.cfg, s, None, self.recorder)
        if s["skip"]:
            stats.blocks_skipped += self.n
            return _forecast(forecast, s, x)
        stats.blocks_run += self.n
        out = self.call_inner(*args, **kwargs)
        _store(s, out)
        if self.forecast in ("noise", "noise_taylor"):
            if x is None:
                raise ValueError(
                    f"adaptive_cache.forecast={self.forecast!r}: the model call gave no latents (first argument)"
                )
            # the predicted noise eps_k = x_k + (1 - sigma_k) v_k, once per computed step
            s["eps_prev"], s["eps"] = (
                s.get("eps"),
                x[:, : out.shape[1]].to(out.dtype) + (1.0 - s["t"] / T_SCALE) * out,
            )
        return out


class _AdaptiveHook(ModelHook):
    """On every block (first-block signal, and a calibration's recording run): block 0 decides for the
    step, the region's first block (block 1) adds the cached residual, the last block stores the new
    residual."""

    def __init__(self, counter, cfg: AdaptiveCacheConfig, index: int, num_blocks: int, recorder=None):
        self.counter, self.cfg, self.index, self.n = counter, cfg, index, num_blocks
        self.start = 1  # first block of the skipped region
        self.recorder = recorder

    def new_forward(self, module: nn.Module, x, *rest, **kwargs):
        s, stats = self.counter.state, self.counter.stats
        if self.index >= self.start and s.get("skip"):
            stats.blocks_skipped += 1
            return x + _forecast(self.cfg.forecast or "reuse", s) if self.index == self.start else x
        stats.blocks_run += 1
        if self.index == self.start:
            s["x_in"] = x
        out = self.call_inner(x, *rest, **kwargs)
        if self.index == 0:
            _take_decision(self.cfg, s, out - x, self.recorder)  # block 0's residual, (B, S, D)
        if self.index == self.n - 1:
            R = out - s.pop("x_in")  # what the region added, (B, S, D)
            if self.recorder is not None and s.get("R") is not None:
                a, b = R.float().abs().mean(), s["R"].float().abs().mean()
                key = (current_cfg_branch() or "cond", s["step"])
                self.recorder.setdefault("R", {})[key] = (s["t"], s["t_R"], rel_l1(R, s["R"]), float(a / b))
            _store(s, R)
        return out


def apply_adaptive_cache(
    transformer: nn.Module, cfg: AdaptiveCacheConfig, recorder: dict | None = None
) -> None:
    """Install the adaptive cache; `remove_cache(transformer)` undoes it. `recorder` (a dict) collects
    the per-step signals that `calibrate_adaptive` fits (first-block signal), or forces the skipped
    steps of a sensitivity probe (`recorder["force"]`).

    The magnitude signal hooks the transformer itself (a skipped call runs nothing); the first-block
    signal hooks every block (block 0 runs to decide).
    Example: `apply_adaptive_cache(pipe.transformer, AdaptiveCacheConfig(threshold=0.3, forecast="taylor"))`.
    """
    cfg.validate()
    blocks = repeated_blocks(transformer)
    if cfg.signal == "first_block" and len(blocks) < 2:
        raise ValueError("adaptive_cache.signal='first_block' needs a model with at least 2 blocks")
    flow = getattr(transformer, "_prediction", None) == "flow"
    if cfg.forecast in ("noise", "noise_taylor") and not flow:
        raise ValueError(
            f"adaptive_cache.forecast={cfg.forecast!r} needs a model that predicts the flow velocity "
            f"(`_prediction = 'flow'`); {type(transformer).__name__} does not declare it: use 'reuse' or 'taylor'"
        )
    counter = step_counter(transformer)
    if cfg.signal == "magnitude":
        forecast = cfg.forecast or ("noise_taylor" if flow else "reuse")
        register(transformer, _OutputHook(counter, cfg, len(blocks), forecast, recorder), HOOK)
        return
    for i, block in enumerate(blocks):
        register(block, _AdaptiveHook(counter, cfg, i, len(blocks), recorder), HOOK)


def _smooth(y: np.ndarray, width: int = 5) -> np.ndarray:
    """Running median over `width` neighbours (one sample's per-step ratios are noisy)."""
    h = width // 2
    return np.array([np.median(y[max(0, i - h) : i + h + 1]) for i in range(len(y))])


def fit_calibration(recorder: dict, steps: int) -> dict:
    """The calibration JSON from one never-skipping recorded generation (see `calibrate_adaptive`).

    Per branch, ordered by descending sigma:
    `first_block[branch]`: `scale(sigma)`, the skipped residual's relative change per unit of the
    first block's relative change over one step (running median of 5 steps);
    `magnitude[branch]`: `rate(sigma)`, the whole residual's relative L1 change per unit of sigma
    (and `magnitude_rate(sigma)`, |1 - its magnitude ratio| per unit of sigma, MagCache's quantity,
    for reference).
    `first_block_scale`: one least-squares scale over all steps (for reference). `steps`: the step
    count of the calibration run (the curves are indexed by sigma and serve other step counts).
    """
    d, R = recorder.get("d", {}), recorder.get("R", {})
    keys = [k for k in R if k in d]
    xs = np.array([d[k] for k in keys]), np.array([R[k][2] for k in keys])
    scale = float((xs[0] * xs[1]).sum() / max((xs[0] ** 2).sum(), 1e-12)) if keys else 1.0
    fb: dict[str, dict] = {}
    mag: dict[str, dict] = {}
    for (branch, step), (t, t_prev, change, ratio) in sorted(R.items(), key=lambda kv: kv[0][1]):
        dsigma = max(abs(t_prev - t) / T_SCALE, 1e-9)
        curve = mag.setdefault(
            branch, {"step": [], "sigma": [], "dsigma": [], "rate": [], "magnitude_rate": []}
        )
        curve["step"].append(step)
        curve["sigma"].append(t / T_SCALE)
        curve["dsigma"].append(dsigma)
        curve["rate"].append(change / dsigma)
        curve["magnitude_rate"].append(abs(1.0 - ratio) / dsigma)
        if (branch, step) in d:
            c = fb.setdefault(branch, {"sigma": [], "scale": []})
            c["sigma"].append(t / T_SCALE)
            c["scale"].append(change / max(d[(branch, step)], 1e-12))
    for c in fb.values():
        c["scale"] = [float(v) for v in _smooth(np.asarray(c["scale"]))]
    return {
        "version": CALIBRATION_VERSION,
        "steps": steps,
        "first_block_scale": scale,
        "first_block": fb,
        "magnitude": mag,
    }


# step counts / calibration step count measured to keep the quality (shapes model, 8 prompts, the
# defaults with a 50-step calibration and its sensitivity probes, against the uncached run of the same
# step count: 30 steps 35.1 dB mean, worst 28.9; 20 steps 33.9, worst 21.2, where threshold 0.007
# kept 36.5, worst 28.9, and a 20-step calibration 35.5, worst 28.6)
TRANSFER_MEASURED = (0.6, 1.0)


def transfer_note(calibration: dict, steps: int) -> str | None:
    """None when `steps` is inside the measured transfer range of a calibration made at
    `calibration["steps"]` (30 to 50 steps from a 50-step one), else a warning that names both counts.

    Example: `note = transfer_note(load_calibration("calib.json"), 30)`.
    """
    made_at = calibration.get("steps")
    lo, hi = TRANSFER_MEASURED
    if not made_at or lo <= steps / made_at <= hi:
        return None
    return (
        f"warning: the cache calibration was made at {made_at} steps and this run has --steps {steps}; "
        f"its quality was measured from {round(lo * made_at)} to {made_at} steps only: check the quality "
        f"against an uncached run; fewer steps may need a lower --cache-threshold or a calibration at this step "
        f"count (on the shapes model at 20 steps: threshold 0.007, or mmkit accel calibrate --steps {steps})"
    )


PROBES = 12  # default sensitivity probes of a calibration (each a run from its step to the end)


def probe_steps(steps: int, probes: int) -> list[int]:
    """The steps a calibration probes: `probes` spread evenly over steps 1..steps-1, the last included.

    Example: `probe_steps(50, 12) == [1, 5, 10, 14, 18, 23, 27, 32, 36, 40, 45, 49]`.
    """
    if probes <= 0 or steps < 2:
        return []
    return sorted({int(round(x)) for x in np.linspace(1, steps - 1, min(probes, steps - 1))})


class _Replay(ModelHook):
    """On the transformer, inside the cache hooks. Recording (`until` None): keeps each call's output on
    the CPU by (branch, step). Probing: returns the recorded output of every step before `until` instead
    of running the model, so a probe follows the recorded trajectory exactly up to its probed step and
    runs the model only from there (a probe at step k costs steps - k model steps, not steps)."""

    def __init__(self, counter, outputs: dict, until: int | None = None):
        self.counter, self.outputs, self.until = counter, outputs, until

    def new_forward(self, module: nn.Module, *args, **kwargs):
        key = (current_cfg_branch() or "cond", self.counter.state["step"])
        if self.until is not None:
            if key[1] < self.until and key in self.outputs:
                return self.outputs[key].to(next(module.parameters()).device, copy=True)
            return self.call_inner(*args, **kwargs)
        out = self.call_inner(*args, **kwargs)
        self.outputs[key] = out.detach().to("cpu", copy=True)
        return out


REPLAY = "mmkit_cache_replay"  # hook name (removed by remove_cache with the caches)


def probe_sensitivity(
    pipe,
    prompt: str,
    calibration: dict,
    probes: int = PROBES,
    reference=None,
    outputs: dict | None = None,
    forecast=None,
    **gen_kwargs,
) -> dict:
    """The calibration's `sensitivity` curve, measured: per probed step k, one generation that skips step
    k alone (the magnitude signal's forecast), and the relative L2 change of its final latents against
    the uncached run's, divided by the error the signal estimates for that one skip (the largest
    branch rate at sigma_k x d sigma_k^2); normalised to a median of 1. A skipped step's estimated
    error is multiplied by this weight at its sigma, so skips go where they change the video least:
    on the shapes Wan model the steps above sigma 0.9 weigh 3.5-8.7x the median, the last one 3x.

    `reference` (the uncached run's final latents) and `outputs` (its model outputs by (branch, step),
    as `_Replay` records them) come from the calibration's recorded run; without them one uncached run
    records both. The probes replay the recorded outputs before their step (`_Replay`), so the 12
    probes of a 50-step calibration cost about 6 generations, not 12.

    Example: `calib["sensitivity"] = probe_sensitivity(pipe, "a red circle moves left", calib, 12, seed=0)`.
    """
    from mmkit.infer.accel.cache import remove_cache

    steps = calibration["steps"]
    curves = list(calibration["magnitude"].values())
    first = curves[0]  # every branch ran the same schedule
    sigma_of = dict(zip(first["step"], zip(first["sigma"], first["dsigma"])))  # step -> (sigma, d sigma)
    show = gen_kwargs.pop("progress", True)
    kw = dict(gen_kwargs, num_inference_steps=steps, output_type="latent", progress=False)
    if reference is None or outputs is None:
        outputs = {}
        register(pipe.transformer, _Replay(step_counter(pipe.transformer), outputs), REPLAY)
        try:
            reference = pipe(prompt, **kw).frames
        finally:
            remove_cache(pipe.transformer)
    ref = reference.float()  # final latents
    base = {**calibration, "sensitivity": None}
    sig_out, weight, err = [], [], []
    for k in tqdm(probe_steps(steps, probes), desc="sensitivity probes", unit="probe", disable=not show):
        if k not in sigma_of:
            continue
        cfg = AdaptiveCacheConfig(1.0, "magnitude", None, forecast, sigma_max=1.0, calibration=base)
        apply_adaptive_cache(pipe.transformer, cfg, {"force": {k}})
        register(pipe.transformer, _Replay(step_counter(pipe.transformer), outputs, until=k), REPLAY)
        try:
            out = pipe(prompt, **kw).frames.float()
        finally:
            remove_cache(pipe.transformer)
        change = float((out - ref).norm() / ref.norm().clamp_min(1e-12))
        sigma, dsigma = sigma_of[k]
        estimate = max(curve_at(c, "rate", sigma) for c in curves) * dsigma * dsigma
        sig_out.append(sigma)
        err.append(change)
        weight.append(change / max(estimate, 1e-12))
    if not weight:
        return {}
    median = float(np.median(weight)) or 1.0
    return {
        "sigma": sig_out,
        "weight": [w / median for w in weight],
        "latent_change": err,
        "steps": probe_steps(steps, probes),
    }


def calibrate_adaptive(pipe, prompt: str, steps: int = 50, probes: int = PROBES, **gen_kwargs) -> dict:
    """Calibration from one sample: one uncached generation with the signals recorded
    (`fit_calibration`), then `probes` runs that each skip one step (`probe_sensitivity`, replaying the
    recorded outputs before it: about probes / 2 generations in all; 0: no sensitivity curve, every
    sigma weighs 1). The result (a dict, JSON-ready) goes to
    `AdaptiveCacheConfig(calibration=...)`.

    Example: `calib = calibrate_adaptive(pipe, "a red circle moves left", steps=50, height=480, width=832)`.
    """
    from mmkit.infer.accel.cache import remove_cache

    recorder: dict = {}
    outputs: dict = {}  # the model's outputs by (branch, step), replayed by the probes
    apply_adaptive_cache(pipe.transformer, AdaptiveCacheConfig(threshold=0.0), recorder)
    if probes > 0:
        register(pipe.transformer, _Replay(step_counter(pipe.transformer), outputs), REPLAY)
    try:
        ref = pipe(prompt, num_inference_steps=steps, output_type="latent", **gen_kwargs).frames
    finally:
        remove_cache(pipe.transformer)
    calib = fit_calibration(recorder, steps)
    if probes > 0 and calib["magnitude"]:
        calib["sensitivity"] = probe_sensitivity(pipe, prompt, calib, probes, ref, outputs, **gen_kwargs)
    return calib
