"""Step caches: speedup against quality, mmkit's caches and diffusers' hooks on the same weights.

For each method and setting, over the prompts (the model's first 8 held-out prompts by default):
- the wall-time speedup of the denoise loop and of the whole generation (text encoding + denoise +
  VAE decode) against the same side's uncached run, timed interleaved (each prompt: uncached, then
  every setting) so both see the same machine noise, best of `--repeats` passes per prompt and setting;
- the fraction of DiT block evaluations skipped;
- PSNR and SSIM of the decoded frames against the uncached video (mean and worst prompt);
- prompt-following accuracy: the shapes detector (`mmkit.data.synth_eval`), the fraction of each
  prompt's attributes seen in the frames, averaged (or `--detector module:function`).
mmkit: DiTCache and AttentionCache with MindIE's Wan2.1 settings (step fields scaled to --steps,
blocks [N/3, N)), the adaptive cache (calibrated magnitude signal with its defaults at several
thresholds, the first-block signal) and the CFG cache. diffusers (`WanPipeline` +
`WanTransformer3DModel` loaded from the same folder): FirstBlockCache, MagCache (ratios calibrated on
the same calibration prompt) and TaylorSeer. Then the calibration-transfer check: at each of
`--transfer-steps` the default adaptive cache with the calibration made at --steps and with one made
at that step count, against the uncached run at that step count. Writes a table (stdout and JSON)
and one PNG of speed vs PSNR.

Run: `.venv/bin/python benchmarks/cache.py --model DIR [--steps 50] [--out DIR]` with DIR from
`mmkit create-tiny wan-shapes DIR` (without --model: a tiny random model, 6 steps, 2 prompts: a
smoke run of the script).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import time
from pathlib import Path

import numpy as np
import torch

from mmkit.infer.accel.cache import (
    AdaptiveCacheConfig,
    AttentionCacheConfig,
    CFGCacheConfig,
    DiTCacheConfig,
    apply_cache,
    cache_stats,
    remove_cache,
)
from mmkit.infer.accel.cache.adaptive import DEFAULTS, calibrate_adaptive
from mmkit.infer.accel.quality import psnr, ssim
from mmkit.models.wan.shapes import SHAPES_CALIB_PROMPT


def scaled(step: int, steps: int) -> int:
    """A step index of MindIE's 50-step settings at `steps` steps."""
    return max(1, round(step * steps / 50))


def mmkit_settings(n_blocks: int, steps: int, calib: dict) -> dict:
    s20, s47 = scaled(20, steps), max(scaled(47, steps), scaled(20, steps) + 1)
    out = {
        "dit (MindIE 20/2/47, blocks N/3..N)": [DiTCacheConfig(s20, 2, s47, n_blocks // 3, n_blocks)],
        "attention (MindIE 20/2/47)": [AttentionCacheConfig(s20, 2, s47)],
    }
    for th in (0.006, 0.008, 0.01, 0.012, 0.015):
        tag = " (default)" if th == DEFAULTS["magnitude"]["threshold"] else ""
        out[f"adaptive magnitude th={th}{tag}"] = [AdaptiveCacheConfig(th, calibration=calib)]
    # without the sensitivity weights: the same signal with every sigma weighing 1, and the previous
    # defaults (threshold 0.01, Taylor step, at most 4 skips in a row, sigma_max 0.95)
    flat = {k: v for k, v in calib.items() if k != "sensitivity"}
    for th in (0.003, 0.005):
        out[f"adaptive magnitude th={th} unweighted"] = [AdaptiveCacheConfig(th, calibration=flat)]
    out["adaptive magnitude th=0.01 unweighted, Taylor, max 4 skips, sigma_max 0.95"] = [
        AdaptiveCacheConfig(0.01, max_skips=4, forecast="taylor", sigma_max=0.95, calibration=flat)
    ]
    default = DEFAULTS["magnitude"]["threshold"]
    for forecast in ("noise", "reuse"):  # the default forecast on Wan is noise_taylor
        out[f"adaptive magnitude th={default}, forecast {forecast}"] = [
            AdaptiveCacheConfig(default, forecast=forecast, calibration=calib)
        ]
    out["adaptive first_block th=0.005"] = [AdaptiveCacheConfig(0.005, "first_block", calibration=calib)]
    out[f"adaptive magnitude th={default} + cfg"] = [
        AdaptiveCacheConfig(default, calibration=calib),
        CFGCacheConfig(scaled(10, steps), 2, steps - 1),
    ]
    return out


def diffusers_settings(steps: int, mag_ratios: list[float]) -> dict:
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    out = {}
    for th in (0.05, 0.1):
        out[f"diffusers FirstBlockCache th={th}"] = FirstBlockCacheConfig(threshold=th)
    for th, k in ((0.06, 3), (0.12, 3), (0.24, 3), (0.3, 5)):
        out[f"diffusers MagCache th={th} (K={k})"] = MagCacheConfig(
            threshold=th, max_skip_steps=k, num_inference_steps=steps, mag_ratios=mag_ratios
        )
    out["diffusers TaylorSeer interval=3"] = TaylorSeerCacheConfig(
        cache_interval=3, disable_cache_before_step=3, taylor_factors_dtype=torch.float32
    )
    return out


class BlockCounter:
    """Counts real evaluations of diffusers' blocks (a skipped block never calls its `attn1`)."""

    def __init__(self, blocks):
        self.calls = 0
        for b in blocks:
            b.attn1.register_forward_pre_hook(self._count)

    def _count(self, *_):
        self.calls += 1

    def take(self) -> int:
        n, self.calls = self.calls, 0
        return n


class DenoiseTimer:
    """Wall time from the first transformer call of a generation to the end of the last one."""

    def __init__(self, module):
        self.first = self.last = None
        self.handles = [
            module.register_forward_pre_hook(self._pre),
            module.register_forward_hook(self._post),
        ]

    def _pre(self, *_):
        if self.first is None:
            self.first = time.perf_counter()

    def _post(self, *_):
        self.last = time.perf_counter()

    def take(self) -> float:
        dt = self.last - self.first
        self.first = self.last = None
        return dt


def diffusers_mag_ratios(pipe_d, kw: dict) -> list[float]:
    """MagCache's own calibration (it prints the ratios at the end of a run): the cond branch's list."""
    from diffusers.hooks import MagCacheConfig

    pipe_d.transformer.enable_cache(
        MagCacheConfig(num_inference_steps=kw["num_inference_steps"], calibrate=True)
    )
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        pipe_d(SHAPES_CALIB_PROMPT, **kw)
    pipe_d.transformer.disable_cache()
    lists = re.findall(r"\[([0-9eE.,\s+-]+)\]", buf.getvalue())
    return [float(x) for x in lists[0].split(",")]


def shapes_detector(prompts: list[str]):
    """The shapes detector (`mmkit.data.synth_eval.score`: fraction of the prompt's attributes seen in
    the frames) when every prompt is a shapes caption, else None."""
    from mmkit.data.synth_eval import parse_caption, score

    try:
        for p in prompts:
            parse_caption(p)
    except ValueError:
        return None
    return lambda frames, prompt: float(np.mean(list(score(frames, prompt).values())))


def keep_best(row: dict, timed: dict) -> None:
    """Keep the faster of two passes' denoise and total times (best of several, per prompt and setting)."""
    for k in ("denoise", "total"):
        row[k] = min(row[k], timed[k])


def summarize(name, side, rows, base) -> dict:
    p = [r["psnr"] for r in rows]
    finite = [x for x in p if np.isfinite(x)]
    acc = [r["ok"] for r in rows if r["ok"] is not None]
    return {
        "method": name,
        "side": side,
        "denoise_speedup": sum(b["denoise"] for b in base) / sum(r["denoise"] for r in rows),
        "total_speedup": sum(b["total"] for b in base) / sum(r["total"] for r in rows),
        "skipped": float(np.mean([r["skipped"] for r in rows])),
        "psnr_mean": float(np.mean(finite)) if len(finite) == len(p) else float("inf"),
        "psnr_worst": float(min(p)),
        "ssim_mean": float(np.mean([r["ssim"] for r in rows])),
        "ssim_worst": float(min(r["ssim"] for r in rows)),
        "accuracy": float(np.mean(acc)) if acc else None,
    }


def fmt(s: dict) -> str:
    skipped = f"{s['skipped']:.0%}"
    ideal = 1 / (1 - s["skipped"])  # if blocks were all of a step's time
    acc = f"{s['accuracy']:.2f}" if s["accuracy"] is not None else "n/a"
    return (
        f"{s['method']:<50} {s['denoise_speedup']:>6.2f}x {s['total_speedup']:>6.2f}x {skipped:>5} {ideal:>5.2f}x "
        f"{s['psnr_mean']:>6.2f} {s['psnr_worst']:>6.2f} {s['ssim_mean']:>6.3f} {s['ssim_worst']:>6.3f} {acc:>5}"
    )


def plot(summaries: list[dict], path: Path) -> None:
    """Mean PSNR against the measured denoise-loop speedup (left) and against the speedup the skipped
    block evaluations allow, 1 / (1 - skipped) (right: machine-independent; the left is noisy on a
    shared CPU)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    groups: dict[str, list[dict]] = {}
    for s in summaries:
        groups.setdefault(
            re.sub(r" (th|interval)=[\d.]+| \(.*?\)|, \d+ steps instead of \d+", "", s["method"]), []
        ).append(s)
    for ax, key, label in (
        (axes[0], lambda s: s["denoise_speedup"], "measured denoise-loop speedup vs uncached (x)"),
        (axes[1], lambda s: 1 / (1 - s["skipped"]), "1 / (1 - fraction of block evaluations skipped) (x)"),
    ):
        for name, ss in groups.items():
            ss = sorted(ss, key=key)
            ys = [min(s["psnr_mean"], 60) for s in ss]
            ax.plot([key(s) for s in ss], ys, "o-" if "diffusers" not in name else "s--", label=name)
        ax.axhline(30, color="gray", lw=0.8, ls=":")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean PSNR vs uncached (dB, inf shown as 60)")
    axes[1].legend(fontsize=7)
    fig.suptitle("step caches: speed vs quality")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="diffusers-layout Wan t2v folder (default: a tiny random one)")
    ap.add_argument("--prompts", help="one prompt per line (default: the model's heldout_prompts.json)")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier timings)")
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--max-prompts", type=int, default=8)
    ap.add_argument(
        "--detector",
        help="module:function(frames, prompt) -> score in [0, 1] (default: the shapes detector, "
        "mmkit.data.synth_eval, fraction of the prompt's attributes seen, when the prompts are shapes captions)",
    )
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per prompt and setting (best kept)")
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument(
        "--transfer-steps", default="20,30", help="step counts for the calibration-transfer check"
    )
    ap.add_argument("--out", default="outputs/bench_cache")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    import mmkit

    if a.model is None:  # smoke run
        from mmkit.models.wan.tiny import create_tiny_wan

        a.model = str(create_tiny_wan(out / "tiny-random", task="t2v", seed=0))
        a.steps, a.max_prompts, a.transfer_steps = a.steps or 6, 2, ""
        prompts = ["a red circle moves left", "a blue square moves up"]
    else:
        a.steps = a.steps or 50
        if a.prompts:
            src = Path(a.prompts)
            if not src.is_file():
                raise FileNotFoundError(f"--prompts: {src} not found (one prompt per line)")
            prompts = [p.strip() for p in src.read_text().splitlines() if p.strip()][: a.max_prompts]
        else:
            from mmkit.infer.evaluate import heldout_prompts

            prompts = heldout_prompts(a.model, a.max_prompts)
    torch.set_num_threads(a.threads)
    detector = shapes_detector(prompts)
    if a.detector:
        import importlib

        mod, fn = a.detector.split(":")
        detector = getattr(importlib.import_module(mod), fn)

    pipe = mmkit.load_pipeline(a.model, task="t2v", device="cpu", dtype="fp32")
    n_blocks = len(pipe.transformer.blocks)
    kw = dict(
        height=a.height,
        width=a.width,
        num_frames=a.frames,
        guidance_scale=a.guidance,
        num_inference_steps=a.steps,
    )
    print(
        f"model {a.model}: {n_blocks} blocks; {len(prompts)} prompts; {a.steps} steps; {a.height}x{a.width}x{a.frames}"
    )
    print(f"timings on a shared CPU: interleaved per prompt, best of {a.repeats} passes")
    calib = calibrate_adaptive(
        pipe,
        SHAPES_CALIB_PROMPT,
        a.steps,
        seed=0,
        progress=False,
        **{k: v for k, v in kw.items() if k != "num_inference_steps"},
    )
    (out / "calibration.json").write_text(json.dumps(calib, indent=1))

    def run_mmkit(prompt, seed, configs, steps=None):
        remove_cache(pipe.transformer)
        if configs:
            apply_cache(pipe.transformer, *configs)
        t0 = time.perf_counter()
        res = pipe(prompt, seed=seed, progress=False, **{**kw, "num_inference_steps": steps or a.steps})
        total = time.perf_counter() - t0
        skipped = cache_stats(pipe.transformer).skipped_fraction
        remove_cache(pipe.transformer)
        return res.frames[0], {"denoise": sum(res.step_times), "total": total, "skipped": skipped}

    run_mmkit(prompts[0], 0, [])  # warm-up: first-call allocations and tables are not timed
    settings = {name: (cfgs, None) for name, cfgs in mmkit_settings(n_blocks, a.steps, calib).items()}
    # the baseline a cache has to beat: fewer steps, no cache, scored against the --steps video
    for frac in (0.4, 0.5):
        n = max(2, round(a.steps * frac))
        settings[f"uncached, {n} steps instead of {a.steps}"] = ([], n)
    rows = {name: [] for name in settings}
    base = []
    for i, prompt in enumerate(prompts):
        ref, b = run_mmkit(prompt, i, [])
        b.update(psnr=float("inf"), ssim=1.0, ok=detector(ref, prompt) if detector else None)
        base.append(b)
        for name, (cfgs, n) in settings.items():
            frames, r = run_mmkit(prompt, i, cfgs, n)
            if n:  # the steps not run count as skipped
                r["skipped"] = 1 - n / a.steps
            r.update(
                psnr=psnr(frames, ref),
                ssim=ssim(frames, ref),
                ok=detector(frames, prompt) if detector else None,
            )
            rows[name].append(r)
        for _ in range(a.repeats - 1):  # timing passes (the frames are the same: seeded)
            keep_best(base[i], run_mmkit(prompt, i, [])[1])
            for name, (cfgs, n) in settings.items():
                keep_best(rows[name][i], run_mmkit(prompt, i, cfgs, n)[1])
        print(f"mmkit prompt {i + 1}/{len(prompts)} done", flush=True)
    summaries = [summarize("uncached", "mmkit", base, base)]
    summaries += [summarize(name, "mmkit", r, base) for name, r in rows.items()]

    transfer = []
    gen_kw = {k: v for k, v in kw.items() if k != "num_inference_steps"}
    for steps in [int(s) for s in a.transfer_steps.split(",") if s]:
        own = calibrate_adaptive(pipe, SHAPES_CALIB_PROMPT, steps, seed=0, progress=False, **gen_kw)
        refs = [run_mmkit(prompt, i, [], steps)[0] for i, prompt in enumerate(prompts)]
        default = DEFAULTS["magnitude"]["threshold"]
        for th, label, c in (
            (default, f"calibrated at {a.steps}", calib),
            (default, f"calibrated at {steps}", own),
        ):
            ps, fr = [], []
            for i, prompt in enumerate(prompts):
                cfg = AdaptiveCacheConfig(th, calibration=c)
                frames, r = run_mmkit(prompt, i, [cfg], steps)
                ps.append(psnr(frames, refs[i]))
                fr.append(r["skipped"])
            transfer.append(
                {
                    "steps": steps,
                    "threshold": th,
                    "calibration": label,
                    "psnr_mean": float(np.mean(ps)),
                    "psnr_worst": float(min(ps)),
                    "skipped": float(np.mean(fr)),
                }
            )
        print(f"transfer check at {steps} steps done", flush=True)

    if not a.no_diffusers:
        from diffusers import WanPipeline

        pipe_d = WanPipeline.from_pretrained(a.model, torch_dtype=torch.float32)
        pipe_d.set_progress_bar_config(disable=True)
        timer = DenoiseTimer(pipe_d.transformer)
        counter = BlockCounter(pipe_d.transformer.blocks)
        full = 2 * a.steps * len(pipe_d.transformer.blocks)  # block evaluations of an uncached run
        # diffusers pads prompts to 512 tokens unless told; the DiT reads the length it was trained with
        dkw = dict(kw, output_type="np", max_sequence_length=pipe.max_sequence_length)
        pipe_d(prompts[0], generator=torch.Generator("cpu").manual_seed(0), **dkw)  # warm-up
        timer.take()
        counter.take()
        ratios = diffusers_mag_ratios(pipe_d, {**dkw, "generator": torch.Generator("cpu").manual_seed(0)})
        timer.take()  # the calibration run is not the first prompt's
        counter.take()
        dsettings = diffusers_settings(a.steps, ratios)
        drows = {name: [] for name in dsettings}
        dbase = []
        agree = []
        for i, prompt in enumerate(prompts):

            def run_d(cfg, prompt=prompt, i=i):
                if cfg is not None:
                    pipe_d.transformer.enable_cache(cfg)
                t0 = time.perf_counter()
                frames = pipe_d(
                    prompt, negative_prompt="", generator=torch.Generator("cpu").manual_seed(i), **dkw
                ).frames[0]
                total = time.perf_counter() - t0
                if cfg is not None:
                    pipe_d.transformer.disable_cache()
                return frames, {"denoise": timer.take(), "total": total, "skipped": 1 - counter.take() / full}

            ref, b = run_d(None)
            dbase.append(b)
            mm_ref, _ = run_mmkit(prompt, i, [])
            agree.append(psnr(mm_ref, ref))
            for name, cfg in dsettings.items():
                frames, r = run_d(cfg)
                r.update(
                    psnr=psnr(frames, ref),
                    ssim=ssim(frames, ref),
                    ok=detector(frames, prompt) if detector else None,
                )
                drows[name].append(r)
            for _ in range(a.repeats - 1):
                keep_best(dbase[i], run_d(None)[1])
                for name, cfg in dsettings.items():
                    keep_best(drows[name][i], run_d(cfg)[1])
            print(f"diffusers prompt {i + 1}/{len(prompts)} done", flush=True)
        summaries += [summarize(name, "diffusers", r, dbase) for name, r in drows.items()]
        print(
            f"uncached mmkit vs uncached diffusers, same weights and seed: PSNR {min(agree):.1f} dB (worst prompt)"
        )

    head = f"{'method':<46} {'denoise':>7} {'total':>7} {'skip':>5} {'ideal':>6} {'PSNR':>6} {'worst':>6} {'SSIM':>6} {'worst':>6} {'acc':>5}"
    print(head)
    for s in summaries:
        print(fmt(s))
    if transfer:
        for s in summaries:  # the main table's rows at --steps, for comparison
            m = re.match(r"adaptive magnitude th=([\d.]+)( \(default\))?$", s["method"])
            if m:
                transfer.append(
                    {
                        "steps": a.steps,
                        "threshold": float(m.group(1)),
                        "calibration": f"calibrated at {a.steps}",
                        **{k: s[k] for k in ("psnr_mean", "psnr_worst", "skipped")},
                    }
                )
        print(
            "calibration transfer (adaptive magnitude, PSNR against the uncached run of the same step count):"
        )
        for t in transfer:
            print(
                f"  {t['steps']} steps th={t['threshold']} {t['calibration']:<18} PSNR {t['psnr_mean']:.2f} (worst {t['psnr_worst']:.2f}), skipped {t['skipped']:.0%}"
            )
    (out / "cache_bench.json").write_text(
        json.dumps({"summaries": summaries, "transfer": transfer, "args": vars(a)}, indent=1)
    )
    plot(summaries, out / "cache_speed_psnr.png")
    print(f"wrote {out / 'cache_bench.json'} and {out / 'cache_speed_psnr.png'}")


if __name__ == "__main__":
    main()
