"""Cache Searcher: the DiTCache setting with the best quality at a target speedup.

Like MindIE's Cache Searcher: candidate step and block ranges whose predicted speedup reaches the target
are each run on the prompts and scored by PSNR / MSE of the decoded frames against the uncached video;
the best PSNR wins. The target is the whole generation's (text encoding + denoising + VAE decode), as
the user times it: the uncached reference runs first and give the denoise loop's share `f` of the wall
time; a candidate's predicted speedup is `1 / ((1 - f) + f * (1 - skipped))`, with `skipped` the
fraction of block evaluations it skips (the blocks being nearly all of a step's time). A target the
share cannot reach (`1 / (1 - f)` or more) is refused with both numbers. Uncached references and every scored candidate are stored in the output
folder (`reference_<i>.npy`, `results.jsonl`), so an interrupted search resumes where it stopped.
The winner is written as `best.json`, which `mmkit generate --cache-config best.json` reads.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mmkit.infer.accel.cache import DiTCacheConfig, apply_cache, cache_stats, remove_cache
from mmkit.infer.accel.cache.common import repeated_blocks
from mmkit.infer.accel.quality import mse, psnr


def predicted_speedup(cfg: DiTCacheConfig, steps: int, num_blocks: int, dit_share: float = 1.0) -> float:
    """1 / ((1 - dit_share) + dit_share * (1 - skipped)), with `skipped` the fraction of block evaluations
    skipped in `steps` sampling steps and `dit_share` the denoise loop's share of the wall time (1.0: the
    denoise loop alone)."""
    cached = sum(cfg.is_cached(s) for s in range(steps))
    skipped = cached * (cfg.block_end - cfg.block_start) / (steps * num_blocks)
    return 1.0 / ((1.0 - dit_share) + dit_share * (1.0 - skipped))


def dit_target(target_speedup: float, dit_share: float) -> float:
    """The denoise-loop speedup that gives `target_speedup` on the whole generation when the loop takes
    `dit_share` of it. Example: `dit_target(1.6, 0.85)  # 1.79`."""
    rest = 1.0 / target_speedup - (1.0 - dit_share)
    if rest <= 0:
        raise ValueError(
            f"--target-speedup {target_speedup}: the denoise loop is {dit_share:.0%} of the generation's "
            f"wall time here, so caching it can give at most {1 / (1 - dit_share):.2f}x; lower the target"
        )
    return dit_share / rest


def dit_candidates(
    num_blocks: int, steps: int, target_speedup: float, max_candidates: int = 12
) -> list[DiTCacheConfig]:
    """DiTCache settings predicted to reach `target_speedup`, the least aggressive first (closest to
    the target: the fewest skipped evaluations cost the least quality), at most `max_candidates`.

    Example: `dit_candidates(30, 50, 1.6)[0]`.
    """
    n, s = num_blocks, steps
    starts = sorted({max(1, round(s * f)) for f in (0.05, 0.1, 0.2, 0.3, 0.4)})
    ends = sorted({max(2, s - d) for d in (0, 1, max(2, round(s * 0.06)))})
    block_starts = sorted({0, 1, 2, n // 10, n // 5, n // 3} & set(range(n)))
    block_ends = sorted({n, n - 1, n - max(1, n // 10)} & set(range(1, n + 1)))
    found = {}
    for interval in (2, 3, 4):
        for a in starts:
            for e in ends:
                for bs in block_starts:
                    for be in block_ends:
                        if a >= e or bs >= be:
                            continue
                        cfg = DiTCacheConfig(a, interval, e, bs, be)
                        p = predicted_speedup(cfg, s, n)
                        if p >= target_speedup:
                            found[(a, interval, e, bs, be)] = (p, cfg)
    ranked = sorted(found.values(), key=lambda pc: (pc[0], -pc[1].step_start))
    if not ranked:
        raise ValueError(
            f"--target-speedup {target_speedup}: no DiTCache setting reaches it with {n} blocks and "
            f"{s} steps (lower the target or use more steps)"
        )
    # spread the picks over the ranked list, keeping the least aggressive one
    idx = np.unique(np.linspace(0, len(ranked) - 1, min(max_candidates, len(ranked))).round().astype(int))
    return [ranked[i][1] for i in idx]


def _key(cfg: DiTCacheConfig) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True)


def search_dit_cache(
    pipe,
    prompts: list[str],
    out_dir,
    target_speedup: float = 1.6,
    steps: int = 50,
    max_candidates: int = 12,
    progress: bool = True,
    **gen_kwargs,
) -> list[dict]:
    """Run the search on a loaded pipeline; returns the results, best PSNR first, and writes
    `out_dir/best.json` and `out_dir/results.jsonl` (resumable).

    Example:
        results = search_dit_cache(pipe, ["a red circle moves left"], "search/", 1.6, steps=50,
                                   height=480, width=832, num_frames=33, seed=0)
    """
    if not prompts:
        raise ValueError("prompts: give at least one prompt to score candidates on")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    transformer = pipe.transformer
    n = len(repeated_blocks(transformer))
    kw = {"num_inference_steps": steps, "progress": False, "seed": 0, **gen_kwargs}
    results_file = out / "results.jsonl"
    done = {}
    if results_file.is_file():
        for line in results_file.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[r["key"]] = r

    refs, ref_seconds, denoise_seconds = [], [], []
    meta = out / "reference.json"
    meta_d = json.loads(meta.read_text()) if meta.is_file() else {}
    bar = tqdm(total=len(prompts), desc="cache search: references", unit="video", disable=not progress)
    for i, prompt in enumerate(prompts):
        f = out / f"reference_{i}.npy"
        saved = meta_d.get(str(i), {})
        if f.is_file() and saved.get("prompt") == prompt and "denoise_seconds" in saved:
            refs.append(np.load(f))
            ref_seconds.append(saved["seconds"])
            denoise_seconds.append(saved["denoise_seconds"])
        else:
            t0 = time.perf_counter()
            res = pipe(prompt, **kw)
            ref_seconds.append(time.perf_counter() - t0)
            steps_timed = getattr(res, "step_times", None)  # a pipeline without them: all of it is DiT
            denoise_seconds.append(float(sum(steps_timed)) if steps_timed else ref_seconds[-1])
            refs.append(res.frames[0])
            np.save(f, refs[-1])
            meta_d[str(i)] = {
                "prompt": prompt,
                "seconds": ref_seconds[-1],
                "denoise_seconds": denoise_seconds[-1],
            }
            meta.write_text(json.dumps(meta_d, indent=1))
        bar.update(1)
    bar.close()
    share = min(1.0, sum(denoise_seconds) / sum(ref_seconds))
    needed = dit_target(target_speedup, share)
    try:
        candidates = dit_candidates(n, steps, needed, max_candidates)
    except ValueError:
        raise ValueError(
            f"--target-speedup {target_speedup}: the denoise loop is {share:.0%} of the generation's wall "
            f"time here, so the DiT needs {needed:.2f}x, and no DiTCache setting reaches that with {n} blocks "
            f"and {steps} steps (lower the target or use more steps)"
        ) from None
    bar = tqdm(total=len(prompts) * len(candidates), desc="cache search", unit="video", disable=not progress)

    for cfg in candidates:
        key = _key(cfg)
        if key in done:
            bar.update(len(prompts))
            continue
        apply_cache(transformer, cfg)
        scores, errs, seconds = [], [], 0.0
        try:
            for prompt, ref in zip(prompts, refs):
                t0 = time.perf_counter()
                frames = pipe(prompt, **kw).frames[0]
                seconds += time.perf_counter() - t0
                scores.append(psnr(frames, ref))
                errs.append(mse(frames, ref))
                bar.update(1)
            skipped = cache_stats(transformer).skipped_fraction
        finally:
            remove_cache(transformer)
        r = {
            "key": key,
            "config": cfg.to_dict(),
            "psnr": float(np.mean(scores)),
            "psnr_worst": float(np.min(scores)),
            "mse": float(np.mean(errs)),
            "predicted_speedup": predicted_speedup(cfg, steps, n, share),
            "speedup": sum(ref_seconds) / seconds,
            "dit_share": share,
            "skipped_fraction": skipped,
        }
        done[key] = r
        with results_file.open("a") as fh:
            fh.write(json.dumps(r) + "\n")
    bar.close()
    keys = {_key(c) for c in candidates}
    ranked = sorted((r for k, r in done.items() if k in keys), key=lambda r: (-r["psnr"], r["mse"]))
    best = ranked[0]
    (out / "best.json").write_text(
        json.dumps({k: best[k] for k in ("config", "psnr", "psnr_worst", "mse", "speedup")}, indent=1) + "\n"
    )
    return ranked
