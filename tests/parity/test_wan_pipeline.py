"""mmkit Wan pipelines == diffusers WanPipeline / WanImageToVideoPipeline on the same tiny folder and seed."""

import numpy as np
import pytest
import torch
from diffusers import WanImageToVideoPipeline, WanPipeline
from PIL import Image

import mmkit
from mmkit.models.wan.tiny import create_tiny_wan

KW = dict(height=32, width=48, num_frames=9, num_inference_steps=3, guidance_scale=4.0)
PROMPT, NEG = "a red circle moves left on a black background", "blurry, static"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    return {t: create_tiny_wan(root / t, task=t, seed=1) for t in ("t2v", "i2v")}


def _image():
    return Image.fromarray((np.random.RandomState(0).rand(40, 56, 3) * 255).astype(np.uint8))


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_frames_match_diffusers(folders, task):
    extra = {"image": _image()} if task == "i2v" else {}
    ours = mmkit.load_pipeline(folders[task], task=task, device="cpu")
    got = ours(PROMPT, negative_prompt=NEG, seed=7, progress=False, **KW, **extra).frames
    ref_cls = WanPipeline if task == "t2v" else WanImageToVideoPipeline
    ref = ref_cls.from_pretrained(folders[task])
    ref.set_progress_bar_config(disable=True)
    want = ref(
        prompt=PROMPT,
        negative_prompt=NEG,
        generator=torch.Generator().manual_seed(7),
        output_type="np",
        **KW,
        **extra,
    ).frames
    assert got.shape == want.shape == (1, 9, 32, 48, 3)
    assert want.std() > 0.05  # a real picture, not a constant
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # another seed gives another video (the seed really reaches the noise)
    other = ours(PROMPT, negative_prompt=NEG, seed=8, progress=False, **KW, **extra).frames
    assert np.abs(other - got).max() > 1e-2


def test_output_types_and_euler_sampler(folders):
    pipe = mmkit.load_pipeline(folders["t2v"], task="t2v", device="cpu")
    lat = pipe(PROMPT, seed=1, output_type="latent", progress=False, **KW).frames
    assert lat.shape == (1, 16, 3, 4, 6)
    pil = pipe(PROMPT, seed=1, output_type="pil", progress=False, **KW).frames
    assert len(pil[0]) == 9 and pil[0][0].size == (48, 32)
    np_frames = pipe(PROMPT, seed=1, progress=False, **KW).frames
    np.testing.assert_allclose(np.asarray(pil[0][3]) / 255.0, np_frames[0, 3], atol=1 / 255)
    euler = pipe(PROMPT, seed=1, sampler="euler", progress=False, **KW)
    assert euler.frames.shape == np_frames.shape and len(euler.step_times) == 3
    assert np.abs(euler.frames - np_frames).max() > 1e-4  # a different sampler, a different result


def test_flow_shift_override_changes_the_schedule(folders):
    pipe = mmkit.load_pipeline(folders["t2v"], task="t2v", device="cpu")
    a = pipe(PROMPT, seed=1, output_type="latent", progress=False, **KW).frames
    b = pipe(PROMPT, seed=1, output_type="latent", flow_shift=8.0, progress=False, **KW).frames
    assert (a - b).abs().max() > 1e-3
