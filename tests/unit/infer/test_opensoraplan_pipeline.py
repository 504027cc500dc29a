"""OpenSoraPlan 1.3 generation on the tiny release-layout folder: the release scheduler against the
reference tensors (sched_io), the mT5 encoder's 512-token mask, the first denoising step against a
direct DiT call, `mmkit generate t2v` writing an mp4, and i2v with two images (transition)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import mmkit
from mmkit.cli.main import main as mmkit_main
from mmkit.infer.media import save_video
from mmkit.infer.opensoraplan import NEGATIVE_PROMPT, POSITIVE_TEMPLATE, load_scheduler
from mmkit.models.opensoraplan.tiny import create_tiny_osp
from mmkit.train import losses as L

FIX = Path(__file__).resolve().parents[2] / "fixtures" / "opensoraplan13" / "sched_io.safetensors"
TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def t2v_dir(tmp_path_factory):
    return create_tiny_osp(tmp_path_factory.mktemp("osp") / "t2v", task="t2v")


def test_release_scheduler_matches_reference(t2v_dir):
    ref = load_file(FIX)
    sch = load_scheduler(t2v_dir / "scheduler")
    assert sch.__class__.__name__ == "EulerAncestralDiscreteScheduler"
    sch.set_timesteps(100)
    torch.testing.assert_close(sch.timesteps.float(), ref["infer_timesteps"], **TOL)
    torch.testing.assert_close(sch.sigmas.float(), ref["infer_sigmas"], **TOL)
    torch.testing.assert_close(sch.alphas_cumprod.float(), ref["infer_alphas_cumprod"], **TOL)
    assert float(sch.init_noise_sigma) == pytest.approx(ref["infer_init_noise_sigma"].item(), rel=1e-6)
    # training side: the loss code's zero-SNR table gives the reference DDPM betas (the rest of the
    # training reference, v-target / min-SNR-5 / masked loss, is tests/unit/train/test_losses.py)
    ac = L.zero_snr_alphas_cumprod()
    betas = 1 - ac / torch.cat([torch.ones(1), ac[:-1]])
    torch.testing.assert_close(betas, ref["train_betas"], **TOL)


def test_t2v_first_step_is_a_direct_dit_call_and_cli_writes_mp4(t2v_dir, tmp_path):
    pipe = mmkit.load_pipeline(t2v_dir, task="t2v")
    feats, mask = pipe.text_encoder([POSITIVE_TEMPLATE.format("a red cube")])
    assert feats.shape == (1, 512, 32) and mask.shape == (1, 512) and 0 < mask.sum() < 50
    assert mask[0, : int(mask.sum())].all()  # real tokens first, then padding
    seen = []
    pipe.transformer.register_forward_hook(lambda m, args, out: seen.append((args, out)))
    pipe("a red cube", height=32, width=48, num_frames=9, num_inference_steps=2, seed=3, output_type="latent")
    assert len(seen) == 4  # 2 steps x (cond, uncond) at guidance 7.5
    # the sampler's first call (cond branch) equals the DiT called by hand on the fixture-style inputs
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 8, 3, 4, 6, generator=g) * pipe.scheduler.init_noise_sigma
    sch = load_scheduler(t2v_dir / "scheduler")
    sch.set_timesteps(2)
    x_in = sch.scale_model_input(x, sch.timesteps[0])
    with torch.no_grad():
        want = pipe.transformer(x_in, sch.timesteps[:1], feats, torch.ones(1, 3, 4, 6), mask)
    (args, out) = seen[0]
    torch.testing.assert_close(args[0], x_in)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    # what training on raw videos asks of the pipeline: latents and prompt features
    video = torch.rand(2, 3, 9, 32, 48) * 2 - 1
    z = pipe.encode(video, torch.Generator().manual_seed(0))
    assert z.shape == (2, 8, 3, 4, 6)
    torch.testing.assert_close(pipe.encode_prompt(["a red cube"])[0], pipe.text_encoder(["a red cube"])[0])
    neg, _ = pipe.text_encoder([NEGATIVE_PROMPT])
    torch.testing.assert_close(seen[1][0][2], neg)  # the uncond branch sees the release negative prompt

    mp4 = tmp_path / "out.mp4"
    argv = ["generate", "t2v", "--model", str(t2v_dir), "--prompt", "a red cube", "--height", "32"]
    assert mmkit_main(argv + ["--width", "48", "--frames", "9", "--steps", "2", "--out", str(mp4)]) == 0
    assert mp4.stat().st_size > 0 and mp4.with_suffix(".png").is_file()


def test_i2v_transition_with_two_images(tmp_path):
    folder = create_tiny_osp(tmp_path / "i2v", task="i2v")
    pipe = mmkit.load_pipeline(folder, task="i2v")
    paths = []
    for i, color in enumerate([(255, 0, 0), (0, 0, 255)]):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (60, 40), color).save(paths[-1])
    cond, mask_type = pipe._conditioning(paths, None, 9, 32, 48, 1, torch.Generator().manual_seed(0))
    assert mask_type == "transition" and cond.shape == (1, 12, 3, 4, 6)
    # mask channels: the first latent frame (4 pixel frames, all given) and the last are 0, the middle 1
    assert cond[0, 8:, 0].max() == 0 and cond[0, 8:, 1].min() == 1 and cond[0, 11, 2].max() == 0
    # a video as the condition: its frames start the clip (continuation)
    clip = save_video(np.random.RandomState(0).rand(5, 40, 60, 3), tmp_path / "start.mp4")
    cond, mask_type = pipe._conditioning(str(clip), None, 9, 32, 48, 1, torch.Generator().manual_seed(0))
    assert mask_type == "continuation"
    assert cond[0, 8:, :2].max() == 0 and cond[0, 8:, 2].min() == 1  # pixel frames 0-4 given, 5-8 generated
    out = pipe(
        "a cube", image=[str(p) for p in paths], height=32, width=48, num_frames=9, num_inference_steps=2
    )
    assert out.frames.shape == (1, 9, 32, 48, 3) and np.isfinite(out.frames).all()
    with pytest.raises(ValueError, match="task=i2v needs image"):
        pipe("a cube", height=32, width=48, num_frames=9)
    with pytest.raises(ValueError, match="holds a i2v OpenSoraPlan DiT"):
        mmkit.load_pipeline(folder, task="t2v")
