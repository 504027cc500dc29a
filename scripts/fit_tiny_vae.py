"""Fit the tiny Wan2.1 VAE that `create_tiny_wan` ships, on synthetic moving-shape clips.

`create_tiny_wan` builds a diffusers `AutoencoderKLWan` with the small `TINY_VAE` config (z_dim 16, 8x
spatial and 4x temporal compression). With random weights it decodes any latent into coloured noise, so
the demo's generated videos could never show a shape. This script fits it once, as a VAE (L1 + MSE
reconstruction with shape pixels weighted up, plus a small KL term), on `synth_shapes` clips at the demo's
size (9 frames, 32 x 32, read back from their H.264 mp4 files through `VideoDataset`, as training reads
them), measures the per-channel mean / std of the latents on the fitting clips, and writes
`mmkit/assets/tiny_wan_vae.safetensors`: fp16 weights, with the full VAE config (architecture plus
`latents_mean` / `latents_std`) and a fit summary in the safetensors metadata.

Four phases. (1) single 32 x 32 frames, with the network initialised as a per-frame image autoencoder
(`prepare_init`), because a clip step costs ~9x a frame step on a CPU; (2) 9-frame 32 x 32 clips, which
fits the temporal down/upsampling (fitting clips from scratch instead sat at background-only
reconstructions, ~16 dB, for over 800 steps); (3) the shipped shapes model's size, 64 x 64 px and 17
frames: single frames, then 9-frame windows of the clips (a window's first frame is encoded alone, as a
clip's is); (4) the decoder alone (the latents stay as they are) on 32 x 32 clips and 64 x 64 windows in
turn, which gives back the 32 x 32 quality phase 3 cost. `--init-from FILE` starts at phase 3 from an
earlier fit (the previous asset was phases 1-2 with the defaults).

Rerun:
    .venv/bin/python scripts/fit_tiny_vae.py        # writes mmkit/assets/tiny_wan_vae.safetensors
    .venv/bin/python scripts/fit_tiny_vae.py --image-steps 300 --clip-steps 100 --big-frame-steps 50 \
        --big-clip-steps 50 --decoder-steps 50 --out /tmp/vae.safetensors --preview /tmp/vae.png  # a quick look
Reruns are deterministic for a seed, torch build and thread count as long as the synthetic mp4 files are:
libx264 with its default threads encodes a few clips differently under heavy CPU load.

The shipped file (torch 2.13 CPU, diffusers 0.42.1, on 2 CPU cores shared with other jobs): phases 1-2
with the defaults (2,800 frame steps of batch 16 + 700 clip steps of batch 8, 16 min), then phases 3-4
from that fit (200 frame steps of batch 16, 300 window steps of batch 4, 300 decoder steps; 42 min at
load average 8-16). Reconstruction PSNR on held-out clips (fp16 weights, posterior mode): 29.1 dB at
64 x 64 x 17 (24.3 dB before phases 3-4), 26.5 dB at 32 x 32 x 9 (26.9 dB before); random weights 9.2 dB.
Through the VAE, `mmkit.data.synth_eval`'s detector reads 32 held-out 64 x 64 clips as: background,
colour and direction 100%, shape class 97% (the previous asset, phases 1-2 only: colour 75%, shape 80% on
40 such clips), the ceiling of a DiT trained on these latents. File 1.35 MB. Each run prints
its numbers and stores them in the file's metadata ("fit").

The shipped file was fitted on the earlier clips (a random start, half the frame in 16 frames, one size
range). The clips now wrap around the frame at ~3 px per frame and their size marks the sense of motion
(`render_shape_video`); through the shipped file the detector reads them at 100% for background, colour
and direction and 85% for the shape class (48 clips at 64 x 64 x 17), and 4 demo-size clips (32 x 32 x 9)
reconstruct at 20.5-27.5 dB. A rerun fits the current clips.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import save_file
from tqdm import tqdm

from mmkit.data.synth import synth_shapes
from mmkit.data.video import VideoDataset
from mmkit.models.wan.tiny import TINY_VAE, TINY_VAE_ASSET, fitted_tiny_vae, random_tiny_vae

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "mmkit" / "assets" / TINY_VAE_ASSET
NUM_FRAMES, HEIGHT, WIDTH = 9, 32, 32  # the demo's clips (mmkit/cli/demo.py)
BIG_FRAMES, BIG_SIZE = 17, 64  # the shipped shapes model's clips (mmkit.models.wan.shapes.SHAPES_VIDEO)
BIG_CLIP = (BIG_FRAMES, BIG_SIZE, BIG_SIZE)  # load_clips' size


def load_clips(root: Path, videos: int, seed: int, size=(NUM_FRAMES, HEIGHT, WIDTH), captions: bool = False):
    """Write `videos` synthetic clips of `size` (frames, height, width) under `root` and read them back:
    (N, 3, T, H, W) in [-1, 1] (and their captions with `captions=True`)."""
    t, h, w = size
    shapes = synth_shapes(root, videos=videos, num_frames=t, height=h, width=w, seed=seed)
    ds = VideoDataset(
        shapes.data_txt, num_frames=t, height=h, width=w, train_fps=16, random_start=False, progress=False
    )
    items = [ds[i] for i in tqdm(range(len(ds)), desc=f"read {root.name}", unit="clip")]
    clips = torch.stack([item["video"] for item in items])
    return (clips, [item["caption"] for item in items]) if captions else clips


def detector_accuracy(vae, clips: torch.Tensor, caps: list[str], batch: int = 8) -> dict[str, float]:
    """Accuracy per attribute of `mmkit.data.synth_eval` on decode(encode(x).mode): what a DiT trained on
    these latents can reach at best."""
    from mmkit.data.synth_eval import Tally, score

    tally = Tally()
    with torch.no_grad():
        for i in range(0, len(clips), batch):
            y = vae.decode(vae.encode(clips[i : i + batch]).latent_dist.mode()).sample
            for j, clip in enumerate(y):
                tally.add(score(((clip.permute(1, 2, 3, 0).numpy() + 1) / 2).clip(0, 1), caps[i + j]))
    return {k: round(v, 3) for k, v in tally.accuracy().items()}


def decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """`vae.decode(z).sample` before its final clamp to [-1, 1], so that the loss has a gradient on pixels
    that overshoot. Same frame-by-frame causal loop as diffusers' `_decode` (checked in `main`)."""
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    frames = []
    for i in range(z.shape[2]):  # one latent frame at a time; the causal convs cache the previous ones
        vae._conv_idx = [0]
        frames.append(vae.decoder(x[:, :, i : i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                  first_chunk=i == 0))  # fmt: skip
    vae.clear_cache()
    return torch.cat(frames, 2)  # (B, 3, T, H, W)


def psnr(vae, clips: torch.Tensor, batch: int = 16) -> float:
    """Mean per-clip PSNR (dB, pixels in [0, 1]) of decode(encode(x).mode) against x, the pipelines' path."""
    out = []
    with torch.no_grad():
        for x in clips.split(batch):
            y = vae.decode(vae.encode(x).latent_dist.mode()).sample
            mse = ((y - x) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)  # /2: [-1, 1] -> [0, 1] units
            out.append(-10 * torch.log10(mse))
    return float(torch.cat(out).mean())


def latent_stats(vae, clips: torch.Tensor, batch: int = 16) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the posterior modes over all clips, frames and positions."""
    with torch.no_grad():
        z = torch.cat([vae.encode(x).latent_dist.mode() for x in clips.split(batch)])  # (N, 16, T', H', W')
    z = z.transpose(0, 1).flatten(1)  # (16, N * T' * H' * W')
    return [round(v, 4) for v in z.mean(1).tolist()], [round(v, 4) for v in z.std(1).tolist()]


def save_preview(vae, clips: torch.Tensor, path: Path, scale: int = 4) -> None:
    """PNG: for each clip, a row of its frames and below it a row of their reconstructions."""
    from PIL import Image

    with torch.no_grad():
        rec = vae.decode(vae.encode(clips).latent_dist.mode()).sample
    rows = [r for pair in zip(clips, rec) for r in pair]  # each (3, T, H, W)
    grid = torch.cat([torch.cat(list(r.permute(1, 2, 3, 0)), 1) for r in rows], 0)  # (rows*H, T*W, 3)
    img = ((grid + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), Image.NEAREST).save(path)


def prepare_init(vae, logvar_init: float) -> None:
    """Make the random VAE easy to fit (in place), in the usual ways for residual nets:

    - every residual branch (second conv of a residual block, attention output) starts at zero, so each
      block starts as the identity and the signal path is short;
    - causal 3-D convs start by looking at the current frame only (past-frame kernel slices zero), the
      encoder's temporal downsamplers start by keeping the last frame of each window and the decoder's
      temporal upsamplers by repeating a frame; the network then starts as a per-frame image autoencoder,
      which phase 1 fits on single frames, 9x cheaper than clips;
    - the posterior log-variance starts at `logvar_init` (the random one is ~0, i.e. std ~1 against means
      of ~0.1: sampled latents would be nearly pure noise and the decoder would learn to ignore them).
    """
    from diffusers.models.autoencoders.autoencoder_kl_wan import (
        WanAttentionBlock,
        WanCausalConv3d,
        WanResample,
        WanResidualBlock,
    )

    with torch.no_grad():
        time_convs = set()
        for m in vae.modules():
            if isinstance(m, WanResidualBlock):
                m.conv2.weight.zero_()
                m.conv2.bias.zero_()
            elif isinstance(m, WanAttentionBlock):
                m.proj.weight.zero_()
                m.proj.bias.zero_()
            elif isinstance(m, WanResample) and hasattr(m, "time_conv"):
                w = m.time_conv.weight  # (c_out, c, 3, 1, 1); c_out = c (down) or 2c (up: two frames)
                c = w.shape[1]
                w.zero_()
                m.time_conv.bias.zero_()
                for half in range(w.shape[0] // c):  # newest input frame -> each output frame
                    w[half * c : (half + 1) * c, :, -1, 0, 0] = torch.eye(c)
                time_convs.add(m.time_conv)
        for m in vae.modules():
            if isinstance(m, WanCausalConv3d) and m not in time_convs and m.weight.shape[2] > 1:
                m.weight[:, :, :-1] = 0  # slices over past frames (causal: the last one is the current frame)
        vae.quant_conv.bias[TINY_VAE["z_dim"] :] += logvar_init


def fit_steps(vae, data, steps, batch, lr, a, gen, desc, held, decoder_only: bool = False) -> None:
    """AdamW on L1 + MSE (shape pixels weighted up) + a small KL, sampled latents; lr: 50-step linear warmup,
    then cosine to lr / 20. `data`: (N, 3, T, H, W) in [-1, 1], T = 1 (frames) or 9 (clips), or a list of
    such tensors (of other sizes) taken in turn, step by step, with `batch` a list of their batch sizes.
    `decoder_only`: the encoder (and so every latent a DiT was trained on) stays as it is."""
    sets = list(data) if isinstance(data, (list, tuple)) else [data]
    sizes = list(batch) if isinstance(batch, (list, tuple)) else [batch]
    params = [
        p for n, p in vae.named_parameters() if not decoder_only or n.startswith(("decoder.", "post_quant"))
    ]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = 50
    orders = [[torch.randperm(len(d), generator=gen), 0] for d in sets]
    vae.train()
    bar = tqdm(range(steps), desc=desc, unit="step")
    for step in bar:
        k = step % len(sets)
        data, batch, (order, pos) = sets[k], sizes[k], orders[k]
        if pos + batch > len(order):  # a fresh permutation per epoch
            order, pos = torch.randperm(len(data), generator=gen), 0
        x = data[order[pos : pos + batch]]
        orders[k] = [order, pos + batch]
        with torch.set_grad_enabled(not decoder_only):
            post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)  # reparameterised sample
        y = decode_unclamped(vae, z)
        # Shapes cover ~8% of a frame: weigh pixels away from the clip's background (its first-frame corner
        # colour) up, or the fit sits for hundreds of steps on background-only reconstructions.
        w = 1 + a.fg_weight * ((x - x[:, :, :1, :1, :1]).abs().amax(1, keepdim=True) > 0.1).float()
        rec = (w * ((y - x).abs() + (y - x).pow(2))).mean() / w.mean()
        kl = 0.5 * (post.mean.pow(2) + post.var - 1 - post.logvar).mean()  # per latent element, nats
        frac = max(0.0, (step - warmup) / max(1, steps - warmup))
        for g in opt.param_groups:
            g["lr"] = (
                lr * min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
            )
        opt.zero_grad(set_to_none=True)
        (rec + a.kl * kl).backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 10 == 0:
            bar.set_postfix(rec=f"{rec.item():.4f}", kl=f"{kl.item():.2f}")
        if a.eval_every and (step + 1) % a.eval_every == 0:
            tqdm.write(f"{desc} step {step + 1}: held-out clip PSNR {psnr(vae.eval(), held[:16]):.2f} dB")
            vae.train()
    vae.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="safetensors file to write")
    p.add_argument("--image-steps", type=int, default=2800, help="phase 1: steps on single frames")
    p.add_argument("--image-batch", type=int, default=16)
    p.add_argument("--clip-steps", type=int, default=700, help="phase 2: steps on 9-frame clips")
    p.add_argument("--clip-batch", type=int, default=8)
    p.add_argument("--videos", type=int, default=384, help="fitting clips")
    p.add_argument("--heldout", type=int, default=64, help="held-out clips for the reported PSNR")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate of phase 1")
    p.add_argument("--clip-lr", type=float, default=5e-4, help="peak AdamW learning rate of phase 2")
    p.add_argument("--kl", type=float, default=1e-4, help="weight of the mean per-element KL term")
    p.add_argument("--fg-weight", type=float, default=4.0, help="extra loss weight on shape pixels")
    p.add_argument("--logvar-init", type=float, default=-6.0, help="initial posterior log-variance")
    p.add_argument(
        "--big-frame-steps", type=int, default=200, help="phase 3a: steps on single 64 x 64 frames"
    )
    p.add_argument(
        "--big-clip-steps", type=int, default=300, help="phase 3b: steps on 9-frame 64 x 64 windows"
    )
    p.add_argument("--big-videos", type=int, default=256, help="phase 3 fitting clips (64 x 64, 17 frames)")
    p.add_argument("--big-lr", type=float, default=3e-4, help="peak AdamW learning rate of phase 3")
    p.add_argument("--big-clip-batch", type=int, default=4)
    p.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="start phase 3 from this fitted file (phases 1-2 skipped), e.g. the previous asset",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (fix it for reproducibility)")
    p.add_argument("--preview", type=Path, default=None, help="optional PNG: held-out frames over recons")
    p.add_argument("--eval-every", type=int, default=0, help="print held-out PSNR every N steps (0: never)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    t0 = time.time()

    with tempfile.TemporaryDirectory(prefix="fit_tiny_vae_") as tmp:
        train = load_clips(Path(tmp) / "train", a.videos, seed=a.seed)
        held = load_clips(Path(tmp) / "heldout", a.heldout, seed=a.seed + 1000)  # other positions, sizes
        big_train = load_clips(Path(tmp) / "big_train", a.big_videos, seed=a.seed, size=BIG_CLIP)
        big_held, big_caps = load_clips(
            Path(tmp) / "big_heldout", 32, seed=a.seed + 1000, size=BIG_CLIP, captions=True
        )
    frames = train.transpose(1, 2).reshape(-1, 3, 1, HEIGHT, WIDTH)  # every frame as a 1-frame clip

    psnr_random = psnr(random_tiny_vae(seed=a.seed).eval(), held)  # what create_tiny_wan(vae="random") gives
    if a.init_from is None:
        vae = AutoencoderKLWan(**TINY_VAE)
        prepare_init(vae, a.logvar_init)
        with torch.no_grad():  # the training decode must be the pipeline's decode, clamp aside
            z = vae.encode(held[:2]).latent_dist.mode()
            assert torch.allclose(decode_unclamped(vae, z).clamp(-1, 1), vae.decode(z).sample, atol=1e-6)
        gen = torch.Generator().manual_seed(a.seed)
        fit_steps(vae, frames, a.image_steps, a.image_batch, a.lr, a, gen, "fit VAE 1/4 frames", held)
        fit_steps(vae, train, a.clip_steps, a.clip_batch, a.clip_lr, a, gen, "fit VAE 2/4 clips", held)
    else:
        vae = fitted_tiny_vae(a.init_from)
    # Phase 3: the shapes model's size. 64 x 64 frames first (the spatial path at the larger scale), then
    # 9-frame windows of the 17-frame clips (the temporal path at 2 px of motion per frame): a window's
    # first frame is encoded alone, as a clip's is, so windows teach the same causal down/upsampling.
    gen = torch.Generator().manual_seed(a.seed)
    big_frames = big_train.transpose(1, 2).reshape(-1, 3, 1, BIG_SIZE, BIG_SIZE)
    fit_steps(
        vae, big_frames, a.big_frame_steps, a.image_batch, a.big_lr, a, gen, "fit VAE 3/4 frames 64", big_held
    )
    gen = torch.Generator().manual_seed(a.seed)  # each phase-3 part from the seed: either one reruns alone
    windows = torch.cat([big_train[:, :, s : s + 9] for s in range(0, BIG_FRAMES - 9 + 1, 2)])
    fit_steps(
        vae, windows, a.big_clip_steps, a.big_clip_batch, a.big_lr, a, gen, "fit VAE 3/4 clips 64", big_held
    )
    fit_s = time.time() - t0

    write_asset(vae, a, held, big_train, big_held, big_caps, psnr_random, fit_s)


def write_asset(vae, a, held, big_train, big_held, big_caps, psnr_random: float, fit_s: float) -> None:
    """Store `vae` as fp16 at `a.out` with its config, latent statistics and a fit summary in the metadata;
    everything is measured on the weights as they will be read back."""
    weights = {k: v.detach().to(torch.float16).contiguous() for k, v in vae.state_dict().items()}
    vae.load_state_dict({k: v.float() for k, v in weights.items()})
    latents_mean, latents_std = latent_stats(vae, big_train)  # the shapes model's latents
    psnr_fitted = psnr(vae, held)
    psnr_big = psnr(vae, big_held, batch=8)
    detected = detector_accuracy(vae, big_held, big_caps)
    fit = {
        "image_steps": a.image_steps, "image_batch": a.image_batch, "clip_steps": a.clip_steps,
        "clip_batch": a.clip_batch, "videos": a.videos, "lr": a.lr, "clip_lr": a.clip_lr, "kl": a.kl,
        "fg_weight": a.fg_weight, "logvar_init": a.logvar_init, "seed": a.seed,
        "threads": a.threads, "frames": NUM_FRAMES, "height": HEIGHT, "width": WIDTH,
        "big_frame_steps": a.big_frame_steps, "big_clip_steps": a.big_clip_steps, "big_videos": a.big_videos,
        "big_lr": a.big_lr, "big_clip_batch": a.big_clip_batch, "big_size": list(BIG_CLIP),
        "decoder_steps": a.decoder_steps,
        "init_from": a.init_from.name if a.init_from else None,
        "psnr_heldout_64_db": round(psnr_big, 2), "detector_heldout_64": detected,
        "fit_seconds": round(fit_s), "heldout_clips": a.heldout,
        "psnr_heldout_db": round(psnr_fitted, 2), "psnr_random_db": round(psnr_random, 2),
        "torch": torch.__version__,
    }  # fmt: skip
    config = {**TINY_VAE, "latents_mean": latents_mean, "latents_std": latents_std}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(a.out), metadata={"config": json.dumps(config), "fit": json.dumps(fit)})

    check = fitted_tiny_vae(a.out)  # read back through create_tiny_wan's path
    assert abs(psnr(check, held[:8]) - psnr(vae, held[:8])) < 1e-3
    if a.preview is not None:
        save_preview(check, held[:4], a.preview)
    print(json.dumps(fit, indent=1))
    print(f"latents_mean {np.round(latents_mean, 3).tolist()}")
    print(f"latents_std {np.round(latents_std, 3).tolist()}")
    print(f"wrote {a.out} ({a.out.stat().st_size / 1e6:.2f} MB) in {fit_s / 60:.1f} min")


if __name__ == "__main__":
    main()
