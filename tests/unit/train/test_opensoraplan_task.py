"""OpenSoraPlan 1.3 training task: the loss against the original trainer's numbers (`sched_io`), the
explicit uniform timestep strata, caption dropout with the empty prompt's mask, and the i2v condition."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmkit import registry
from mmkit.models.opensoraplan.masks import compress_mask, pick_mask_type, pixel_mask
from mmkit.train.tasks.opensoraplan import OpenSoraPlanTask, OSPTaskConfig, stratified_timestep

FIX = Path(__file__).resolve().parents[2] / "fixtures" / "opensoraplan13" / "sched_io.safetensors"
TOL = dict(rtol=1e-5, atol=1e-6)


def _task(task="t2v", **kw):
    model = registry.get("opensoraplan").build_model(
        registry.get("opensoraplan").flavor("tiny" if task == "t2v" else "tiny-i2v")
    )
    return OpenSoraPlanTask(model, None, OSPTaskConfig(task=task, **kw))


def _batch(B=4, g=None):
    g = g or torch.Generator().manual_seed(0)
    return {
        "latents": torch.randn(B, 8, 3, 6, 10, generator=g),
        "text_context": torch.randn(B, 8, 32, generator=g),
        "text_mask": torch.arange(8)[None].expand(B, 8) < 5,
        "null_text_context": torch.randn(1, 8, 32, generator=g).expand(B, 8, 32),
        "null_text_mask": (torch.arange(8) < 1)[None].expand(B, 8),
        "caption": [f"c{i}" for i in range(B)],
        "index": torch.arange(B),
        "epoch": torch.zeros(B, dtype=torch.long),
    }


def test_loss_matches_original_trainer():
    io = load_file(FIX)
    task = _task()
    torch.testing.assert_close(task.alphas_cumprod, io["train_alphas_cumprod"], **TOL)
    from mmkit.train import losses as L

    t = io["loss_timesteps"]
    xt, v = L.v_noisy(io["loss_x0"], io["loss_noise"], t, task.alphas_cumprod)
    torch.testing.assert_close(xt, io["loss_noisy"], **TOL)
    torch.testing.assert_close(v, io["loss_v_target"], **TOL)
    w = L.min_snr_v_weights(L.snr(t, task.alphas_cumprod), 5.0)
    torch.testing.assert_close(w, io["loss_weights_snr_gamma5"], **TOL)
    prep = {"target": v, "weight": w, "video_mask": io["loss_attention_mask"]}
    out = task.criterion(io["loss_model_pred"], prep)
    torch.testing.assert_close((out.loss_sum / out.count).reshape(1), io["loss_value_masked"], **TOL)


def test_explicit_uniform_sampling_strata():
    # four strata of [0, 1000): rank r draws round(uniform(250 r - 0.5, 250 (r + 1) - 0.5))
    assert [stratified_timestep(r, 4, 0.0) for r in range(4)] == [0, 250, 500, 750]
    assert stratified_timestep(3, 4, 0.9999999) == 999  # round(999.5) would be 1000
    task = _task(timestep_strata=4)
    task.sample_order = lambda epoch: list(range(16))  # position = index
    b = _batch(B=16)
    b.update({k: torch.cat([v] * 4) if isinstance(v, torch.Tensor) and k not in ("index", "epoch") else v
              for k, v in _batch(B=4).items()})  # fmt: skip
    b["index"], b["epoch"], b["caption"] = torch.arange(16), torch.zeros(16, dtype=torch.long), ["c"] * 16
    t = task.prepare(b, torch.Generator().manual_seed(1))["timestep"]
    for pos, ts in enumerate(t.tolist()):
        assert 250 * (pos % 4) <= ts < 250 * (pos % 4 + 1), (pos, ts)


def test_caption_dropout_uses_empty_prompt_and_its_mask():
    task = _task(text_dropout=0.5)
    b = _batch(B=8)
    prep = task.prepare(b, torch.Generator().manual_seed(3))
    dropped = [bool(torch.equal(prep["text_context"][i], b["null_text_context"][i])) for i in range(8)]
    assert 0 < sum(dropped) < 8
    for i, d in enumerate(dropped):
        assert int(prep["text_mask"][i].sum()) == (1 if d else 5)
    again = task.prepare(b, torch.Generator().manual_seed(3))  # keyed on the sample visit: reproducible
    assert torch.equal(again["latents"], prep["latents"]) and torch.equal(again["timestep"], prep["timestep"])


def test_i2v_condition_channels():
    task = _task("i2v", mask_type_ratios={"i2v": 1.0})
    b = _batch(B=2)
    b["masked_i2v"] = torch.randn(2, 1, 8, 3, 6, 10)  # (B, K, C, T', H', W') as extracted
    b["gen_i2v"] = pixel_mask("i2v", 9, 1, 1)[:, 0, 0, 0].expand(2, 1, 9)
    prep = task.prepare(b, torch.Generator().manual_seed(0))
    x = prep["latents"]  # [noisy 8 | masked 8 | mask 4]
    assert x.shape == (2, 20, 3, 6, 10)
    mask = x[:, 16:]
    assert torch.all(mask[:, :, 0] == 0) and torch.all(
        mask[:, :, 1:] == 1
    )  # frame 0 given, the rest generated
    assert torch.equal(x[:, 8:16], b["masked_i2v"][:, 0])  # the masked video's latents as extracted
    out = task.loss(b, torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss_sum) and out.count == 2 * 8 * 3 * 6 * 10
    with pytest.raises(ValueError, match="no masked-video latents for mask type 'i2v'.*mmkit data features"):
        task.prepare(_batch(B=2), torch.Generator().manual_seed(0))  # features extracted for t2v


def test_mask_types():
    m = pixel_mask("transition", 9, 2, 2)[:, 0, 0, 0]
    assert m.tolist() == [0, 1, 1, 1, 1, 1, 1, 1, 0]
    assert pixel_mask("clear", 5, 1, 1).sum() == 0 and pixel_mask("t2iv", 5, 1, 1).sum() == 5
    cont = pixel_mask("continuation", 9, 1, 1, rng=random.Random(0))[:, 0, 0, 0]
    k = int((cont == 0).sum())
    assert cont[:k].sum() == 0 and cont[k:].sum() == 9 - k
    assert compress_mask(torch.ones(1, 1, 9, 16, 16)).shape == (1, 4, 3, 2, 2)
    draws = [pick_mask_type({"i2v": 3, "clear": 1}, random.Random(i)) for i in range(400)]
    assert 250 < draws.count("i2v") < 350
    with pytest.raises(ValueError, match="mask_type_ratios"):
        pick_mask_type({"nope": 1.0})


class _FakeEncoders:
    """Stands in for the family pipeline's frozen parts: `encode` (WF-VAE), `encode_prompt` (mT5)."""

    class _Tok:
        def __call__(self, text, add_special_tokens=True):
            return type("T", (), {"input_ids": list(range(len(text.split()) + 1))})()  # words + </s>

    def __init__(self):
        self.text_encoder = type("E", (), {"tokenizer": self._Tok()})()

    def encode(self, video):  # (B, 3, 9, 48, 80) -> (B, 8, 3, 6, 10)
        x = torch.nn.functional.avg_pool3d(video, (1, 8, 8))
        return torch.cat([x[:, :, :1], x[:, :, 1:].unflatten(2, (2, 4)).mean(3)], 2).repeat(1, 3, 1, 1, 1)[
            :, :8
        ]

    def encode_prompt(self, prompts):
        n = [len(p.split()) + 1 for p in prompts]
        mask = torch.arange(8)[None] < torch.tensor(n)[:, None]
        return torch.stack([torch.full((8, 32), float(k)) for k in n]) * mask[..., None], mask


def test_features_written_and_read_back(tmp_path):
    from mmkit.data.features import FeatureDataset, collate_features, extract_features

    model = registry.get("opensoraplan").build_model(registry.get("opensoraplan").flavor("tiny"))
    task = OpenSoraPlanTask(model, _FakeEncoders(), OSPTaskConfig())
    g = torch.Generator().manual_seed(0)
    clips = [{"video": torch.rand(3, 9, 48, 80, generator=g) * 2 - 1, "caption": c, "path": f"{i}.mp4"}
             for i, c in enumerate(["a red ball", "two cats play"])]  # fmt: skip
    extract_features(task, clips, tmp_path / "f", progress=False)
    ds = FeatureDataset(tmp_path / "f")
    b = collate_features([ds[0], ds[1]])
    assert b["latents"].shape == (2, 8, 3, 6, 10) and b["text_mask"].sum(1).tolist() == [4, 4]
    assert b["null_text_mask"].sum(1).tolist() == [1, 1]  # "" -> </s>
    raw = task.prepare({"video": torch.stack([c["video"] for c in clips]), "caption": b["caption"],
                        "index": b["index"], "epoch": b["epoch"]}, torch.Generator().manual_seed(5))  # fmt: skip
    pre = task.prepare(b, torch.Generator().manual_seed(5))  # the same draws on features as on raw videos
    for k in ("latents", "timestep", "text_context", "text_mask", "target"):
        torch.testing.assert_close(pre[k].float(), raw[k].float(), msg=k)


def test_clips_of_different_sizes_pad_and_mask():
    from mmkit.data.features import collate_features

    items = [
        {"latents": torch.randn(8, 3, 6, 10), "caption": "a", "data_state": None},
        {"latents": torch.randn(8, 2, 4, 10), "caption": "b", "data_state": None},
    ]
    b = collate_features(items, pad=True)
    assert b["latents"].shape == (2, 8, 3, 6, 10)
    vm = b["video_mask"]
    assert vm.shape == (2, 3, 6, 10) and vm[0].all() and int(vm[1].sum()) == 2 * 4 * 10
    assert vm[1, :2, :4].all() and torch.equal(b["latents"][1, :, :2, :4], items[1]["latents"])
    assert not b["latents"][1, :, 2:].any() and not b["latents"][1, :, :, 4:].any()
    assert "video_mask" not in collate_features([items[0], items[0]], pad=True)  # one size: no mask
    with pytest.raises(RuntimeError):
        collate_features(items)  # without padding, sizes must agree


def test_i2v_features_equal_raw_videos_for_every_mask_type(tmp_path):
    """The masked videos' latents come from extraction: training on i2v features gives the raw-video
    batches for every mask type (random types: the same fixed draws, data.mask_draws = 2)."""
    from mmkit.data.features import FeatureDataset, collate_features, extract_features
    from mmkit.models.opensoraplan.masks import MASK_TYPES

    spec = registry.get("opensoraplan")
    model, enc = spec.build_model(spec.flavor("tiny-i2v")), _FakeEncoders()
    ratios = dict.fromkeys(MASK_TYPES, 1.0)
    g = torch.Generator().manual_seed(0)
    clips = [{"video": torch.rand(3, 9, 48, 80, generator=g) * 2 - 1, "caption": c, "path": f"{i}.mp4"}
             for i, c in enumerate(["a red ball", "two cats play"])]  # fmt: skip
    extract_features(
        OpenSoraPlanTask(model, enc, OSPTaskConfig("i2v", mask_type_ratios=ratios, mask_draws=2)),
        clips, tmp_path / "f", progress=False,
    )  # fmt: skip
    ds = FeatureDataset(tmp_path / "f")
    assert ds.task == "i2v"
    feats = collate_features([ds[0], ds[1]])
    assert feats["masked_continuation"].shape == (2, 2, 8, 3, 6, 10) and feats["gen_i2v"].shape == (2, 1, 9)
    raw = {"video": torch.stack([c["video"] for c in clips]), "caption": feats["caption"],
           "index": feats["index"], "epoch": feats["epoch"]}  # fmt: skip
    for kind in MASK_TYPES:
        task = OpenSoraPlanTask(model, enc, OSPTaskConfig("i2v", mask_type_ratios={kind: 1.0}, mask_draws=2))
        for seed in (5, 6):  # different visits pick different draws of the random types
            pre = task.prepare(feats, torch.Generator().manual_seed(seed))
            ref = task.prepare(raw, torch.Generator().manual_seed(seed))
            torch.testing.assert_close(pre["latents"], ref["latents"], msg=kind)
        if kind == "transition":  # the last latent frame mixes a given frame with generated ones
            masked = pre["latents"][:, 8:16, -1]
            assert masked.abs().amax() > 1e-3  # not the zeroed latent frame of a latent-space stand-in
