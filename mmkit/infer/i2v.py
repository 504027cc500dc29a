"""Wan2.1 image-to-video: the t2v pipeline plus first-frame conditioning, as Wan does it.

The DiT input is 36 channels: 16 noisy latents + 4 mask channels (1 where the frame is given)
+ 16 latents of the VAE-encoded condition video (the image, then zeros). The CLIP ViT's
penultimate hidden states feed the cross-attention's image keys/values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmkit.infer.media import load_image
from mmkit.infer.t2v import WanT2VPipeline
from mmkit.models.common.hf_io import read_json


class WanI2VPipeline(WanT2VPipeline):
    """Image-to-video with Wan2.1-I2V. Build with `mmkit.load_pipeline(path, task="i2v")`.

    Example:
        pipe = mmkit.load_pipeline("Wan2.1-I2V-14B-480P-Diffusers", task="i2v", dtype="bf16")
        video = pipe("the cat walks", image="cat.png", height=480, width=832, num_frames=33).frames[0]
    """

    task = "i2v"
    components = WanT2VPipeline.components + ["image_encoder", "image_processor"]

    def __init__(self, *args, image_encoder=None, image_processor=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.image_encoder, self.image_processor = image_encoder, image_processor

    @classmethod
    def _extra_components(cls, folder: Path, device, dtype) -> dict:
        import transformers
        from transformers import CLIPImageProcessor

        # the real folders name CLIPVisionModelWithProjection; either class gives the hidden states we use
        name = read_json(folder / "model_index.json").get("image_encoder", [None, "CLIPVisionModel"])[1]
        if name not in ("CLIPVisionModel", "CLIPVisionModelWithProjection"):
            raise ValueError(
                f"{folder}/model_index.json: image_encoder class {name!r} is not a CLIP vision model"
            )
        encoder_cls = getattr(transformers, name)
        return {
            "image_encoder": encoder_cls.from_pretrained(
                folder / "image_encoder", dtype=dtype, use_safetensors=True
            )
            .to(device)
            .eval(),
            "image_processor": CLIPImageProcessor.from_pretrained(folder / "image_processor"),
        }

    def check_inputs(
        self, prompt, height, width, num_frames, num_inference_steps, guidance_scale, output_type, image
    ):
        super().check_inputs(
            prompt, height, width, num_frames, num_inference_steps, guidance_scale, output_type, image
        )
        if image is None:
            raise ValueError("image: i2v needs a first-frame image (--image PATH)")
        if isinstance(image, (list, tuple)) and len(image) > 1:
            raise ValueError(
                f"image: Wan2.1 i2v takes one first-frame image (--image once), got {len(image)}"
            )
        if self.transformer.cfg.in_channels != 2 * self.vae.config.z_dim + self.vae_scale_t:
            raise ValueError(
                f"transformer in_channels={self.transformer.cfg.in_channels} is not an i2v model "
                f"(expected {2 * self.vae.config.z_dim + self.vae_scale_t}); use task='t2v'"
            )

    @torch.no_grad()
    def encode_image(self, image: Image.Image | list[Image.Image]) -> torch.Tensor:
        """CLIP ViT penultimate hidden states (B, N_tokens, image_dim)."""
        from mmkit.infer.parallel import on_device

        pixels = self.image_processor(images=image, return_tensors="pt").pixel_values
        with on_device(self.image_encoder, self.device, self.parallel.offload):
            pixels = pixels.to(self.device, next(self.image_encoder.parameters()).dtype)
            return self.image_encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]

    @torch.no_grad()
    def condition_latents(self, image: Image.Image | torch.Tensor, height: int, width: int, num_frames: int):
        """(B, 4 + C, T_lat, H_lat, W_lat): first-frame mask channels + normalized latents of [image, zeros...].

        `image` is a PIL image (resized to height x width, Lanczos, as diffusers does) or an already
        sized tensor (B, 3, H, W) in [-1, 1] (the training path).
        """
        if isinstance(image, Image.Image):
            px = np.asarray(image.resize((width, height), resample=Image.LANCZOS), dtype=np.float32) / 255.0
            image = torch.from_numpy(px).permute(2, 0, 1)[None] * 2 - 1  # (1, 3, H, W) in [-1, 1]
        img = image.to(self.device, torch.float32)
        B = img.shape[0]
        video = torch.cat([img[:, :, None], img.new_zeros(B, 3, num_frames - 1, height, width)], dim=2)
        lat = self.encode(video)  # (B, C, T_lat, H_lat, W_lat)
        k, (t_lat, h_lat, w_lat) = self.vae_scale_t, lat.shape[2:]
        # pixel-frame mask (1 for the given first frame), first frame repeated k times so that the
        # k mask channels of each latent frame cover the k pixel frames it encodes
        mask = torch.zeros(B, 1, num_frames, h_lat, w_lat, device=lat.device)
        mask[:, :, 0] = 1
        mask = torch.cat([mask[:, :, :1].repeat_interleave(k, dim=2), mask[:, :, 1:]], dim=2)
        mask = mask.view(B, t_lat, k, h_lat, w_lat).transpose(1, 2)  # (B, k, T_lat, H_lat, W_lat)
        return torch.cat([mask, lat], dim=1)

    def _conditioning(self, image, height, width, batch):
        if isinstance(image, (str, Path)):
            image = load_image(image)
        if not isinstance(image, Image.Image):
            raise ValueError(f"image: expected a PIL image or a file path, got {type(image).__name__}")
        image = image.convert("RGB")
        ctx_img = self.encode_image(image).to(self.dtype).repeat(batch, 1, 1)
        cond = None

        def prepare(latents: torch.Tensor) -> torch.Tensor:
            nonlocal cond
            if cond is None:  # built once, on the first step (needs the frame count from the latents)
                t_lat = latents.shape[2]
                cond = self.condition_latents(image, height, width, (t_lat - 1) * self.vae_scale_t + 1)
                cond = cond.repeat(latents.shape[0], 1, 1, 1, 1)
            return torch.cat([latents, cond], dim=1).to(self.dtype)

        return {"image_context": ctx_img}, prepare
