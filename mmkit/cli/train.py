"""`mmkit train --config recipes/<name>.toml [--section.field value ...]` (also `python -m mmkit.train`).

Example: `mmkit train --config recipes/tiny/wan_t2v.toml --train.steps 20 --metrics-file m.jsonl`.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    # the arguments after `train` (--config FILE, --section.field value ...) go to mmkit.config.parse_cli
    p.set_defaults(overrides=[])


def run(a) -> int:
    from mmkit.config import parse_cli
    from mmkit.train.trainer import Trainer

    cfg = parse_cli(a.overrides)  # every config error is raised here, before any compute
    with Trainer(cfg) as trainer:
        losses = trainer.fit()
    if losses and trainer.rank == 0:
        print(f"trained to step {cfg.train.steps}: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return 0
