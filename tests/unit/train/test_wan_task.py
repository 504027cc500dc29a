"""WanTask (mmkit/train/tasks/wan.py) by hand: caption dropout replaces exactly the drawn captions, and the
v-prediction (zero terminal SNR, min-SNR weights) and flow i2v losses equal the loss computed here from the
same per-sample generators (timestep, noise, target, conditioning written out in the test)."""

from __future__ import annotations

import pytest
import torch
from wan_helpers import hand_wan_loss

from mmkit.models.wan.config import WanConfig
from mmkit.models.wan.model import WanTransformer
from mmkit.models.wan.tiny import TINY_DIT
from mmkit.train.tasks.wan import WanTask, WanTaskConfig, sample_generator

B, C, T, H, W = 6, 16, 2, 4, 4  # latents (B, C, T_lat, H_lat, W_lat)
TEXT = 7  # text tokens


class FakeEncoders:
    """Stands in for the frozen VAE / umT5 / CLIP: records the prompts it encodes; a prompt's features are
    its length (0 for the empty prompt) in every element."""

    def __init__(self):
        self.prompts: list[str] = []

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        return video[:, :, ::4, ::8, ::8].float()  # (B, C, T, H, W): only the shape matters here

    def encode_prompt(self, captions: list[str]) -> torch.Tensor:
        self.prompts += captions
        return torch.stack([torch.full((TEXT, 32), float(len(c))) for c in captions])


def _video(n: int) -> torch.Tensor:
    return torch.randn(n, C, 4 * T, 8 * H, 8 * W, generator=torch.Generator().manual_seed(5))


def _features(n: int, i2v: bool = False) -> dict:
    """A precomputed-feature batch (mmkit.data.features layout) of n samples, indices 10..10+n-1."""
    g = torch.Generator().manual_seed(4)
    batch = {
        "latents": torch.randn(n, C, T, H, W, generator=g),
        "text_context": torch.randn(n, TEXT, 32, generator=g) + 3.0,
        "null_text_context": torch.randn(n, TEXT, 32, generator=g) - 3.0,
        "caption": [f"caption {i}" for i in range(n)],
        "index": torch.arange(10, 10 + n),
        "epoch": torch.tensor([0, 1] * (n // 2)),
    }
    if i2v:
        batch["cond"] = torch.randn(n, 20, T, H, W, generator=g)  # 4 mask + 16 first-frame latent channels
        batch["image_context"] = torch.randn(n, 5, 32, generator=g)
    return batch


def _task(**kw) -> WanTask:
    return WanTask(None, FakeEncoders(), WanTaskConfig(**kw))


def _drawn(g: torch.Generator, batch: dict, p: float) -> list[bool]:
    """The dropout decision of each sample: its generator's first draw < p."""
    pairs = zip(batch["epoch"].tolist(), batch["index"].tolist())
    return [bool(torch.rand((), generator=sample_generator(g, e, i)) < p) for e, i in pairs]


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_caption_dropout_on_features(p):
    batch = _features(B)
    g = torch.Generator().manual_seed(11)
    ctx = _task(text_dropout=p).prepare(batch, g)["text_context"]
    dropped = [torch.equal(ctx[i], batch["null_text_context"][i]) for i in range(B)]
    kept = [torch.equal(ctx[i], batch["text_context"][i]) for i in range(B)]
    assert [not k for k in kept] == dropped  # each row is one of the two, whole
    want = {0.0: [False] * B, 1.0: [True] * B}.get(p) or _drawn(g, batch, p)
    assert dropped == want
    if p == 0.5:
        assert 0 < sum(dropped) < B, "seed 11 should drop some captions but not all"
        # a sample's decision is its own: the same in a batch of one
        one = {k: v[2:3] for k, v in batch.items()}
        ctx1 = _task(text_dropout=p).prepare(one, g)["text_context"]
        assert torch.equal(ctx1[0], ctx[2])


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_caption_dropout_on_videos(p):
    task = _task(text_dropout=p)
    batch = {k: v for k, v in _features(B).items() if k in ("caption", "index", "epoch")}
    batch["video"] = _video(B)
    g = torch.Generator().manual_seed(11)
    ctx = task.prepare(batch, g)["text_context"]
    want = {0.0: [False] * B, 1.0: [True] * B}.get(p) or _drawn(g, batch, p)
    assert task.enc.prompts == ["" if d else c for c, d in zip(batch["caption"], want)]
    assert [bool((ctx[i] == 0).all()) for i in range(B)] == want  # the empty prompt's features


def _dit(i2v: bool) -> WanTransformer:
    kw = dict(TINY_DIT, patch_size=tuple(TINY_DIT["patch_size"]))
    if i2v:
        kw.update(in_channels=36, image_dim=32, added_kv_proj_dim=64)
    torch.manual_seed(0)
    model = WanTransformer(WanConfig(**kw))
    with torch.no_grad():  # off the zero / one init, so the output depends on every input
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_v_prediction_zero_snr_loss_by_hand():
    model = _dit(i2v=False)
    cfg = WanTaskConfig(loss="v_pred_zero_snr", min_snr_gamma=5.0, text_dropout=0.5)
    batch = _features(B)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        out = WanTask(model, FakeEncoders(), cfg).loss(batch, g)
        want, draws = hand_wan_loss(model, batch, g, cfg)
    assert len({t for t, _ in draws}) == B  # distinct timesteps: a shared or misplaced draw would show
    assert 0 < sum(d for _, d in draws) < B  # some captions dropped, not all
    assert out.count == B * C * T * H * W
    assert float(out.loss_sum) == pytest.approx(want, rel=1e-6)


def test_flow_i2v_loss_by_hand():
    model = _dit(i2v=True)
    cfg = WanTaskConfig(task="i2v", loss="flow", timestep_sampling="logit_normal", flow_shift=3.0)
    task = WanTask(model, FakeEncoders(), cfg)
    batch = _features(B, i2v=True)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        out = task.loss(batch, g)
        want, _ = hand_wan_loss(model, batch, g, cfg)
        no_image = task.loss({**batch, "image_context": torch.zeros_like(batch["image_context"])}, g)
    assert out.count == B * C * T * H * W
    assert float(out.loss_sum) == pytest.approx(want, rel=1e-6)
    assert abs(float(no_image.loss_sum) - want) > 1e-3 * want  # the CLIP tokens matter
