"""Flow-matching samplers and the denoise loop.

The loop is a plain function that takes the model (any callable `velocity = fn(latents, t)`), so
caching, CFG-parallel or sequence-parallel wrappers can be slotted in from outside.

Schedulers follow the diffusers interface (`set_timesteps`, `timesteps`, `step(...)[0]`), so
the folder's own `UniPCMultistepScheduler` (flow prediction) and mmkit's `FlowEulerScheduler`
are interchangeable.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from mmkit.infer.guidance import cfg_branch


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Flow-matching time shift: sigma' = shift * sigma / (1 + (shift - 1) * sigma)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


class FlowEulerScheduler:
    """First-order Euler sampler for rectified flow (x_t = (1 - sigma) x0 + sigma * noise; v = noise - x0).

    Sigmas run from 1 to 1/num_train_timesteps (shifted), then 0, as in diffusers' flow schedulers.
    Example:
        sch = FlowEulerScheduler(shift=3.0); sch.set_timesteps(30)
        for t in sch.timesteps: x = sch.step(model(x, t), t, x)[0]
    """

    order = 1

    def __init__(self, shift: float = 5.0, num_train_timesteps: int = 1000):
        if shift <= 0:
            raise ValueError(f"flow_shift={shift}: must be > 0 (Wan uses 3.0 at 480p, 5.0 at 720p)")
        self.shift = shift
        self.num_train_timesteps = num_train_timesteps
        self.sigmas = self.timesteps = None
        self._index = 0

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        base = torch.linspace(1.0, 1.0 / self.num_train_timesteps, num_inference_steps, dtype=torch.float64)
        sig = shift_sigmas(base, self.shift)
        self.sigmas = torch.cat([sig, sig.new_zeros(1)]).to(torch.float32)
        self.timesteps = (sig * self.num_train_timesteps).to(device=device, dtype=torch.float32)
        self._index = 0

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = False):
        dt = self.sigmas[self._index + 1] - self.sigmas[self._index]
        self._index += 1
        prev = sample.float() + dt.item() * model_output.float()
        return (prev.to(sample.dtype),)


def check_flow_shift(flow_shift: float | None) -> None:
    """A flow shift must be a finite number > 0 (0 maps every timestep to 0: the sampler divides by it).

    Example: `check_flow_shift(3.0)`.
    """
    if flow_shift is not None and not (math.isfinite(flow_shift) and flow_shift > 0):
        raise ValueError(f"flow_shift={flow_shift}: must be a finite number > 0 (3.0 for 480p, 5.0 for 720p)")


def make_scheduler(name: str, folder_scheduler=None, flow_shift: float | None = None):
    """`"unipc"` -> the folder's diffusers scheduler (flow_shift overridden if given); `"euler"` -> FlowEulerScheduler.

    Example: `make_scheduler("euler", pipe.scheduler, flow_shift=3.0)`.
    """
    check_flow_shift(flow_shift)
    if name == "unipc":
        if folder_scheduler is None:
            raise ValueError("sampler='unipc' needs the folder's scheduler/ (scheduler_config.json)")
        if flow_shift is None:
            return folder_scheduler.__class__.from_config(folder_scheduler.config)
        return folder_scheduler.__class__.from_config(folder_scheduler.config, flow_shift=flow_shift)
    if name == "euler":
        default = getattr(getattr(folder_scheduler, "config", None), "flow_shift", None) or 5.0
        return FlowEulerScheduler(shift=flow_shift if flow_shift is not None else default)
    raise ValueError(f"sampler={name!r}: choose 'unipc' (the folder's scheduler) or 'euler'")


@dataclass
class DenoiseStats:
    step_times: list[float] = field(default_factory=list)

    @property
    def mean_step_s(self) -> float:
        return sum(self.step_times) / max(len(self.step_times), 1)


def cfg_velocity(model: Callable, guidance: float, cond: dict, uncond: dict | None) -> Callable:
    """Wrap a DiT into `fn(x, t)` with classifier-free guidance: v = v_u + g * (v_c - v_u).

    `cond`/`uncond` are the model's keyword arguments (text_context, image_context) per branch.
    Each call runs inside `cfg_branch("cond")` / `cfg_branch("uncond")`, so hooks can keep state per
    branch (`accel.hooks.BranchState`); without `uncond` the single call is marked "cond".
    Example: `v = cfg_velocity(dit, 5.0, {"text_context": ctx}, {"text_context": ctx_neg})(x, t)`.
    """

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with cfg_branch("cond"):
            v = model(x, t, **cond)
        if uncond is None:
            return v
        with cfg_branch("uncond"):
            v_u = model(x, t, **uncond)
        return v_u + guidance * (v - v_u)

    return fn


def denoise(
    velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    scheduler,
    num_steps: int,
    prepare_input: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool = True,
    stats: DenoiseStats | None = None,
    step_kwargs: dict | None = None,
) -> torch.Tensor:
    """Run the sampler from noise `latents` (float32) over `num_steps`; returns the final latents.

    A scheduler with `scale_model_input` (diffusers' Euler family: x / sqrt(sigma^2 + 1)) scales the
    latents first; `prepare_input(latents)` then builds the model input (e.g. concatenates i2v mask +
    image latents). `step_kwargs` go to `scheduler.step` (e.g. the generator of an ancestral sampler).
    Example: `x0 = denoise(cfg_velocity(dit, 5.0, cond, uncond), noise, sched, 30)`.
    """
    scheduler.set_timesteps(num_steps, device=latents.device)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    bar = tqdm(scheduler.timesteps, desc="denoise", unit="step", disable=not progress)
    for t in bar:
        t0 = time.perf_counter()
        x_in = scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
        x_in = prepare_input(x_in) if prepare_input is not None else x_in
        v = velocity_fn(x_in, t.expand(latents.shape[0]))
        latents = scheduler.step(v, t, latents, return_dict=False, **(step_kwargs or {}))[0]
        if stats is not None:
            stats.step_times.append(time.perf_counter() - t0)
            bar.set_postfix(s_per_step=f"{stats.step_times[-1]:.2f}")
    return latents
