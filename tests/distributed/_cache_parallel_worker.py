"""torchrun worker for test_parallel_cache.py: step caches under multi-process generation == one process.

Usage: `torchrun --nproc_per_node 2 _cache_parallel_worker.py ROOT`.

For each layout of `LAYOUTS` (2 ranks each) the tiny t2v pipeline of its family (Wan, OpenSoraPlan) is
loaded once and its caches (of `CACHES`) are installed on its transformer in turn; each rank prints
`CACHED <layout> <cache> <rank> <frames max abs err or nan> <blocks run> <skipped> <attention reused>`
with the video's counts (`InferenceLayout.video_counts`), against the single-process references the test
wrote to ROOT/cache_refs.npz (keys `<family>_<cache>`). Under ulysses2 DiTCache runs again after the
others (state reset).
Then `mmkit generate ... --cache-config dit.json --ulysses-size 2` in this process group prints its count line.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import mmkit
from mmkit.infer.accel.cache import (
    AdaptiveCacheConfig,
    AttentionCacheConfig,
    CFGCacheConfig,
    DiTCacheConfig,
    apply_cache,
    cache_stats,
    remove_cache,
)
from mmkit.infer.accel.cache.adaptive import CALIBRATION_VERSION
from mmkit.infer.parallel import InferenceParallel

# 45 tokens (3 x 3 x 5 patches): padded to 46 over 2 ranks, so the adaptive signal must mask padding;
# 23 rows per rank, on the same Linear kernel as one process's 45 rows (`ops.MIN_ROWS`)
KWARGS = dict(
    negative_prompt="blurry", height=48, width=80, num_frames=9, num_inference_steps=6,
    guidance_scale=3.0, seed=5, progress=False,
)  # fmt: skip
PROMPT = "a blue square"
# the magnitude signal with a hand-made calibration (rate 1 per unit of sigma everywhere): it decides from
# the timestep alone, and a skipped step returns the branch's last output without running the model
MAGNITUDE_CALIB = {
    "version": CALIBRATION_VERSION, "steps": 50, "first_block": {},
    "magnitude": {"cond": {"sigma": [1.0, 0.0], "rate": [1.0, 1.0]}},
}  # fmt: skip
CACHES = {
    "dit": [DiTCacheConfig(step_start=1, step_interval=2, step_end=6, block_start=0, block_end=2)],
    "attention": [AttentionCacheConfig(step_start=1, step_interval=2, step_end=6)],
    "adaptive": [AdaptiveCacheConfig(threshold=0.2, warmup=1)],
    "adaptive_cfg": [AdaptiveCacheConfig(threshold=0.2, warmup=1), CFGCacheConfig(1, 2, 6)],
    "magnitude": [AdaptiveCacheConfig(1.0, max_skips=1, sigma_max=1.0, calibration=MAGNITUDE_CALIB)],
}
# OpenSoraPlan: 27 tokens (3 x 3 x 3 patches), padded to Skiparse's k^2 x 2 = 32 over 2 ranks. Its
# first-block signal runs higher (0.28-0.44 per step here): a threshold of 0.3 skips 2 of the 6 steps
OSP_KWARGS = {**KWARGS, "height": 48, "width": 48}
OSP_ADAPTIVE = AdaptiveCacheConfig(threshold=0.3, warmup=1)
OSP_CACHES = {**CACHES, "adaptive": [OSP_ADAPTIVE], "adaptive_cfg": [OSP_ADAPTIVE, CFGCacheConfig(1, 2, 6)]}
# family -> (folder under ROOT, generation kwargs, caches)
FAMILIES = {"wan": ("t2v", KWARGS, CACHES), "osp": ("osp_t2v", OSP_KWARGS, OSP_CACHES)}
# layout -> (family, InferenceParallel kwargs, caches run; the first runs again after the others: reset)
LAYOUTS = {
    "ulysses2": ("wan", dict(ulysses=2), [*CACHES, "dit"]),
    "cfg2": ("wan", dict(cfg=2), list(CACHES)),
    "ring2": ("wan", dict(ring=2), ["adaptive", "magnitude"]),
    "osp_ulysses2": ("osp", dict(ulysses=2), list(CACHES)),
    "osp_ring2": ("osp", dict(ring=2), ["adaptive"]),
}


def run_layouts(root: Path) -> None:
    refs = np.load(root / "cache_refs.npz")
    rank = dist.get_rank()
    for name, (family, kw, caches) in LAYOUTS.items():
        folder, gen, configs = FAMILIES[family]
        pipe = mmkit.load_pipeline(root / folder, task="t2v", device="cpu", parallel=InferenceParallel(**kw))
        for cache in caches:
            apply_cache(pipe.transformer, *configs[cache])
            frames = pipe(PROMPT, **gen).frames
            s = cache_stats(pipe.transformer)
            run, skipped, reused = pipe.layout.video_counts(
                [s.blocks_run, s.blocks_skipped, s.attention_reused]
            )
            ref = refs[f"{family}_{cache}"]
            err = float(np.abs(frames - ref).max()) if frames is not None else float("nan")
            print(f"CACHED {name} {cache} {rank} {err:.3e} {run} {skipped} {reused}", flush=True)
            remove_cache(pipe.transformer)
        assert not pipe.transformer.__dict__.get("_mmkit_hooks"), "remove_cache left hooks behind"


def run_cli(root: Path) -> None:
    from mmkit.cli.main import main

    args = [
        "generate",
        "t2v",
        "--model",
        str(root / "t2v"),
        "--prompt",
        PROMPT,
        "--negative-prompt",
        "blurry",
    ]
    args += ["--height", "48", "--width", "80", "--frames", "9", "--steps", "6", "--guidance", "3"]
    args += [
        "--seed",
        "5",
        "--device",
        "cpu",
        "--ulysses-size",
        "2",
        "--cache-config",
        str(root / "dit.json"),
    ]
    args += ["--out", str(root / "cli.npy"), "--overwrite"]
    dist.barrier()
    assert main(args) == 0


def main() -> None:
    # ranks that disagree on a skip wait in different collectives: fail within a minute, not hang
    os.environ["MMKIT_PG_TIMEOUT_S"] = "60"  # the layout's groups
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    root = Path(sys.argv[1])
    run_layouts(root)
    run_cli(root)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
