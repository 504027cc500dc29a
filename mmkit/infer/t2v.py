"""Wan2.1 text-to-video pipeline over a diffusers-layout folder.

Components come from the folder: umT5 text encoder + tokenizer (transformers), the Wan VAE
(diffusers' AutoencoderKLWan), the scheduler config, and the DiT, which is mmkit's own
`WanTransformer` loaded through the converter. The denoise loop is `samplers.denoise`.

Same seed, same video as diffusers' `WanPipeline`: the noise is drawn on a CPU generator seeded
with `seed`, shape (1, C, T_lat, H_lat, W_lat), float32; prompts are cleaned, tokenized to 512
tokens, and their features zero-padded exactly as diffusers does.
"""

from __future__ import annotations

import html
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mmkit.device import resolve_device, resolve_dtype
from mmkit.infer.accel.conditioning import step_invariant_cache
from mmkit.infer.accel.hooks import reset_all
from mmkit.infer.budget import tensor_bytes
from mmkit.infer.parallel import InferenceLayout, InferenceParallel, on_device, tiled_decode
from mmkit.infer.samplers import DenoiseStats, cfg_velocity, denoise, make_scheduler
from mmkit.models.common.hf_io import check_safetensors, find_weight_files, read_json
from mmkit.models.wan.load import load_transformer
from mmkit.models.wan.model import WanTransformer

OUTPUT_TYPES = ("np", "pil", "latent")


def clean_prompt(text: str) -> str:
    """ftfy fix (when installed), double HTML unescape, collapse whitespace: what Wan/diffusers do."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


@dataclass
class VideoOutput:
    """`frames`: np (B, T, H, W, 3) in [0, 1], a list of lists of PIL images, or latents (B, C, T, H, W)."""

    frames: object
    step_times: list[float] = field(default_factory=list)


def check_components(folder: Path, required: list[str], task: str = "t2v") -> dict:
    """Read model_index.json and make sure every required component folder has its files."""
    index = read_json(folder / "model_index.json", "pipeline index (model_index.json)")
    files = {
        "transformer": ["config.json"],
        "vae": ["config.json"],
        "text_encoder": ["config.json"],
        "tokenizer": [],
        "scheduler": ["scheduler_config.json"],
        "image_encoder": ["config.json"],
        "image_processor": ["preprocessor_config.json"],
    }
    for comp in required:
        if comp not in index:
            raise ValueError(
                f"{folder / 'model_index.json'} does not list the component '{comp}' that task={task} needs"
                + (" (is this a t2v folder? use task='t2v')" if comp.startswith("image_") else "")
            )
        sub = folder / comp
        if not sub.is_dir():
            raise FileNotFoundError(f"component folder missing: {sub} (model_index.json lists '{comp}')")
        for f in files[comp]:
            if not (sub / f).is_file():
                raise FileNotFoundError(f"component file missing: {sub / f}")
    return index


WEIGHT_COMPONENTS = ("transformer", "text_encoder", "vae", "image_encoder")


def check_weights(folder: Path, required: list[str]) -> dict[str, int]:
    """{component: parameter count} from the safetensors headers, before anything loads.

    A component with only pickled weights (`.bin`) is refused (mmkit never unpickles), and a truncated
    or damaged safetensors file is named in the error.
    Example: `check_weights(Path("Wan2.1-T2V-1.3B-Diffusers"), ["transformer", "vae"])`.
    """
    counts = {}
    for comp in WEIGHT_COMPONENTS:
        if comp in required:
            files = find_weight_files(folder / comp)
            counts[comp] = sum(math.prod(t["shape"]) for f in files for t in check_safetensors(f).values())
    return counts


def estimate_memory(
    path, task: str = "t2v", height: int = 480, width: int = 832, num_frames: int = 81, dtype="fp32"
) -> dict[str, int]:
    """Peak bytes of one generation by part (weights, latents, DiT activations, VAE decode, frames),
    from the folder's configs and safetensors headers only; checks the weight files on the way.

    Rough (within about 2x): one transformer block's activations (attention through SDPA, which never
    holds the (tokens x tokens) scores), the VAE decoder's full-resolution features for the frames its
    causal cache keeps, and the decoded video in float32 (three copies on the way to the file).
    Example: `sum(estimate_memory("Wan2.1-T2V-1.3B-Diffusers", "t2v", 480, 832, 81, "bf16").values())`.
    """
    folder = Path(path)
    required = WanT2VPipeline.components + (["image_encoder", "image_processor"] if task == "i2v" else [])
    check_components(folder, required, task)
    nbytes = torch.empty((), dtype=resolve_dtype(dtype)).element_size()
    counts = check_weights(folder, required)
    weights = sum(n * (4 if comp == "vae" else nbytes) for comp, n in counts.items())  # the VAE runs in fp32
    vae = read_json(folder / "vae" / "config.json", "VAE config")
    dit = read_json(folder / "transformer" / "config.json", "Wan transformer config")
    down = vae.get("temperal_downsample", [False, True, True])
    t_lat = (num_frames - 1) // 2 ** sum(down) + 1
    h_lat, w_lat = height // 2 ** len(down), width // 2 ** len(down)
    pt, ph, pw = dit.get("patch_size", [1, 2, 2])
    tokens = (t_lat // pt) * (h_lat // ph) * (w_lat // pw)
    dim = dit.get("num_attention_heads", 12) * dit.get("attention_head_dim", 128)
    return {
        "weights": weights,
        # noise, velocity (cond + uncond) and the multistep sampler's history, float32
        "latents": 6 * tensor_bytes((1, vae.get("z_dim", 16), t_lat, h_lat, w_lat), 4),
        # one block: input, norm, q, k, v, attention out (6 x dim) and the FFN hidden state
        "DiT activations": tokens * (6 * dim + dit.get("ffn_dim", 4 * dim)) * nbytes,
        "VAE decode": 40 * vae.get("base_dim", 96) * height * width * 4,
        "output frames": 3 * tensor_bytes((num_frames, height, width, 3), 4),
    }


class WanT2VPipeline:
    """Text-to-video with Wan2.1. Build with `mmkit.load_pipeline(path, task="t2v")`.

    Example:
        pipe = mmkit.load_pipeline("Wan2.1-T2V-1.3B-Diffusers", task="t2v", dtype="bf16")
        video = pipe("a red circle moves left", height=480, width=832, num_frames=33, seed=0).frames[0]
    """

    task = "t2v"
    components = ["transformer", "vae", "text_encoder", "tokenizer", "scheduler"]

    def __init__(self, transformer: WanTransformer, vae, text_encoder, tokenizer, scheduler, device, dtype):
        self.transformer, self.vae = transformer, vae
        self.text_encoder, self.tokenizer, self.scheduler = text_encoder, tokenizer, scheduler
        self.device, self.dtype = device, dtype
        # multi-process / memory options (`parallelize`); with a layout the sampler calls `dit`, the
        # sequence-parallel (and / or sharded) wrapper of `transformer`
        self.parallel, self.layout, self.dit = InferenceParallel(), None, None
        self.vae_scale_t = vae.config.scale_factor_temporal
        self.vae_scale_s = vae.config.scale_factor_spatial
        self.max_sequence_length = transformer.cfg.text_len  # the context length the DiT was trained with

    # ---- loading -----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, device="auto", dtype="fp32", parallel: InferenceParallel | None = None):
        """Load every component of a diffusers-layout Wan folder. Example: `WanT2VPipeline.from_pretrained(p)`.

        With `parallel` (inside an initialised process group for more than one process), the process groups
        are built and the layout checked against the model's heads before any weights are read; models to be
        sharded or offloaded are read to the CPU first.
        """
        from diffusers import AutoencoderKLWan, UniPCMultistepScheduler
        from transformers import AutoTokenizer, UMT5EncoderModel

        folder = Path(path)
        device, dtype = resolve_device(str(device)), resolve_dtype(dtype)
        check_components(folder, cls.components, cls.task)
        check_weights(folder, cls.components)  # pickled-only or damaged files: named, before any load
        p = parallel or InferenceParallel()
        layout = None
        if parallel is not None:
            heads = read_json(folder / "transformer" / "config.json").get("num_attention_heads")
            p.check(InferenceLayout.world_size(), heads=heads)
            layout = InferenceLayout(p)
        cpu = torch.device("cpu")
        stage = cpu if p.offload else device  # offload: every model waits on the CPU for its stage
        kw = cls._extra_components(folder, stage, dtype)
        pipe = cls(
            transformer=load_transformer(folder / "transformer", cpu if p.dit_fsdp else stage, dtype),
            # the VAE stays in float32: its decode is a small share of the time and bf16 costs quality
            vae=AutoencoderKLWan.from_pretrained(
                folder / "vae", torch_dtype=torch.float32, use_safetensors=True
            )
            .to(stage)
            .eval(),
            text_encoder=UMT5EncoderModel.from_pretrained(
                folder / "text_encoder", dtype=dtype, use_safetensors=True
            )
            .to(cpu if p.t5_cpu or p.t5_fsdp else stage)
            .eval(),
            tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer"),
            scheduler=UniPCMultistepScheduler.from_pretrained(folder / "scheduler"),
            device=device,
            dtype=dtype,
            **kw,
        )
        if parallel is not None:
            pipe.parallelize(p, layout)
        return pipe

    def parallelize(self, parallel: InferenceParallel, layout: InferenceLayout | None = None):
        """Apply a multi-process / memory layout to the loaded pipeline (in place; returns self).

        Sequence parallelism wraps the DiT (`wan_parallel.WanSequenceParallel`), FSDP2 shards it and / or
        the text encoder over the model group (moving the shards to the device).
        Example: `pipe.parallelize(InferenceParallel(ulysses=2))` under torchrun with 2 processes.
        """
        from mmkit.infer.wan_parallel import WanSequenceParallel

        layout = layout or InferenceLayout(parallel)
        self.parallel, self.layout = parallel, layout
        self.dit = WanSequenceParallel.parallelize(self.transformer, layout, self.device)
        if parallel.t5_fsdp:
            layout.shard_weights(self.text_encoder, self.text_encoder.encoder.block, self.device)
        return self

    @classmethod
    def _extra_components(cls, folder: Path, device, dtype) -> dict:
        return {}

    # ---- stages ------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> umT5 features (B, text_len, text_dim) (512 for Wan2.1), zero beyond each prompt's length."""
        n = self.max_sequence_length
        prompts = [clean_prompt(p) for p in prompts]
        for p in prompts:
            length = len(self.tokenizer(p, add_special_tokens=True).input_ids)
            if length > n:
                warnings.warn(
                    f"prompt is {length} tokens; the text encoder reads {n}, the rest is truncated",
                    stacklevel=3,
                )
        tok = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=n,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        dev = next(self.text_encoder.parameters()).device  # the CPU with t5_cpu
        ids, mask = tok.input_ids.to(dev), tok.attention_mask.to(dev)
        feats = self.text_encoder(ids, mask).last_hidden_state  # (B, n, text_dim)
        feats = feats * mask.gt(0).unsqueeze(-1).to(feats.dtype)  # zero the padding, as diffusers does
        return feats.to(self.device)

    def latent_shape(self, height: int, width: int, num_frames: int) -> tuple[int, ...]:
        c = self.vae.config.z_dim
        return (
            1,
            c,
            (num_frames - 1) // self.vae_scale_t + 1,
            height // self.vae_scale_s,
            width // self.vae_scale_s,
        )

    def _latent_stats(self, device, dtype=torch.float32):
        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean, device=device, dtype=dtype).view(1, cfg.z_dim, 1, 1, 1)
        std = torch.tensor(cfg.latents_std, device=device, dtype=dtype).view(1, cfg.z_dim, 1, 1, 1)
        return mean, std

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Frames (B, 3, T, H, W) in [-1, 1] -> normalized latents (B, C, T_lat, H_lat, W_lat), float32
        (the VAE posterior's mode, as diffusers conditions i2v)."""
        lat = self.vae.encode(video.to(self.device, torch.float32)).latent_dist.mode()
        mean, std = self._latent_stats(lat.device)
        return (lat - mean) / std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, output_type: str = "np"):
        """Normalized latents (B, C, T, H, W) -> frames in [0, 1] as np (B, T, H, W, 3) or PIL lists.

        With `vae_tiling` the decode runs in spatial tiles (`parallel.tiled_decode`); with `vae_parallel` in
        time chunks over the model group (`wan_parallel.parallel_decode`: its rank 0 gets the frames, the
        others None)."""
        mean, std = self._latent_stats(latents.device)
        z = latents.float() * std + mean
        p, layout = self.parallel, self.layout
        if p.vae_parallel and layout is not None and layout.model_group is not None:
            from mmkit.infer.wan_parallel import parallel_decode

            video = parallel_decode(self.vae, z, layout.model_group, p.vae_warmup, self.vae_scale_t)
            if video is None:
                return None
        elif p.vae_tiling:
            frames = (z.shape[2] - 1) * self.vae_scale_t + 1
            decode = lambda zt: self.vae.decode(zt, return_dict=False)[0]  # noqa: E731
            video = tiled_decode(decode, z, self.vae_scale_s, p.vae_tile, frames)
        else:
            video = self.vae.decode(z, return_dict=False)[0]  # (B, 3, T, H, W) in [-1, 1]
        frames = (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1).cpu().float().numpy()
        if output_type == "pil":
            from PIL import Image

            return [[Image.fromarray((f * 255).round().astype(np.uint8)) for f in clip] for clip in frames]
        return frames

    # ---- validation --------------------------------------------------------------------
    def check_inputs(
        self, prompt, height, width, num_frames, num_inference_steps, guidance_scale, output_type, image
    ):
        """Clear errors before any compute."""
        if not isinstance(prompt, (str, list)) or not prompt:
            raise ValueError("prompt: give a non-empty string (or a list of strings)")
        mult = self.vae_scale_s * self.transformer.cfg.patch_size[1]
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v <= 0 or v % mult:
                raise ValueError(f"{name}={v}: must be a positive multiple of {mult} (e.g. 480x832)")
        k = self.vae_scale_t
        if not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % k:
            lo = max(1, (num_frames - 1) // k * k + 1) if isinstance(num_frames, int) else 1
            raise ValueError(f"frames={num_frames}: must be {k}k+1 (e.g. {lo} or {lo + k})")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"steps={num_inference_steps}: must be an integer >= 1")
        if not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(
                f"guidance={guidance_scale}: must be a finite number >= 0 (<= 1 disables classifier-free guidance)"
            )
        if isinstance(prompt, str) and not prompt.strip():
            raise ValueError("prompt: is empty; describe the video to generate")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}: choose one of {OUTPUT_TYPES}")

    # ---- the call ----------------------------------------------------------------------
    def _conditioning(self, image, height, width, batch):
        """Extra model inputs (i2v overrides): (cond kwargs, uncond kwargs extras, prepare_input)."""
        return {}, None

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        image=None,
        height: int = 480,
        width: int = 832,
        num_frames: int = 81,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        seed: int | None = None,
        output_type: str = "np",
        sampler: str = "unipc",
        flow_shift: float | None = None,
        progress: bool = True,
        latents: torch.Tensor | None = None,
    ) -> VideoOutput:
        """Generate; arguments mirror diffusers' `WanPipeline`. Returns `VideoOutput(frames, step_times)`."""
        self.check_inputs(
            prompt, height, width, num_frames, num_inference_steps, guidance_scale, output_type, image
        )
        scheduler = make_scheduler(sampler, self.scheduler, flow_shift)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negs = negative_prompt if negative_prompt is not None else ""
        negs = [negs] * len(prompts) if isinstance(negs, str) else list(negs)
        if len(negs) != len(prompts):
            raise ValueError(f"negative_prompt: {len(negs)} given for {len(prompts)} prompts")
        extra, prepare = self._conditioning(image, height, width, len(prompts))  # before noise: may raise

        do_cfg = guidance_scale > 1.0
        layout, p = self.layout, self.parallel
        # CFG parallelism: a rank encodes (and denoises) only its own branch's text
        split = layout is not None and p.cfg == 2 and do_cfg
        with on_device(self.text_encoder, self.device, p.offload):
            ctx = self.encode_prompt(prompts).to(self.dtype) if not split or layout.branch == "cond" else None
            ctx_neg = (
                self.encode_prompt(negs).to(self.dtype)
                if do_cfg and (not split or layout.branch == "uncond")
                else None
            )

        if latents is None:
            generator = torch.Generator("cpu").manual_seed(seed if seed is not None else torch.seed() % 2**32)
            shape = (len(prompts), *self.latent_shape(height, width, num_frames)[1:])
            latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)
        cond = {"text_context": ctx, **extra}
        uncond = {"text_context": ctx_neg, **extra} if do_cfg else None
        stats = DenoiseStats()
        reset_all(self.transformer)  # a new generation: hooks (caches) drop what the last one left
        if layout is None:
            velocity = cfg_velocity(self.transformer, guidance_scale, cond, uncond)
        else:
            velocity = layout.velocity(self.dit, guidance_scale, cond, uncond)
            progress = progress and layout.shows_progress
        with (
            on_device(self.transformer, self.device, p.offload),
            on_device(self.vae, self.device, p.offload),
            step_invariant_cache(self.transformer),
        ):
            latents = denoise(velocity, latents, scheduler, num_inference_steps, prepare, progress, stats)
        if output_type == "latent":
            return VideoOutput(latents, stats.step_times)
        if layout is not None and not p.vae_parallel and not layout.writes:
            return VideoOutput(None, stats.step_times)  # the model group's rank 0 decodes
        with on_device(self.vae, self.device, p.offload):
            return VideoOutput(self.decode(latents, output_type), stats.step_times)


def load_wan_pipeline(
    path, task: str = "t2v", device="auto", dtype="fp32", parallel: InferenceParallel | None = None
) -> WanT2VPipeline:
    """A diffusers-layout Wan2.1 folder as the pipeline of `task` ("t2v" or "i2v"); the loader the
    Wan family spec names. `parallel`: a multi-process / memory layout (`infer.parallel.InferenceParallel`).
    Example: `pipe = load_wan_pipeline("Wan2.1-T2V-1.3B-Diffusers", "t2v")`."""
    if task not in ("t2v", "i2v"):
        raise ValueError(f"task={task!r}: choose one of t2v, i2v")
    if not Path(path).is_dir():
        raise FileNotFoundError(f"model folder not found: {path}")
    if task == "t2v":
        return WanT2VPipeline.from_pretrained(path, device=device, dtype=dtype, parallel=parallel)
    from mmkit.infer.i2v import WanI2VPipeline

    return WanI2VPipeline.from_pretrained(path, device=device, dtype=dtype, parallel=parallel)


load_wan_pipeline.estimate_memory = estimate_memory  # what `pipelines.estimate_memory` asks the loader
