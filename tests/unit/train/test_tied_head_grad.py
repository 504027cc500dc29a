"""Memory-lean training paths that must not change results: the Qwen2.5-VL SFT task with a tied LM head
(3B layout: the token lookup's gradient is sparse and added in place into the head's dense one) gives
plain autograd's gradients and loss, packed or padded, over several micro-batches; `build_optimizer`'s
fused AdamW makes the default implementation's update."""

import copy

import pytest
import torch
from torch import nn

from mmkit.common import IGNORE_INDEX
from mmkit.config import OptimConfig
from mmkit.models.qwen2_5_vl.model import Qwen2_5_VLModel
from mmkit.models.qwen2_5_vl.tiny import perturbed_init, tiny_config
from mmkit.train.losses import next_token_ce_sum
from mmkit.train.optim import build_optimizer
from mmkit.train.tasks.qwen2_5_vl import VLMSFTTask


def _tied_model() -> Qwen2_5_VLModel:
    cfg = tiny_config()
    cfg.tie_word_embeddings = True
    model = Qwen2_5_VLModel(cfg)
    perturbed_init(model, seed=1)
    assert model.language.lm_head.weight is model.language.embed_tokens.weight
    return model.train()


def _padded(seed: int) -> dict:
    """Two text rows, the second left-padded; labels on a few assistant positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 380, (2, 9), generator=g)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 5:8] = ids[0, 5:8]
    labels[1, 7:] = ids[1, 7:]
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    pos = (mask.cumsum(1) - 1).clamp(min=0)[None].expand(3, -1, -1)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "position_ids": pos}


def _packed(batch: dict) -> dict:
    """The same samples as one packed row (what `PackingCollator` makes)."""
    valid = batch["attention_mask"].bool()
    lens = valid.sum(1).tolist()
    pos = torch.cat([torch.arange(n) for n in lens])[None, None].expand(3, 1, -1)
    return {
        "input_ids": batch["input_ids"][valid][None],
        "labels": batch["labels"][valid][None],
        "attention_mask": torch.ones(1, sum(lens), dtype=torch.long),
        "position_ids": pos,
        "cu_seqlens": torch.tensor([0, lens[0], sum(lens)]),
    }


def _reference(model, batches) -> tuple[float, dict]:
    """Summed CE over full logits with plain autograd (dense lookup gradient), summed over batches."""
    total = 0.0
    for b in batches:
        logits = model(b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"])
        loss, _ = next_token_ce_sum(logits, b["labels"])
        loss.backward()
        total += loss.item()
    return total, {k: p.grad for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_tied_head_gradients_equal_plain_autograd(packed):
    model = _tied_model()
    ref_loss, want = _reference(copy.deepcopy(model), [_padded(0), _padded(1)])
    task = VLMSFTTask(model)
    total = 0.0
    for seed in (0, 1):  # two micro-batches: the second adds into existing gradients
        b = _padded(seed)
        out = task.loss(_packed(b) if packed else b)
        out.loss_sum.backward()
        total += out.loss_sum.item()
    emb = model.language.embed_tokens
    assert emb.sparse is False  # restored after the forward
    assert emb.weight.grad.layout == torch.strided and emb.weight.grad.is_contiguous()
    assert total == pytest.approx(ref_loss, rel=1e-6)
    got = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert sorted(got) == sorted(want)
    for name, g in want.items():  # float rounding only (the head runs on K rows, not all logits)
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-6 * float(g.abs().max()), msg=name)


def test_fused_adamw_makes_the_default_update():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    ref, start = copy.deepcopy(net), copy.deepcopy(net)
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1)
    opt = build_optimizer(net, cfg)
    assert all(g["fused"] for g in opt.param_groups)
    groups = [
        {"params": g["params"], "weight_decay": g["weight_decay"]}
        for g in build_optimizer(ref, cfg).param_groups
    ]
    plain = torch.optim.AdamW(groups, lr=cfg.lr, foreach=False, fused=False)  # the per-parameter loop
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        for a, b in zip(net.parameters(), ref.parameters()):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        opt.step()
        plain.step()
    for a, b, a0 in zip(net.parameters(), ref.parameters(), start.parameters()):
        assert (a - a0).abs().max() > 1e-3  # the weights did move
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
