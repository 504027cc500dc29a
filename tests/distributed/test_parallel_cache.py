"""Step caches under multi-process generation: DiTCache, AttentionCache, the adaptive cache (first-block
and magnitude signals) and the CFG cache give the single-process cached frames (1e-5 max abs, fp32) under Ulysses, ring and CFG
parallelism, with the same (nonzero) skip counts on every rank as one process, for Wan and OpenSoraPlan
(Skiparse padding under the adaptive signal). One 2-process launch (`_cache_parallel_worker.py`), then
`mmkit generate --cache-config` under torchrun in the same launch.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest

import mmkit

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from _cache_parallel_worker import CACHES, FAMILIES, LAYOUTS, PROMPT  # noqa: E402
from test_parallel_generate import torchrun  # noqa: E402

TOL = 1e-5


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Tiny Wan and OpenSoraPlan t2v folders, the single-process cached frames (cache_refs.npz, keys
    `<family>_<cache>`) and their counts (keys (family, cache))."""
    import torch

    from mmkit.infer.accel.cache import apply_cache, cache_stats, remove_cache
    from mmkit.models.opensoraplan.tiny import create_tiny_osp
    from mmkit.models.wan.tiny import create_tiny_wan

    root = tmp_path_factory.mktemp("parcache")
    create_tiny_wan(root / FAMILIES["wan"][0], task="t2v", seed=0)
    create_tiny_osp(root / FAMILIES["osp"][0], task="t2v", seed=0)
    (root / "dit.json").write_text(json.dumps(CACHES["dit"][0].to_dict()))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers run
    refs, counts = {}, {}
    try:
        for family, (folder, gen, configs) in FAMILIES.items():
            pipe = mmkit.load_pipeline(root / folder, task="t2v", device="cpu")
            for cache, cfgs in configs.items():
                apply_cache(pipe.transformer, *cfgs)
                refs[f"{family}_{cache}"] = pipe(PROMPT, **gen).frames
                s = cache_stats(pipe.transformer)
                counts[family, cache] = (s.blocks_run, s.blocks_skipped, s.attention_reused)
                remove_cache(pipe.transformer)
    finally:
        torch.set_num_threads(threads)
    np.savez(root / "cache_refs.npz", **refs)
    return root, counts


def test_caches_under_ulysses_ring_and_cfg_parallel_equal_one_process(made):
    root, counts = made
    res = torchrun(2, 29721, [str(HERE / "_cache_parallel_worker.py"), str(root)])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    print(res.stdout)
    got: dict[tuple[str, str], list] = {}
    for layout, cache, rank, err, *n in re.findall(
        r"CACHED (\S+) (\S+) (\d) (\S+) (\d+) (\d+) (\d+)", res.stdout
    ):
        got.setdefault((layout, cache), []).append((int(rank), float(err), tuple(map(int, n))))
    for layout, (family, _, caches) in LAYOUTS.items():
        for cache in set(caches):
            runs = got.get((layout, cache))
            assert runs and len(runs) == 2 * caches.count(cache), f"{layout} {cache}: {runs}"
            want = counts[family, cache]
            assert want[1] + want[2] > 0, (
                f"{family} {cache}: the reference skipped nothing; the test would prove nothing"
            )
            for rank, err, n in runs:
                assert n == want, (
                    f"{layout} {cache} rank {rank}: (run, skipped, reused) {n} != one process {want}"
                )
                if rank == 0:  # the model group's rank 0 decodes
                    assert err <= TOL, f"{layout} {cache}: frames max abs {err:.2e} > {TOL}"
                else:
                    assert math.isnan(err)
    run, skipped, _ = counts["wan", "dit"]
    assert f"cache dit: {skipped}/{run + skipped} DiT block evaluations skipped" in res.stdout, res.stdout
    cli = np.load(root / "cli.npy")
    assert np.abs(cli - np.load(root / "cache_refs.npz")["wan_dit"][0]).max() <= TOL
