"""Run several training layouts one after another in one torchrun launch (saves start-up time).

Usage: torchrun --nproc_per_node N _layout_worker.py OUT_DIR JSON
JSON: {"base": [cli args...], "layouts": [{"name": str, "args": [cli args...]}, ...]}
Each layout trains with `base + args` and writes OUT_DIR/<name>/metrics.jsonl (rank 0).
"""

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from mmkit.config import parse_cli
from mmkit.train.trainer import Trainer


def main() -> None:
    out, spec = Path(sys.argv[1]), json.loads(sys.argv[2])
    for lay in spec["layouts"]:
        d = out / lay["name"]
        args = [*spec["base"], *lay["args"]]
        if "--checkpoint.dir" not in args:
            args += ["--checkpoint.dir", str(d)]
        args += ["--logging.metrics_file", str(d / "metrics.jsonl")]
        trainer = Trainer(parse_cli(args))
        trainer.fit()
        dist.barrier()
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # metrics are written; skip interpreter teardown (gloo threads can abort it under load)


if __name__ == "__main__":
    main()
