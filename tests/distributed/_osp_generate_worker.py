"""torchrun worker for test_parallel_generate_osp.py: OpenSoraPlan multi-process generation == one process.

Usage: `torchrun --nproc_per_node 4 _osp_generate_worker.py ROOT`.

Every layout in `CASES` runs on 4 processes through the Wan worker's `run_layouts` (`_generate_worker.py`).
A layout of 2 ranks leaves data parallelism 2: data group 0 generates the t2v clip and data group 1 the i2v
clip of that case; 4-rank layouts run both. Each is compared with the single-process frames the test wrote
to ROOT/refs.npz (same seed), and the first rank of each model group prints
`MAXERR <case> <task> nan <frames err>` (max abs, fp32; no latents references here). Then, in the same
process group, `mmkit generate t2v --prompts` with --ulysses-size 2 (data parallel 2 over the prompts).
"""

from __future__ import annotations

import functools
import sys
from datetime import timedelta
from pathlib import Path

import _generate_worker
import torch
import torch.distributed as dist
from _generate_worker import NEG, PROMPT  # noqa: F401 (the test imports them from here)

# name -> (height, width, frames). Tokens (patch 1x2x2 on 4x8x8 latents): "base" 4 x 2 x 4 = 32, a multiple
# of Skiparse's k^2 x 2 = 32; "odd" 3 x 3 x 3 = 27, padded to 32 (2 ranks) or 64 (4 ranks: k^2 x 4)
SIZES = {"base": (32, 64, 13), "odd": (48, 48, 9)}
# case -> (InferenceParallel kwargs, size, reference key suffix): the shared layouts, hybrid on 27 tokens
CASES = {**_generate_worker.SHARED_CASES, "ulysses2_ring2_27tokens": (dict(ulysses=2, ring=2), "odd", "")}
gen_kwargs = functools.partial(_generate_worker.gen_kwargs, sizes=SIZES)  # (size, image) -> pipeline kwargs


def run_cli_prompts(root: Path) -> None:
    """Two prompts (lines 1 and 3) over data parallel 2, each on a Ulysses-2 group, through the CLI."""
    from mmkit.cli.main import main

    h, w, f = SIZES["base"]
    args = ["generate", "t2v", "--model", str(root / "t2v"), "--prompts", str(root / "prompts.txt")]
    args += ["--negative-prompt", NEG, "--height", str(h), "--width", str(w), "--frames", str(f)]
    args += ["--steps", "2", "--guidance", "3", "--seed", "5", "--device", "cpu", "--ulysses-size", "2"]
    assert main(args + ["--out", str(root / "cli.npy")]) == 0


def run_skiparse_split() -> None:
    """`skiparse_context_parallel` when the degree does not divide k (heads split too) == one device:
    3 ranks with k = 4 (all groups, a third of the heads each), 4 ranks with k = 2 (1 group x half the
    heads), 2 ranks with k = 4 (2 groups, all heads); odd token counts, a key bias, both modes. Prints
    `SKIPARSE <cp> <k> <heads> <mode> <max abs>` on rank 0."""
    from mmkit.models.opensoraplan.model import skiparse_attention
    from mmkit.parallel.plans.opensoraplan import skiparse_context_parallel

    rank = dist.get_rank()
    groups = {3: dist.new_group([0, 1, 2], timeout=timedelta(seconds=120)), 4: dist.group.WORLD}
    groups[2] = dist.new_group([0, 1], timeout=timedelta(seconds=120))
    for cp, n, H, valid in ((3, 4, 6, 37), (4, 2, 4, 13), (2, 4, 2, 45)):
        if rank >= cp:
            continue
        gen = torch.Generator().manual_seed(cp)
        S_pad = -(-valid // (n * n * cp)) * n * n * cp
        q, k, v = (torch.randn(2, H, S_pad, 8, generator=gen) for _ in range(3))
        bias = torch.where(torch.rand(2, valid, generator=gen) < 0.2, -1e4, 0.0)
        L = S_pad // cp
        for mode in ("single", "group"):
            want = skiparse_attention(q[:, :, :valid], k[:, :, :valid], v[:, :, :valid], bias, mode, n)
            piece = [t[:, :, rank * L : (rank + 1) * L] for t in (q, k, v)]
            got = skiparse_context_parallel(*piece, bias, valid, mode, n, groups[cp])
            mine = want[:, :, rank * L : min((rank + 1) * L, valid)]
            err = torch.tensor(
                float((got[:, :, : mine.shape[2]] - mine).abs().max()) if mine.numel() else 0.0
            )
            dist.all_reduce(err, op=dist.ReduceOp.MAX, group=groups[cp])
            if rank == 0:
                print(f"SKIPARSE {cp} {n} {H} {mode} {float(err):.3e}", flush=True)


def main() -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    torch.set_num_threads(1)
    root = Path(sys.argv[1])
    run_skiparse_split()
    _generate_worker.run_layouts(root, CASES, SIZES)
    run_cli_prompts(root)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
