"""Worker for test_checkpoint.py: `torchrun --standalone --nproc_per_node 2 dist_ckpt_worker.py OUT`.

Each rank shards `train_helpers.Toy` with FSDP2 (gloo, CPU; uneven and empty shards included), trains
2 clipped AdamW steps with an EMA, saves a checkpoint in OUT/ckpt; rank 0 writes the full (unsharded) model,
optimizer and EMA tensors to OUT/reference.safetensors for the single-process loader to compare with.
"""

import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/ (train_helpers)
from train_helpers import OPTIM, Toy  # noqa: E402

from mmkit.checkpoint.dcp import save_checkpoint  # noqa: E402
from mmkit.train.ema import EMA  # noqa: E402
from mmkit.train.lr import build_lr_scheduler  # noqa: E402
from mmkit.train.optim import build_optimizer, clip_grad_norm_  # noqa: E402


def main(out: Path) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))  # a hang fails fast
    torch.manual_seed(0)
    model = Toy()
    mesh = init_device_mesh("cpu", (2,))
    fully_shard(model.inp, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = build_optimizer(model, OPTIM)  # over the sharded (DTensor) parameters
    sched = build_lr_scheduler(opt, OPTIM, total_steps=10)
    ema = EMA(model, decay=0.5)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        model(torch.randn(5, 4, generator=gen)).pow(2).mean().backward()
        expected = torch.cat([p.grad.full_tensor().flatten() for p in model.parameters()]).norm().item()
        norm = clip_grad_norm_(model.parameters(), max_norm=0.05)  # DTensor grads: reduced over the mesh
        assert abs(norm - expected) <= 1e-6 * expected and norm > 0.05, (norm, expected)  # clip active
        opt.step()
        opt.zero_grad()
        sched.step()
        ema.update(model)
    save_checkpoint(out / "ckpt", 2, model, opt, sched, ema=ema, data_state={"samples_seen": 10})

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=full)
    flat = StateDictOptions(full_state_dict=True, cpu_offload=True, flatten_optimizer_state_dict=True)
    osd = get_optimizer_state_dict(model, opt, options=flat)
    ema_full = {k: v.full_tensor() for k, v in ema.state_dict().items()}
    if dist.get_rank() == 0:
        ref = {f"model.{k}": v for k, v in msd.items()}
        ref.update({f"optim.{k}": v for k, v in osd.items() if isinstance(v, torch.Tensor)})
        ref.update({f"ema.{k}": v for k, v in ema_full.items()})
        save_file({k: v.contiguous() for k, v in ref.items()}, str(out / "reference.safetensors"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    sys.stdout.flush()
    os._exit(0)  # results are written; skip interpreter teardown (gloo threads can abort it under load)
