"""`mmkit accel search|calibrate`: find a DiTCache setting for a target speedup; calibrate the adaptive cache.

Example:
    mmkit accel search --model DIR --prompts prompts.txt --target-speedup 1.6 --steps 50 --out search/
    mmkit generate t2v --model DIR --prompt "..." --cache-config search/best.json --out out.mp4
    mmkit accel calibrate --model DIR --prompt "a red circle moves left" --steps 50 --out calib.json
"""

from __future__ import annotations

import json
from pathlib import Path


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    for name in ("search", "calibrate"):
        q = sub.add_parser(name)
        q.add_argument("--model", required=True, help="diffusers-layout folder (model_index.json)")
        q.add_argument("--steps", type=int, default=50)
        q.add_argument("--height", type=int, default=480)
        q.add_argument("--width", type=int, default=832)
        q.add_argument("--frames", type=int, default=33)
        q.add_argument("--guidance", type=float, default=5.0)
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--device", default="auto")
        q.add_argument("--dtype", default="fp32")
        q.add_argument("--no-progress", action="store_true")
    s = sub.choices["search"]
    s.add_argument("--prompts", required=True, help="text file, one prompt per line")
    s.add_argument("--target-speedup", type=float, default=1.6)
    s.add_argument("--max-candidates", type=int, default=12)
    s.add_argument("--out", default="cache_search", help="folder: results.jsonl (resumable), best.json")
    c = sub.choices["calibrate"]
    c.add_argument("--prompt", required=True)
    c.add_argument("--out", default="calibration.json")
    c.add_argument(
        "--probes",
        type=int,
        default=12,
        help="sensitivity probes, each a run that skips one step (it replays the recorded run up to that "
        "step: 12 probes at 50 steps cost about 6 generations); 0: none, every sigma weighs 1",
    )


def run(a) -> int:
    if a.steps < 2:
        raise ValueError(f"--steps {a.steps}: a cache needs at least 2 steps")
    prompts = None
    if a.action == "search":
        if not Path(a.prompts).is_file():
            raise FileNotFoundError(f"--prompts: file not found: {a.prompts}")
        prompts = [line.strip() for line in Path(a.prompts).read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"--prompts {a.prompts}: no prompts (one per line)")
        if a.target_speedup <= 1.0:
            raise ValueError(f"--target-speedup {a.target_speedup}: must be > 1")
    from mmkit.infer.pipelines import load_pipeline

    pipe = load_pipeline(a.model, task="t2v", device=a.device, dtype=a.dtype)
    kw = dict(height=a.height, width=a.width, num_frames=a.frames, guidance_scale=a.guidance, seed=a.seed)
    if a.action == "calibrate":
        from mmkit.infer.accel.cache.adaptive import calibrate_adaptive

        if a.probes < 0:
            raise ValueError(f"--probes {a.probes}: a count >= 0 (0: no sensitivity probes)")
        calib = calibrate_adaptive(pipe, a.prompt, a.steps, a.probes, progress=not a.no_progress, **kw)
        Path(a.out).write_text(json.dumps(calib, indent=1) + "\n")
        from mmkit.infer.accel.cache.adaptive import TRANSFER_MEASURED

        lo, hi = (round(f * a.steps) for f in TRANSFER_MEASURED)
        print(
            f"calibrated at {a.steps} steps (recorded in the file; its sigma-indexed curves serve "
            f"{lo}..{hi} steps without recalibration, measured); first-block scale {calib['first_block_scale']:.3f}"
        )
        sens = calib.get("sensitivity")
        if sens:
            pairs = ", ".join(f"{x:.2f}: {w:.1f}" for x, w in zip(sens["sigma"], sens["weight"]))
            print(f"sensitivity weight by sigma ({len(sens['sigma'])} probes): {pairs}")
        print(f"wrote {a.out}")
        return 0
    from mmkit.infer.accel.search import search_dit_cache

    results = search_dit_cache(
        pipe, prompts, a.out, a.target_speedup, a.steps, a.max_candidates, progress=not a.no_progress, **kw
    )
    share = results[0]["dit_share"]
    print(
        f"the denoise loop took {share:.0%} of an uncached generation; candidates aim at "
        f"{a.target_speedup}x on the whole generation"
    )
    print(f"top 3 of {len(results)} candidates (target {a.target_speedup}x):")
    for r in results[:3]:
        c = r["config"]
        print(
            f"  steps [{c['step_start']}, {c['step_end']}) every {c['step_interval']}, blocks "
            f"[{c['block_start']}, {c['block_end']}): PSNR {r['psnr']:.2f} dB (worst {r['psnr_worst']:.2f}), "
            f"MSE {r['mse']:.2e}, speedup {r['speedup']:.2f}x (predicted {r['predicted_speedup']:.2f}x)"
        )
    print(
        f"wrote {Path(a.out) / 'best.json'} (use: mmkit generate ... --cache-config {Path(a.out) / 'best.json'})"
    )
    return 0
