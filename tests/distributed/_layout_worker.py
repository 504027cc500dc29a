"""Run several training layouts one after another in one torchrun launch (saves start-up time).

Usage: torchrun --nproc_per_node N _layout_worker.py OUT_DIR JSON
JSON: {"base": [cli args...], "layouts": [{"name": str, "args": [cli args...]}, ...]}
Each layout trains with `base + args` and writes OUT_DIR/<name>/metrics.jsonl (rank 0) and, on every rank,
OUT_DIR/<name>/rank<r>.pt: what `layout_helpers.Recorder` saw (whole gradients of the first step, AdamW
moments and weights after the last, collective bytes, shard placements, tokens per rank, block recomputes).
"""

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: layout_helpers
from layout_helpers import Recorder  # noqa: E402

from mmkit.config import parse_cli  # noqa: E402
from mmkit.train.trainer import Trainer  # noqa: E402


def main() -> None:
    out, spec = Path(sys.argv[1]), json.loads(sys.argv[2])
    for lay in spec["layouts"]:
        d = out / lay["name"]
        d.mkdir(parents=True, exist_ok=True)
        args = [*spec["base"], *lay["args"]]
        if "--checkpoint.dir" not in args:
            args += ["--checkpoint.dir", str(d)]
        args += ["--logging.metrics_file", str(d / "metrics.jsonl")]
        rec = Recorder(Trainer(parse_cli(args)))
        rec.fit()
        rec.save(d / f"rank{dist.get_rank()}.pt")
        dist.barrier()
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # metrics are written; skip interpreter teardown (gloo threads can abort it under load)


if __name__ == "__main__":
    main()
