"""Worker for test_cache_decision.py: each rank sees its own signal; the adaptive cache's `decide`
must give every rank the same decision (the all-reduced maximum). Launched by torchrun on gloo."""

from datetime import timedelta

import torch.distributed as dist

from mmkit.infer.accel.cache.adaptive import decide


def main() -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    group = dist.new_group([0, 1], timeout=timedelta(seconds=60))
    # rank 0 alone would skip (0.05 < 0.1), rank 1 would not (0.2): together nobody skips
    for name, signals in (("split", [0.05, 0.2]), ("both_low", [0.05, 0.08]), ("both_high", [0.3, 0.2])):
        skip_local, _ = decide(signals[rank], 0.1)
        skip, signal = decide(signals[rank], 0.1, group=group)
        print(
            f"DECISION {name} rank={rank} local={int(skip_local)} skip={int(skip)} signal={signal:.3f}",
            flush=True,
        )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
