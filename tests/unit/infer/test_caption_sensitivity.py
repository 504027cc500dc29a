"""The caption-swap diagnostic: swapped captions change one word, and the losses are the flow loss."""

import pytest
import torch

from mmkit.data.synth_eval import parse_caption
from mmkit.infer.evaluate import caption_sensitivity, swap_attribute

CAP = "a red circle moves left on a black background"


@pytest.mark.parametrize(
    "key,want",
    [
        ("direction", "a red circle moves right on a black background"),
        ("color", "a green circle moves left on a black background"),
        ("shape", "a red square moves left on a black background"),
        ("background", "a red circle moves left on a gray background"),
    ],
)
def test_swap_attribute_changes_one_word(key, want):
    assert swap_attribute(CAP, key) == want
    before, after = parse_caption(CAP), parse_caption(want)
    assert [k for k in before if before[k] != after[k]] == [key]


def test_swap_direction_is_the_opposite():
    for d, opp in (("up", "down"), ("down", "up"), ("right", "left")):
        assert parse_caption(swap_attribute(CAP.replace("left", d), "direction"))["direction"] == opp


def test_caption_sensitivity_is_the_flow_loss(wan_train_root):
    from mmkit.infer.pipelines import load_pipeline

    pipe = load_pipeline(str(wan_train_root / "wan"), task="t2v")
    latents = torch.randn(2, *pipe.latent_shape(32, 32, 9)[1:], generator=torch.Generator().manual_seed(3))
    caps = [CAP, "a blue square moves up on a gray background"]
    table = caption_sensitivity(pipe, latents, caps, sigmas=(0.7,), seed=5)
    row = table[0.7]
    assert set(row) == {"true", "color", "shape", "direction", "background", "null"}
    # the true-caption entry, recomputed: x_t = (1 - s) x0 + s noise, target noise - x0, timestep 1000 s
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(5))
    xt = 0.3 * latents + 0.7 * noise
    with torch.no_grad():
        pred = pipe.transformer(xt, torch.full((2,), 700.0), pipe.encode_prompt(caps), None)
    assert row["true"] == pytest.approx(float((pred - (noise - latents)).pow(2).mean()), rel=1e-6)
    assert row["null"] != row["true"]  # the random tiny DiT reads its text: the captions differ
