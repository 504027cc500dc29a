"""Qwen2.5-VL SFT task: loss only on assistant tokens (by hand), packed == padded (loss and gradients),
freeze switches (weights bit-identical after a step, left out of the optimizer)."""

from __future__ import annotations

import json

import pytest
import torch
from data_helpers import make_image

from mmkit.common import IGNORE_INDEX
from mmkit.config import OptimConfig
from mmkit.data.sft import PackingCollator, SFTCollator, SFTDataset
from mmkit.data.video import SampleKey
from mmkit.models.qwen2_5_vl.load import load_model
from mmkit.models.qwen2_5_vl.processor import Qwen2_5_VLProcessor
from mmkit.models.qwen2_5_vl.tiny import create_tiny_qwen2_5_vl
from mmkit.train.losses import next_token_ce_sum
from mmkit.train.optim import build_optimizer
from mmkit.train.tasks.qwen2_5_vl import VLMSFTTask, VLMTaskConfig


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return create_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny_qwen_task"), seed=0)


@pytest.fixture(scope="module")
def dataset(folder, tmp_path_factory):
    d = tmp_path_factory.mktemp("sft_task_data")
    make_image(40, 60, 0).save(d / "a.png")  # grid (1, 4, 6) -> 6 tokens
    make_image(30, 30, 1).save(d / "b.png")  # grid (1, 4, 4) -> 4 tokens
    recs = [
        {"messages": [{"role": "user", "content": "<image>What color?"}, {"role": "assistant", "content": "red"}],
         "images": ["a.png"]},
        {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi there"}]},
        {"messages": [
            {"role": "user", "content": "<image>Which shape?"}, {"role": "assistant", "content": "a square"},
            {"role": "user", "content": "Where?"}, {"role": "assistant", "content": "top left"}],
         "images": ["b.png"]},
        {"messages": [{"role": "user", "content": "<image><image>Same?"}, {"role": "assistant", "content": "no"}],
         "images": ["a.png", "b.png"]},
    ]  # fmt: skip
    (d / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return SFTDataset(str(d / "qa.jsonl"), Qwen2_5_VLProcessor.from_pretrained(folder), progress=False)


def _task(folder, **freeze):
    model = load_model(folder, device="cpu", dtype="fp32").train()
    return VLMSFTTask(model, VLMTaskConfig(**freeze))


def test_loss_only_on_assistant_tokens_by_hand(folder):
    task = _task(folder)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (2, 7), generator=g)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 4:6] = ids[0, 4:6]  # row 0: assistant tokens at 4, 5
    labels[1, 6] = ids[1, 6]  # row 1: the last token only
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in row 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    batch["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)[None].expand(3, -1, -1)
    out = task.loss(batch)
    with torch.no_grad():
        logits = task.model(ids, attention_mask=mask, position_ids=batch["position_ids"])
    logp = logits.log_softmax(-1)
    # position i predicts token i + 1: targets at 4, 5 (row 0) and 6 (row 1)
    by_hand = -(logp[0, 3, ids[0, 4]] + logp[0, 4, ids[0, 5]] + logp[1, 5, ids[1, 6]])
    assert out.count == 3 and out.samples == 2 and out.tokens == 12
    torch.testing.assert_close(out.loss_sum.detach(), by_hand, rtol=1e-5, atol=1e-5)
    ref, n = next_token_ce_sum(logits, labels)
    assert n == 3
    torch.testing.assert_close(out.loss_sum.detach(), ref, rtol=1e-5, atol=1e-5)


def _grads(task):
    return {n: p.grad.clone() for n, p in task.model.named_parameters() if p.grad is not None}


def test_packed_equals_padded_loss_and_gradients(folder, dataset):
    items = [dataset[SampleKey(i, 0, i + 1)] for i in range(len(dataset))]
    lens = [len(it["input_ids"]) for it in items]
    padded = SFTCollator(dataset.pad_token_id)(items)
    cap = lens[0] + lens[1]  # rows: [0, 1], [2], [3] (first fit) -> several rows and a padded tail
    packed = PackingCollator(dataset.pad_token_id, max_len=cap)(items)
    assert packed["input_ids"].shape[0] >= 2 and not bool(packed["attention_mask"].all())
    assert packed["data_state"] == {"epoch": 0, "consumed": len(items)}
    cu = packed["cu_seqlens"].tolist()
    flat_labels = packed["labels"][packed["attention_mask"].bool()]
    flat_pos = packed["position_ids"][:, packed["attention_mask"].bool()]
    assert cu[-1] == sum(lens) and all(flat_labels[s] == IGNORE_INDEX for s in cu[:-1])
    assert all(int(flat_pos[:, s].max()) == 0 for s in cu[:-1])  # M-RoPE restarts per sample

    task = _task(folder)
    out_pad = task.loss(padded)
    out_pad.loss_sum.backward()
    g_pad = _grads(task)
    task.model.zero_grad(set_to_none=True)
    out_pack = task.loss(packed)
    out_pack.loss_sum.backward()
    g_pack = _grads(task)
    assert out_pack.count == out_pad.count > 0 and out_pack.tokens == out_pad.tokens == sum(lens)
    assert out_pack.samples == out_pad.samples == 4
    torch.testing.assert_close(out_pack.loss_sum, out_pad.loss_sum, rtol=1e-5, atol=1e-5)
    assert g_pad.keys() == g_pack.keys() and any(k.startswith("visual.blocks") for k in g_pad)
    for k in g_pad:
        torch.testing.assert_close(g_pack[k], g_pad[k], rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.parametrize(
    "freeze",
    [{"freeze_vision": True, "freeze_llm": True}, {"freeze_merger": True}, {"freeze_vision": True}],
)
def test_freeze_switches(folder, dataset, freeze):
    task = _task(folder, **freeze)
    model = task.model
    opt = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.1))
    in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
    parts = {
        "freeze_vision": ("visual.patch_embed", "visual.blocks"),
        "freeze_merger": ("visual.merger",),
        "freeze_llm": ("language",),
    }
    frozen_prefixes = tuple(pre for k, v in parts.items() if freeze.get(k) for pre in v)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = SFTCollator(dataset.pad_token_id)([dataset[0], dataset[2]])
    task.loss(batch).loss_sum.backward()
    opt.step()
    for n, p in model.named_parameters():
        if n.startswith(frozen_prefixes):
            assert not p.requires_grad and p.grad is None and id(p) not in in_opt, n
            assert torch.equal(p, before[n]), n
        else:
            assert p.requires_grad and id(p) in in_opt, n
            assert not torch.equal(p, before[n]), n  # trainable weights did move


def test_all_frozen_is_a_clear_error(folder):
    task = _task(folder, freeze_vision=True, freeze_merger=True, freeze_llm=True)
    with pytest.raises(ValueError, match="freeze_vision/freeze_merger/freeze_llm"):
        build_optimizer(task.model, OptimConfig())


def test_train_flops_counts_llm_matmuls(folder):
    task = _task(folder)
    c = task.model.cfg.text
    lang = task.model.language
    # every matmul weight once, the head included even when tied to the (lookup) embedding
    dense = sum(
        p.numel()
        for n, p in lang.named_parameters(remove_duplicate=False)
        if not n.startswith("embed_tokens")
    )
    attn = c.num_hidden_layers * c.num_attention_heads * c.head_dim
    assert task.train_flops(2, 100) == pytest.approx(6 * dense * 100 + 6 * attn * 50 * 100)
