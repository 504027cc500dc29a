"""Train several layouts one after another in one launch, recording per step: the step time, the bytes
every torch.distributed call sent (`mmkit.tools.commstats.CommStats`) and the context-parallel
attention counter `plan.cp_attn.bytes_sent`, with the shapes of every attention call. Used by
`benchmarks/parallel.py`; not a benchmark by itself.

Usage: `torchrun --nproc_per_node N _parallel_worker.py OUT_DIR JSON` (or plain `python` for one
process). JSON: {"audit": bool, "runs": [{"name": str, "args": [cli args...]}, ...]}.
Each run writes OUT_DIR/<name>/rank<r>.json:
{"name", "rank", "world", "layout": {"dp", "tp", "cp", "pp", "micro_batches"}, "missed": {op: calls},
 "steps": [{"step", "step_time_s", "comm": {"bytes", "calls"}, "cp_bytes",
            "attn": [{"B", "Hq", "Hkv", "L", "D", "elt", "u", "r", "fwd"}, ...]}, ...]}
("attn": one entry per context-parallel attention call; "fwd" = the bytes its forward sent).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from mmkit.config import parse_cli
from mmkit.tools.commstats import CommStats
from mmkit.train.metrics import MetricsLogger
from mmkit.train.trainer import Trainer


class StepRecorder:
    """Hooks one trainer: a snapshot at every `MetricsLogger.step` call (once per optimizer step, on
    every rank) and the shapes / forward bytes of every context-parallel attention call.

    Example: `rec = StepRecorder(trainer, cs); rec.install(); trainer.fit(); rec.uninstall(); rec.steps`
    """

    def __init__(self, trainer: Trainer, cs: CommStats):
        self.trainer, self.cs = trainer, cs
        self.cp = trainer.plan.cp_attn if trainer.plan is not None else None
        self.steps: list[dict] = []
        self._attn: list[dict] = []
        self._comm = cs.snapshot()
        self._cp_bytes = 0
        self._orig_step = None

    def install(self) -> None:
        rec, orig = self, MetricsLogger.step
        self._orig_step = orig

        def step(logger, metrics):
            rec.on_step(metrics)
            return orig(logger, metrics)

        MetricsLogger.step = step
        if self.cp is not None:
            self._cp_bytes = self.cp.bytes_sent
            attention = self.cp.attention

            def attn(q, k, v, **kw):
                before = self.cp.bytes_sent
                out = attention(q, k, v, **kw)
                B, Hq, L, D = q.shape
                rec._attn.append({"B": B, "Hq": Hq, "Hkv": k.shape[1], "L": L, "D": D,
                                  "elt": q.element_size(), "u": self.cp.ulysses_size,
                                  "r": self.cp.ring_size, "fwd": self.cp.bytes_sent - before})  # fmt: skip
                return out

            self.cp.attention = attn  # instance attribute: the plan calls `self.cp_attn.attention`

    def uninstall(self) -> None:
        MetricsLogger.step = self._orig_step
        if self.cp is not None:
            del self.cp.attention

    def on_step(self, metrics: dict) -> None:
        snap = self.cs.snapshot()
        cp_bytes = self.cp.bytes_sent if self.cp is not None else 0
        self.steps.append(
            {
                "step": int(metrics["step"]),
                "step_time_s": float(metrics["step_time_s"]),
                "comm": CommStats.delta(self._comm, snap),
                "cp_bytes": cp_bytes - self._cp_bytes,
                "attn": self._attn,
            }
        )
        self._comm, self._cp_bytes, self._attn = snap, cp_bytes, []


def run(out: Path, name: str, args: list[str], audit: bool) -> None:
    """Train one layout and write OUT/<name>/rank<r>.json (see the module docstring).

    Example: `run(Path("/tmp/out"), "fsdp2", ["--config", "recipes/tiny/wan_t2v.toml", ...], audit=False)`
    """
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    cfg = parse_cli([*args, "--logging.metrics_file", str(d / "metrics.jsonl")])
    trainer = Trainer(cfg)
    with CommStats(audit=audit) as cs:
        rec = StepRecorder(trainer, cs)
        rec.install()
        try:
            trainer.fit()
        finally:
            rec.uninstall()
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    d_ = trainer.dims
    layout = {"dp": d_.dp, "tp": d_.tp, "cp": d_.cp, "pp": d_.pp, "micro_batches": trainer.accum}
    rows = {"name": name, "rank": rank, "world": world, "layout": layout, "steps": rec.steps,
            "missed": dict(cs.missed)}  # fmt: skip
    (d / f"rank{rank}.json").write_text(json.dumps(rows))
    if dist.is_initialized():
        dist.barrier()


def main() -> None:
    out, spec = Path(sys.argv[1]), json.loads(sys.argv[2])
    for r in spec["runs"]:
        run(out, r["name"], r["args"], spec.get("audit", False))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
