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


@pytest.fixture(scope="module")
def i2v_dir(tmp_path_factory):
    return create_tiny_osp(tmp_path_factory.mktemp("osp") / "i2v", task="i2v")


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


def test_i2v_transition_with_two_images(i2v_dir, tmp_path):
    folder = i2v_dir
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


def test_i2v_mask_type_flag(i2v_dir, tmp_path, capsys):
    """`--mask-type`: the image count checked against the type before anything loads, the mask each type
    gives (a full-length video: the release's MaskProcessor(0.5, 0.5)), and the CLI end to end."""
    folder = i2v_dir
    imgs = []
    for i in range(3):
        imgs.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (48, 32), (80 * i, 0, 0)).save(imgs[-1])
    base = ["generate", "i2v", "--model", str(folder), "--prompt", "a cube", "--height", "32", "--width", "48",
            "--frames", "9", "--steps", "1", "--device", "cpu"]  # fmt: skip
    for images, kind, msg in [
        (imgs[:1], "transition", "--mask-type transition takes 2 images"),
        (imgs[:2], "i2v", "--mask-type i2v takes 1 image"),
        (imgs[:1], "random_temporal", "takes 2 or more images"),
        (imgs, "clear", "takes 9 images"),
        (imgs[:1], "t2iv", "t2iv generates every frame: drop --image"),
        ([], "continuation", "needs --image"),
    ]:
        flags = [f for p in images for f in ("--image", p)] + ["--mask-type", kind]
        assert mmkit_main([*base, *flags, "--out", str(tmp_path / "x.mp4")]) == 2
        assert msg in capsys.readouterr().err, (kind, len(images))
    assert not (tmp_path / "x.mp4").exists()

    pipe = mmkit.load_pipeline(folder, task="i2v")

    def given(image, kind, seed=0):  # pixel frames given (mask channel 0 of the compressed mask per frame)
        cond, got = pipe._conditioning(image, kind, 9, 32, 48, 1, torch.Generator().manual_seed(0), seed)
        m = torch.cat([cond[0, 8, :1], cond[0, 8:, 1:].transpose(0, 1).reshape(-1, 4, 6)])  # (9, 4, 6)
        return got, [i for i in range(9) if m[i].max() == 0]

    assert given(imgs[:2], "continuation") == ("continuation", [0, 1])
    assert given(imgs, None) == ("random_temporal", [0, 4, 8])
    assert given(None, "t2iv") == ("t2iv", [])
    clip = str(save_video(np.random.RandomState(0).rand(9, 32, 48, 3), tmp_path / "clip.mp4"))
    assert given(clip, "i2v") == ("i2v", [0])
    assert given(clip, "transition") == ("transition", [0, 8])
    assert given(clip, "clear") == ("clear", list(range(9)))
    kind, first = given(clip, None)
    assert kind == "continuation" and first in ([0, 1, 2, 3], [0, 1, 2, 3, 4])  # randint(floor 4.5, ceil 4.5)
    draws = {tuple(given(clip, "random_temporal", seed)[1]) for seed in range(6)}
    assert len(draws) > 1 and {len(d) for d in draws} <= {4, 5}  # a random half, from the seed
    assert given(clip, "random_temporal", 3) == given(clip, "random_temporal", 3)
    short = str(save_video(np.random.RandomState(1).rand(5, 32, 48, 3), tmp_path / "short.mp4"))
    with pytest.raises(
        ValueError, match="5 frames; --mask-type transition on a video needs at least --frames 9"
    ):
        given(short, "transition")

    out = tmp_path / "t2iv.mp4"
    assert (
        mmkit_main([*base, "--mask-type", "t2iv", "--out", str(out)]) == 0
    )  # no --image: every frame generated
    assert out.stat().st_size > 0
