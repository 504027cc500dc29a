"""torchrun worker for test_parallel_generate.py: multi-process generation == one process.

Usage: `torchrun --nproc_per_node 4 _generate_worker.py ROOT`.

`layouts`: every layout in `CASES` on 4 processes. A layout of 2 ranks leaves data parallelism 2: data
group 0 generates the t2v clip and data group 1 the i2v clip of that case, each compared with the
single-process frames the test wrote to ROOT/refs.npz (same seed). 4-rank layouts run both tasks. The
first rank of each model group prints `MAXERR <case> <task> <latents err> <frames err>` (max abs, fp32).
Then (one launch less) the CLI under torchrun in this process group, where rank 1 raises in its second DiT
call: rank 0 prints `FAIL-START <unix time>` first; the launch must end soon after with rank 1's error.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import mmkit
from mmkit.infer.parallel import InferenceParallel

# generation settings: name -> (height, width, frames); "odd" has 3 x 3 x 3 = 27 tokens (patch 1x2x2)
SIZES = {"base": (32, 32, 5), "odd": (48, 48, 9)}
# case -> (InferenceParallel kwargs, size, reference key suffix); the layouts every video family's test runs
SHARED_CASES = {
    "ulysses2": (dict(ulysses=2), "base", ""),
    "ring2": (dict(ring=2), "base", ""),
    "cfg2": (dict(cfg=2), "base", ""),
    "ulysses2_27tokens": (dict(ulysses=2), "odd", ""),
    "ring2_27tokens": (dict(ring=2), "odd", ""),
    "ulysses2_dit_fsdp_t5_fsdp": (dict(ulysses=2, dit_fsdp=True, t5_fsdp=True), "base", ""),
    "cfg2_ulysses2": (dict(cfg=2, ulysses=2), "base", ""),
}
CASES = {
    **SHARED_CASES,
    # 3 latent frames in chunks [0, 2) and [2, 3); the second decoded after 1 warm-up frame (approximate)
    "ulysses2_vae_parallel": (dict(ulysses=2, vae_parallel=True, vae_warmup=1), "odd", "_split"),
    "ulysses2_ring2": (dict(ulysses=2, ring=2), "base", ""),
}
PROMPT, NEG = "a blue square", "blurry"


def gen_kwargs(size: str, image: str | None, sizes: dict = SIZES) -> dict:
    h, w, f = sizes[size]
    return dict(
        negative_prompt=NEG, image=image, height=h, width=w, num_frames=f, num_inference_steps=2,
        guidance_scale=3.0, seed=5, progress=False,
    )  # fmt: skip


def run_layouts(root: Path, cases: dict = CASES, sizes: dict = SIZES) -> None:
    """Every case (name -> (InferenceParallel kwargs, size, reference key suffix)) against ROOT/refs.npz;
    the latents too where the references hold `<task>_<size>_latents` (else their error prints nan).
    Also the OpenSoraPlan worker's (`_osp_generate_worker.py`), with its folders, cases and sizes."""
    refs = np.load(root / "refs.npz")
    world = dist.get_world_size()
    for case, (kw, size, suffix) in cases.items():
        p = InferenceParallel(**kw)
        dp_rank = dist.get_rank() // p.model_size
        tasks = ["t2v", "i2v"] if world // p.model_size == 1 else [["t2v", "i2v"][dp_rank]]
        for task in tasks:
            t0 = time.perf_counter()
            key, image = f"{task}_{size}", str(root / "first.png") if task == "i2v" else None
            pipe = mmkit.load_pipeline(root / task, task=task, device="cpu", parallel=p)
            latents = None
            if key + "_latents" in refs:
                latents = pipe(PROMPT, output_type="latent", **gen_kwargs(size, image, sizes)).frames
            frames = pipe(PROMPT, **gen_kwargs(size, image, sizes)).frames
            if pipe.layout.writes:
                lat_err = float("nan")
                if latents is not None:
                    lat_err = float((latents - torch.from_numpy(refs[key + "_latents"])).abs().max())
                err = float(np.abs(frames - refs[key + suffix]).max())
                took = time.perf_counter() - t0
                print(f"MAXERR {case} {task} {lat_err:.3e} {err:.3e} ({took:.1f} s)", flush=True)
            else:
                assert frames is None, f"{case}: rank {dist.get_rank()} decoded although it does not write"


def run_fail(root: Path) -> None:
    from mmkit.cli.main import main
    from mmkit.infer.wan_parallel import WanSequenceParallel

    if dist.get_rank() == 1:
        forward, calls = WanSequenceParallel.forward, []

        def failing(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("injected failure on rank 1")
            return forward(self, *args, **kwargs)

        WanSequenceParallel.forward = failing
    args = ["generate", "t2v", "--model", str(root / "t2v"), "--prompt", PROMPT, "--height", "32"]
    args += ["--width", "32", "--frames", "5", "--steps", "20", "--device", "cpu", "--ulysses-size", "2"]
    dist.barrier()
    if dist.get_rank() == 0:
        print(f"FAIL-START {time.time()}", flush=True)
    main(args + ["--out", str(root / "fail.npy")])


def main() -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    torch.set_num_threads(1)
    root = Path(sys.argv[1])
    run_layouts(root)
    run_fail(root)  # ends the launch: rank 1 exits with its error, torchrun stops the others
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
