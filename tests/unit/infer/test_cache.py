"""Step caches (mmkit/infer/accel/cache): zero skips equal uncached exactly, schedules follow the config
(DiTCache and AttentionCache against hand-computed schedules and a hand-written cached forward), state per
guidance branch, reset between generations, and removal that restores the model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from wan_helpers import tiny_sampling_dit

from mmkit.infer.accel.cache import (
    AdaptiveCacheConfig,
    AttentionCacheConfig,
    CFGCacheConfig,
    DiTCacheConfig,
    apply_cache,
    cache_config_from_dict,
    cache_stats,
    remove_cache,
)
from mmkit.infer.accel.cache.adaptive import (
    CALIBRATION_VERSION,
    REPLAY,
    _Replay,
    apply_adaptive_cache,
    calibration_step,
    decide,
    fit_calibration,
    skip_limit,
    step_signal,
    transfer_note,
)
from mmkit.infer.accel.cache.common import step_counter
from mmkit.infer.accel.hooks import HookRegistry, ModelHook, register, reset_all
from mmkit.infer.samplers import FlowEulerScheduler, cfg_velocity, denoise

STEPS = 10


@pytest.fixture(scope="module")
def model():
    return tiny_sampling_dit(layers=4)


def generate(model, guidance=4.0, steps=STEPS, seed=0):
    """A whole generation as the pipelines run it: reset the hooks, then the CFG denoise loop."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, 4, 2, 4, 4, generator=g)
    ctx, neg = torch.randn(1, 8, 16, generator=g), torch.randn(1, 8, 16, generator=g)
    reset_all(model)
    fn = cfg_velocity(model, guidance, {"text_context": ctx}, {"text_context": neg} if guidance > 1 else None)
    with torch.no_grad():
        return denoise(fn, noise, FlowEulerScheduler(shift=3.0), steps, progress=False)


class Spy(ModelHook):
    """Registered after a cache (innermost): records (branch step, tag) each time the module really runs."""

    def __init__(self, counter, tag, log):
        self.counter, self.tag, self.log = counter, tag, log

    def pre_forward(self, module, *args, **kwargs):
        self.log.append((self.counter.state["step"], self.tag))
        return args, kwargs


def spy_blocks(model, log, sub=None):
    counter = step_counter(model)
    for i, b in enumerate(model.blocks):
        HookRegistry.get_or_create(getattr(b, sub) if sub else b).register_hook(Spy(counter, i, log), "spy")


def no_hooks_left(model) -> bool:
    return all("_mmkit_hooks" not in m.__dict__ and "forward" not in m.__dict__ for m in model.modules())


@pytest.fixture(scope="module")
def uncached(model):
    return generate(model)


@pytest.mark.parametrize(
    "cfg",
    [
        DiTCacheConfig(step_start=0, step_interval=1, step_end=STEPS, block_start=1, block_end=3),
        AttentionCacheConfig(step_start=0, step_interval=1, step_end=STEPS),
        AdaptiveCacheConfig(threshold=0.0),
        AdaptiveCacheConfig(threshold=1e9, max_skips=0, forecast="taylor"),
        CFGCacheConfig(step_start=0, step_interval=1, step_end=STEPS),
    ],
    ids=["dit", "attention", "adaptive", "adaptive_max0", "cfg"],
)
def test_zero_skips_equal_uncached_exactly_and_removal_restores(model, uncached, cfg):
    apply_cache(model, cfg)
    try:
        out = generate(model)
        stats = cache_stats(model)
    finally:
        remove_cache(model)
    assert torch.equal(out, uncached)
    assert stats.blocks_skipped == 0 and stats.attention_reused == 0
    assert stats.blocks_run == 2 * STEPS * len(model.blocks)
    assert no_hooks_left(model)
    assert torch.equal(generate(model), uncached)


def test_dit_cache_follows_the_hand_computed_schedule_and_adds_the_bias(model, uncached):
    cfg = DiTCacheConfig(step_start=2, step_interval=2, step_end=8, block_start=1, block_end=3)
    cached_steps = [3, 5, 7]  # in [2, 8), not 2 + 2k
    log = []
    apply_cache(model, cfg)
    spy_blocks(model, log)
    try:
        out = generate(model)
        stats = cache_stats(model)
        counter = step_counter(model)
        bias = {b: counter.state_for(b)["dit_bias"] for b in ("cond", "uncond")}
    finally:
        remove_cache(model)
        for b in model.blocks:
            HookRegistry.get_or_create(b).remove_hook("spy")
    expected = [
        (s, i) for s in range(STEPS) for i in range(4) if not (s in cached_steps and i in (1, 2))
    ]  # per branch; cond and uncond each run this schedule
    assert sorted(log) == sorted(expected * 2)
    assert stats.blocks_skipped == 2 * len(cached_steps) * 2 and stats.skipped_fraction == 12 / 80
    assert not torch.equal(bias["cond"], bias["uncond"])  # each branch keeps its own residual
    assert not torch.equal(out, uncached)
    assert no_hooks_left(model)
    # the cached forward by hand: blocks 1, 2 replaced by the residual they added at the last computed step
    torch.testing.assert_close(out, hand_dit_generation(model, cfg, cached_steps), rtol=0, atol=0)


def hand_dit_generation(model, cfg, cached_steps):
    biases = {}

    class Hand(torch.nn.Module):
        def forward(self, latents, timestep, text_context, branch):
            grid = model.grid(latents)
            x, temb, e, ctx, ctx_img = model.embed(latents, timestep, text_context)
            rope = model.rope(grid, latents.device, x.dtype)
            step = self.steps[branch]
            self.steps[branch] += 1
            for i, block in enumerate(model.blocks):
                if i == cfg.block_start:
                    x_in = x
                if step in cached_steps and cfg.block_start <= i < cfg.block_end:
                    x = x + biases[branch] if i == cfg.block_start else x
                    continue
                x = block(x, e, ctx, ctx_img, rope)
                if i == cfg.block_end - 1:
                    biases[branch] = x - x_in
            return model.unpatchify(model.head_tokens(x, temb), grid).float()

    hand = Hand()
    hand.steps = {"cond": 0, "uncond": 0}
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 4, 2, 4, 4, generator=g)
    ctx, neg = torch.randn(1, 8, 16, generator=g), torch.randn(1, 8, 16, generator=g)
    fn = cfg_velocity(
        hand, 4.0, {"text_context": ctx, "branch": "cond"}, {"text_context": neg, "branch": "uncond"}
    )
    with torch.no_grad():
        return denoise(fn, noise, FlowEulerScheduler(shift=3.0), STEPS, progress=False)


def test_attention_cache_schedule_and_reset_between_generations(model, uncached):
    log = []
    apply_cache(model, AttentionCacheConfig(step_start=4, step_interval=3, step_end=9))
    spy_blocks(model, log, sub="attn")
    try:
        first = generate(model)
        stats = cache_stats(model)
        n_first = len(log)
        second = generate(model)  # reset_all at the start: the same schedule, the same video
    finally:
        remove_cache(model)
        for b in model.blocks:
            HookRegistry.get_or_create(b.attn).remove_hook("spy")
    cached = [5, 6, 8]
    assert sorted(log[:n_first]) == sorted(
        [(s, i) for s in range(STEPS) for i in range(4) if s not in cached] * 2
    )
    assert stats.attention_reused == len(cached) * 4 * 2 and stats.blocks_skipped == 0
    assert torch.equal(first, second) and not torch.equal(first, uncached)
    assert no_hooks_left(model)


def test_adaptive_cache_skips_runs_bounded_by_max_skips(model, uncached):
    log = []
    apply_cache(model, AdaptiveCacheConfig(threshold=1e9, max_skips=2, warmup=2))
    spy_blocks(model, log)
    try:
        out = generate(model)
        stats = cache_stats(model)
    finally:
        remove_cache(model)
        for b in model.blocks:
            HookRegistry.get_or_create(b).remove_hook("spy")
    # steps 0, 1 run (warmup), then skip, skip, run, ...: block 0 always runs
    skipped = [2, 3, 5, 6, 8, 9]
    assert sorted(log) == sorted(
        [(s, i) for s in range(STEPS) for i in range(4) if not (s in skipped and i)] * 2
    )
    assert stats.blocks_skipped == len(skipped) * 3 * 2
    err = (out - uncached).abs().mean()
    assert 0 < err < uncached.abs().mean()


def test_adaptive_threshold_trades_skips_for_error_and_taylor_forecasts(model, uncached):
    def run(cfg):
        apply_cache(model, cfg)
        try:
            return generate(model), cache_stats(model).skipped_fraction
        finally:
            remove_cache(model)

    low, f_low = run(AdaptiveCacheConfig(threshold=0.05))
    high, f_high = run(AdaptiveCacheConfig(threshold=0.5))
    assert f_low < f_high
    assert (low - uncached).abs().mean() < (high - uncached).abs().mean()
    taylor, f_t = run(AdaptiveCacheConfig(threshold=0.5, forecast="taylor"))
    assert f_t == f_high and not torch.equal(taylor, high)  # same decisions, forecast residual
    with pytest.raises(ValueError, match="needs signal='magnitude'"):
        apply_cache(model, AdaptiveCacheConfig(threshold=0.5, forecast="noise"))
    with pytest.raises(ValueError, match="forecast='tailor'"):
        apply_cache(model, AdaptiveCacheConfig(threshold=0.5, forecast="tailor"))
    assert no_hooks_left(model)


def test_magnitude_signal_from_a_one_sample_calibration(model, uncached):
    recorder = {}
    apply_adaptive_cache(model, AdaptiveCacheConfig(threshold=0.0), recorder=recorder)
    try:
        assert torch.equal(generate(model), uncached)  # recording changes nothing
    finally:
        remove_cache(model)
    calib = fit_calibration(recorder, STEPS)
    assert set(calib["magnitude"]) == {"cond", "uncond"} and calib["first_block_scale"] > 0
    curve = calib["magnitude"]["cond"]
    assert len(curve["sigma"]) == STEPS - 1 and curve["sigma"] == sorted(curve["sigma"], reverse=True)
    assert min(curve["rate"]) > 0 and len(calib["first_block"]["uncond"]["scale"]) == STEPS - 1
    cfg = AdaptiveCacheConfig(threshold=0.05, calibration=calib).validate()
    # the calibrated defaults: the forecast follows the model ("noise_taylor" here), no run limit, sigma <= 0.94
    assert (
        cfg.signal == "magnitude" and cfg.forecast is None and cfg.max_skips is None and cfg.sigma_max == 0.94
    )
    apply_cache(model, AdaptiveCacheConfig(threshold=0.0, calibration=calib))
    try:
        assert torch.equal(generate(model), uncached) and cache_stats(model).blocks_skipped == 0
    finally:
        remove_cache(model)
    apply_cache(model, AdaptiveCacheConfig(threshold=0.05, signal="magnitude", calibration=calib))
    try:
        out = generate(model)
        stats = cache_stats(model)
    finally:
        remove_cache(model)
    assert 0 < stats.skipped_fraction < 0.8  # whole steps skipped, the rest run
    assert (out - uncached).abs().mean() < (uncached.abs().mean())
    with pytest.raises(ValueError, match="needs a calibration"):
        apply_cache(model, AdaptiveCacheConfig(signal="magnitude"))
    with pytest.raises(ValueError, match="rerun `mmkit accel calibrate`"):
        apply_cache(model, AdaptiveCacheConfig(calibration={**calib, "version": 1}))
    assert no_hooks_left(model)


def test_magnitude_skips_the_whole_model_call_and_forecasts_its_output(model):
    """A skipped step runs nothing of the model (no embedding, no block) and returns a forecast of the
    branch's output from its last computed ones: the output itself ("reuse"), the first-order step in
    sigma ("taylor"), the velocity that keeps the last predicted noise ("noise"), or the noise moved by
    half its last slope ("noise_taylor", the default for a flow-velocity model), each hand-computed here
    from the sampler's inputs and the model's outputs."""
    ran, calls = [], []
    h1 = model.text_embed.register_forward_pre_hook(lambda m, a: ran.append(1))
    h2 = model.register_forward_hook(lambda m, a, o: calls.append((a[0].clone(), float(a[1][0]), o.clone())))
    computed = [0, 3, 6, 9]  # warm-up, then skip, skip, run, ...
    try:
        for forecast in ("reuse", "taylor", "noise", "noise_taylor", None):
            ran.clear()
            calls.clear()
            cfg = AdaptiveCacheConfig(1.0, max_skips=2, forecast=forecast, sigma_max=1.0)
            apply_cache(model, dataclasses.replace(cfg, calibration=constant_calibration(0.0)))
            try:
                generate(model)
                stats = cache_stats(model)
            finally:
                remove_cache(model)
            assert len(ran) == 2 * len(computed) and stats.blocks_skipped == 2 * 6 * len(model.blocks)
            for branch in (calls[0::2], calls[1::2]):  # cond, uncond
                for step in (1, 2, 4, 5, 7, 8):
                    last = max(c for c in computed if c < step)
                    x, t, out = branch[step]
                    x_k, t_k, v_k = branch[last]
                    s, s_k = t / 1000, t_k / 1000
                    eps_k = x_k + (1 - s_k) * v_k  # the noise predicted at the last computed step
                    if last > 0:  # a computed step before it: the slopes
                        x_j, t_j, v_j = branch[last - 3]
                        s_j = t_j / 1000
                        eps_j = x_j + (1 - s_j) * v_j
                    if forecast == "reuse":
                        want = v_k
                    elif forecast == "taylor":
                        want = v_k + (v_k - v_j) / (t_k - t_j) * (t - t_k) if last > 0 else v_k
                    elif forecast == "noise" or last == 0:
                        want = (eps_k - x) / (1 - s)
                    else:  # noise_taylor (and None: the model predicts flow velocity)
                        want = (eps_k + 0.5 * (eps_k - eps_j) / (s_k - s_j) * (s - s_k) - x) / (1 - s)
                    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
                    if forecast not in ("reuse", "taylor"):
                        assert not torch.equal(out, v_k)
    finally:
        h1.remove()
        h2.remove()
    assert no_hooks_left(model)


def test_probe_replay_follows_the_recorded_run_and_runs_the_model_from_its_step(model, uncached):
    """A calibration probe replays the recorded outputs before its step: the same final latents as a
    probe that runs every step, with the model run only from the probed step on."""
    outputs = {}
    register(model, _Replay(step_counter(model), outputs), REPLAY)
    try:
        assert torch.equal(generate(model), uncached)  # recording changes nothing
    finally:
        remove_cache(model)
    assert sorted(outputs) == sorted((b, k) for b in ("cond", "uncond") for k in range(STEPS))
    ran = []
    hook = model.text_embed.register_forward_pre_hook(lambda m, a: ran.append(1))

    def probe(replay: bool):
        ran.clear()
        cfg = AdaptiveCacheConfig(1.0, "magnitude", sigma_max=1.0, calibration=constant_calibration(1.0))
        apply_adaptive_cache(model, cfg, {"force": {4}})
        if replay:
            register(model, _Replay(step_counter(model), outputs, until=4), REPLAY)
        try:
            return generate(model), cache_stats(model).blocks_skipped, len(ran)
        finally:
            remove_cache(model)

    try:
        (fast, skipped, ran_fast), (full, skipped_full, ran_full) = probe(True), probe(False)
    finally:
        hook.remove()
    assert torch.equal(fast, full) and not torch.equal(fast, uncached)  # step 4 skipped, exactly as without
    assert skipped == skipped_full == 2 * len(model.blocks)
    assert ran_full == 2 * (STEPS - 1) and ran_fast == 2 * (STEPS - 5)  # steps 5..9 run; 0..3 replayed
    assert no_hooks_left(model)


def constant_calibration(rate: float) -> dict:
    """A calibration whose residual changes by `rate` (relative L1) per unit of sigma everywhere."""
    curve = {"sigma": [1.0, 0.0], "rate": [rate, rate]}
    return {"version": CALIBRATION_VERSION, "steps": 50, "magnitude": {"cond": curve}, "first_block": {}}


def test_magnitude_signal_takes_one_decision_for_both_guidance_branches():
    """Each branch reads the largest of the branches' rates, so cond and uncond skip the same steps
    (a step where one branch is forecast and the other computed multiplies the forecast's error by the
    guidance scale). With its own curve each, the slower-changing uncond would skip more steps here."""
    curve = {"sigma": [1.0, 0.0]}
    calib = constant_calibration(0.0)
    calib["magnitude"] = {"cond": {**curve, "rate": [4.0, 4.0]}, "uncond": {**curve, "rate": [0.5, 0.5]}}

    def decisions(calibration: dict, branch: str) -> list[bool]:
        cfg = AdaptiveCacheConfig(threshold=0.01, max_skips=None, calibration=calibration)
        cfg.validate()
        s, out = {"step": 0, "t": 1000.0, "R": torch.ones(1), "t_prev": None}, []
        for k, sig in enumerate(torch.linspace(0.9, 0.1, 41).tolist()):
            s["step"], s["t_prev"], s["t"] = k + 1, s["t"], sig * 1000
            skip, signal = decide(step_signal(cfg, s, None, branch), cfg.threshold)
            s["err"], s["drift"] = (signal, s["drift_now"]) if skip else (0.0, 0.0)
            out.append(skip)
        return out

    cond = decisions(calib, "cond")
    assert cond == decisions(calib, "uncond")
    assert 0 < sum(cond) < len(cond)  # some steps skipped, some run
    assert cond == decisions(constant_calibration(4.0), "cond")  # as with the faster curve alone


@pytest.mark.parametrize("steps", [20, 30, 50])
def test_magnitude_error_estimate_measures_sigma_not_steps(steps):
    """Skipping every step from sigma 0.8 to 0.6 (a span L = 0.2 in steps of h), the drift is rate * L
    and the error estimate rate * L * (L + h) / 2 at 20, 30 and 50 steps: set by sigma, not by the
    step count (a per-step sum, as with a calibration by step index, would grow with the steps)."""
    cfg = AdaptiveCacheConfig(threshold=1e9, calibration=constant_calibration(2.0)).validate()
    sigmas = torch.linspace(0.8, 0.6, round(0.2 * steps) + 1).tolist()
    s = {"step": 5, "t": sigmas[0] * 1000, "R": torch.ones(1), "t_prev": None}
    for sig in sigmas[1:]:
        s["t_prev"], s["t"] = s["t"], sig * 1000
        skip, s["err"] = decide(step_signal(cfg, s, None, "cond"), cfg.threshold)
        assert skip
        s["drift"] = s["drift_now"]
    assert s["drift"] == pytest.approx(2.0 * 0.2)  # the residual's change since it was computed
    h = 0.2 / (len(sigmas) - 1)
    assert s["err"] == pytest.approx(2.0 * 0.2 * (0.2 + h) / 2, rel=1e-5)


def test_adaptive_steps_outside_the_sigma_band_always_run(model, uncached):
    """With sigma_max 0.6 and sigma_min 0.2, every step whose timestep is outside [200, 600] runs all
    blocks (the threshold would skip everything else)."""
    from mmkit.infer.samplers import FlowEulerScheduler

    sched = FlowEulerScheduler(shift=3.0)
    sched.set_timesteps(STEPS)
    ts = sched.timesteps.tolist()
    log = []
    apply_cache(model, AdaptiveCacheConfig(threshold=1e9, max_skips=None, sigma_max=0.6, sigma_min=0.2))
    spy_blocks(model, log)
    try:
        generate(model)
    finally:
        remove_cache(model)
        for b in model.blocks:
            HookRegistry.get_or_create(b).remove_hook("spy")
    skipped = {s for s in range(STEPS) if sum(1 for e in log if e[0] == s) < 4 * 2}
    inside = {s for s, t in enumerate(ts) if 200 <= t <= 600}
    assert inside and skipped == inside - {0}
    assert no_hooks_left(model)


@pytest.mark.parametrize("made_at", [50, 25])
@pytest.mark.parametrize("steps,limit", [(50, 4), (100, 4), (30, 2), (20, 1), (5, 1)])
def test_max_skips_counts_steps_of_a_50_step_schedule(steps, limit, made_at):
    """max_skips 4 with a calibration on a uniform schedule made at 50 or 25 steps: runs whose steps are
    larger than a 50-step schedule's may skip proportionally fewer in a row (floor, at least 1); smaller
    steps keep 4. The calibration's own step count does not change the limit."""
    sigmas = [1.0 - i / made_at for i in range(made_at + 1)]
    calib = {
        "version": CALIBRATION_VERSION,
        "steps": made_at,
        "magnitude": {"cond": {"sigma": sigmas, "rate": [1.0] * (made_at + 1)}},
        "first_block": {},
    }
    cfg = AdaptiveCacheConfig(threshold=1.0, max_skips=4, calibration=calib).validate()
    h = 1.0 / steps
    assert skip_limit(cfg, {"t": 500.0, "t_prev": (0.5 + h) * 1000}) == limit
    assert skip_limit(cfg, {"t": 500.0, "t_prev": None}) == 4  # the first step: nothing to compare
    assert calibration_step(calib, 0.5) == pytest.approx(1.0 / made_at)
    assert calibration_step(None, 0.5) is None


def test_transfer_note_names_the_calibration_step_count():
    calib = constant_calibration(1.0)
    assert transfer_note(calib, 50) is None and transfer_note(calib, 30) is None
    note = transfer_note(calib, 20)
    assert "50 steps" in note and "--steps 20" in note and "--cache-threshold" in note
    assert "from 30 to 50 steps" in transfer_note(calib, 8)


def test_cfg_cache_reuses_the_uncond_delta_on_scheduled_steps(model, uncached):
    log = []
    apply_cache(model, CFGCacheConfig(step_start=2, step_interval=2, step_end=8))
    counter = step_counter(model)

    class Branch(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            from mmkit.infer.guidance import current_cfg_branch

            log.append((current_cfg_branch(), counter.state["step"]))
            return args, kwargs

    HookRegistry.get_or_create(model.blocks[0]).register_hook(Branch(), "spy")
    try:
        out = generate(model)
        stats = cache_stats(model)
    finally:
        HookRegistry.get_or_create(model.blocks[0]).remove_hook("spy")
        remove_cache(model)
    assert [s for b, s in log if b == "uncond"] == [0, 1, 2, 4, 6, 8, 9]
    assert [s for b, s in log if b == "cond"] == list(range(STEPS))
    assert stats.blocks_skipped == 3 * 4
    assert 0 < (out - uncached).abs().mean() < uncached.abs().mean()
    assert no_hooks_left(model)


def test_config_errors_name_the_field(model):
    with pytest.raises(ValueError, match="block_end=9"):
        apply_cache(model, DiTCacheConfig(0, 2, 10, 1, 9))
    with pytest.raises(ValueError, match="step_interval=0"):
        apply_cache(model, AttentionCacheConfig(0, 0, 10))
    with pytest.raises(ValueError, match="unknown key"):
        cache_config_from_dict({"method": "dit", "blocks": 3})
    with pytest.raises(ValueError, match="method='teacache'"):
        cache_config_from_dict({"method": "teacache"})
    assert no_hooks_left(model)


def test_compiled_blocks_only_on_cuda_and_removable(model, monkeypatch):
    from mmkit.infer.accel.compiled import apply_compiled_blocks, remove_compiled_blocks

    assert apply_compiled_blocks(model) is False  # CPU: the eager path is kept
    assert all("_compiled_call_impl" not in b.__dict__ for b in model.blocks)
    compiled = []  # what CUDA gets, without paying for inductor here: each block compiled on its own

    def fake_compile(self, **kwargs):
        compiled.append(self)
        self.__dict__["_compiled_call_impl"] = self._call_impl

    monkeypatch.setattr(torch.nn.Module, "compile", fake_compile)
    assert apply_compiled_blocks(model, force=True) is True
    assert compiled == list(model.blocks)
    remove_compiled_blocks(model)
    assert all("_compiled_call_impl" not in b.__dict__ for b in model.blocks)
