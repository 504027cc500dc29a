"""OpenSoraPlan 1.3 text-to-video and image-to-video pipelines over a release-layout folder.

Components (`model_index.json`, `transformer/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`):
the DiT is mmkit's `OpenSoraPlanTransformer` read through the family's adapter, the VAE mmkit's `WFVAE`
(release `.ckpt` or diffusers layout), the text encoder mT5 through transformers, the scheduler the
folder's diffusers class (the release: EulerAncestralDiscrete, v-prediction, zero terminal SNR, trailing).

Defaults follow the release sampling script (`opensora/utils/sample_utils.py` of v1.3.1): 100 steps, CFG
7.5, the prompt wrapped in `POSITIVE_TEMPLATE` and the fixed `NEGATIVE_PROMPT`, 93 x 352 x 640. The
initial noise is drawn on a CPU generator seeded with `seed` and multiplied by the scheduler's
`init_noise_sigma`; each step scales the model input with `scheduler.scale_model_input`.

i2v conditions on one image (mask type "i2v": frame 0 given), two ("transition": first and last), more
(frames spread evenly, "random_temporal") or a video file ("continuation"), as the release picks the type
from its inputs. `mask_type` (`--mask-type`) names it instead; the images must fit it (`check_conditioning`):
t2iv none (every frame generated), i2v 1, transition 2, continuation 1 or more (they start the clip),
random_temporal 2 or more (spread evenly), clear one per frame. A video at least `num_frames` long gets the
release's `MaskProcessor(min_clear_ratio=0.5, max_clear_ratio=0.5)` mask of the type over its first
`num_frames` frames (continuation: the first half given; random_temporal: a random half, drawn from
`seed`; i2v / transition: its first / first and last frames; clear: all; t2iv: none); a shorter video
only continues (all its frames start the clip). The conditioning frames go through the VAE as a masked
video and the pixel mask is compressed to 4 channels (`masks.compress_mask`); the DiT input is
[noisy latents 8 | masked-video latents 8 | mask 4].

Several processes (`parallel=InferenceParallel(...)`, inside an initialised process group): the DiT runs the
training plan's sharded forward over the sequence group (`infer/opensoraplan_parallel.py`), CFG branches
and prompts are split as for Wan (`infer/parallel.py`); the first rank of each video's group decodes.

Example:
    >>> pipe = mmkit.load_pipeline("Open-Sora-Plan-v1.3.0", task="t2v")
    >>> video = pipe("a red panda climbs a tree", num_frames=29, height=352, width=640).frames[0]
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmkit.device import resolve_device, resolve_dtype
from mmkit.infer.accel.conditioning import step_invariant_cache
from mmkit.infer.accel.hooks import reset_all
from mmkit.infer.media import load_image, read_video
from mmkit.infer.parallel import InferenceLayout, InferenceParallel, on_device
from mmkit.infer.samplers import DenoiseStats, cfg_velocity, denoise
from mmkit.infer.t2v import VideoOutput, check_components
from mmkit.models.common.hf_io import read_json
from mmkit.models.opensoraplan.masks import MASK_TYPES, compress_mask, pixel_mask
from mmkit.models.opensoraplan.tiny import SCHEDULER_CONFIG  # noqa: F401 (the release sampler config)

# the release sample script's strings, verbatim (triple-quoted there: newlines and indentation included)
POSITIVE_TEMPLATE = "\n    high quality, high aesthetic, {}\n    "
NEGATIVE_PROMPT = """
    nsfw, lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, worst quality, 
    low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry.
    """  # noqa: W291 (the release string has a trailing space there)
CLIP_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm")  # an --image that is a video: continuation
VAE_STRIDE = (4, 8, 8)  # WF-VAE (t, h, w)
PATCH = 2  # DiT patch (h, w)


def load_scheduler(folder: Path):
    """The diffusers scheduler that `scheduler/scheduler_config.json` names (a fresh instance)."""
    import diffusers

    cfg = read_json(folder / "scheduler_config.json", "scheduler config")
    name = cfg.get("_class_name", "")
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ValueError(
            f"{folder / 'scheduler_config.json'}: _class_name={name!r} is not a diffusers scheduler"
        )
    return cls.from_config(cfg)


def check_conditioning(images: list | None, num_frames: int | None, mask_type: str | None) -> None:
    """Raise one clear error when the conditioning images (paths; a video file counts as a clip) do not
    fit the mask type, before anything loads. `num_frames` None: the release's 93.

    Example: `check_conditioning(["first.png"], 93, "transition")` raises (transition needs 2 images).
    """
    images = list(images or [])
    T = 93 if num_frames is None else num_frames
    if mask_type is not None and mask_type not in MASK_TYPES:
        raise ValueError(f"--mask-type {mask_type}: choose one of {', '.join(MASK_TYPES)}")
    clips = [p for p in images if Path(str(p)).suffix.lower() in CLIP_SUFFIXES]
    if clips and len(images) > 1:
        raise ValueError(
            f"--image {clips[0]}: a video is the only conditioning input; drop the other --image"
        )
    if mask_type == "t2iv":
        if images:
            raise ValueError(
                "--mask-type t2iv generates every frame: drop --image (or pick another mask type)"
            )
        return
    if not images:
        raise ValueError(
            f"--mask-type {mask_type or 'i2v'} needs --image (t2iv alone generates without one)"
            if mask_type
            else "i2v needs --image PATH (the first frame)"
        )
    if clips or mask_type is None:
        return  # a video takes any type (checked against its length when read); images pick their own
    n = len(images)
    need = {"i2v": (1, 1, "1 image (the first frame)"), "transition": (2, 2, "2 images (first and last frame)"),
            "continuation": (1, T, "1 or more images (the first frames)"),
            "random_temporal": (2, T, "2 or more images (spread over the clip)"),
            "clear": (T, T, f"{T} images (one per frame) or a video")}[mask_type]  # fmt: skip
    if not need[0] <= n <= need[1]:
        raise ValueError(f"--mask-type {mask_type} takes {need[2]}; got {n} --image")


def image_indices(n_images: int, num_frames: int, mask_type: str | None) -> tuple[list[int], str]:
    """Frames the conditioning images fill, and the mask type: the release's choice from the image count
    when `mask_type` is None; "continuation" puts the images on the first frames, "clear" on every frame.
    Example: `image_indices(2, 93, None)` -> `([0, 92], "transition")`.
    """
    if n_images > num_frames:
        raise ValueError(f"image: {n_images} conditioning frames for a {num_frames}-frame clip")
    if mask_type in ("continuation", "clear"):
        return list(range(n_images)), mask_type
    if mask_type == "t2iv":
        return [], mask_type
    if n_images == 1:
        return [0], mask_type or "i2v"
    if n_images == 2:
        return [0, num_frames - 1], mask_type or "transition"
    idx = np.linspace(0, num_frames - 1, n_images).round().astype(int).tolist()
    return idx, mask_type or "random_temporal"


def _image_tensor(path, height: int, width: int) -> torch.Tensor:
    """An image (file or PIL) -> (3, H, W) in [-1, 1], center-cropped to the aspect ratio, then resized."""
    im = load_image(path)
    w0, h0 = im.size
    scale = max(height / h0, width / w0)
    cw, ch = round(width / scale), round(height / scale)
    left, top = (w0 - cw) // 2, (h0 - ch) // 2
    im = im.crop((left, top, left + cw, top + ch)).resize((width, height))
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return 2 * x - 1


class OpenSoraPlanPipeline:
    """OpenSoraPlan 1.3 t2v / i2v. Build with `mmkit.load_pipeline(path, task="t2v"|"i2v")`.

    Example: `pipe(prompt, image=["first.png", "last.png"], num_frames=29).frames[0]` (transition).
    """

    def __init__(self, folder, task: str = "t2v", device="auto", dtype="fp32", parallel=None):
        from mmkit import registry
        from mmkit.models.opensoraplan.text import MT5TextEncoder
        from mmkit.models.opensoraplan.vae_io import load_vae

        self.folder, self.task = Path(folder), task
        self.device, self.dtype = resolve_device(str(device)), resolve_dtype(dtype)  # "cuda:1" or a device
        check_components(self.folder, ["transformer", "vae", "text_encoder", "tokenizer", "scheduler"], task)
        # multi-process / memory options: the layout is checked and its process groups built before any
        # weights are read; with a layout the sampler calls `dit`, the sequence-parallel (and / or
        # sharded) wrapper of `transformer`
        p = parallel or InferenceParallel()
        self.parallel, self.layout = p, None
        if parallel is not None:
            from mmkit.infer.opensoraplan_parallel import check_parallel

            check_parallel(self.folder, p, InferenceLayout.world_size())
            self.layout = InferenceLayout(p)
        cpu = torch.device("cpu")
        stage = cpu if p.offload else self.device  # offload: every model waits on the CPU for its stage
        spec = registry.get("opensoraplan")
        hf = spec.resolve("hf").read(self.folder)
        if spec.resolve("hf").task(hf.cfg) != task:
            raise ValueError(
                f"{self.folder / 'transformer'}: holds a {'i2v' if hf.cfg.i2v else 't2v'} OpenSoraPlan DiT; "
                f"task={task!r} needs the {'i2v (OpenSoraInpaint_v1_3)' if task == 'i2v' else 't2v'} one"
            )
        self.transformer = spec.build_model(hf.cfg)
        self.transformer.load_state_dict(hf.state)
        self.transformer.to(cpu if p.dit_fsdp else stage, self.dtype).eval()
        self.vae = load_vae(self.folder / "vae").to(stage).eval()  # fp32: decoding is precision-sensitive
        t5_device = cpu if p.t5_cpu or p.t5_fsdp else stage
        self.text_encoder = MT5TextEncoder.from_folder(self.folder, t5_device, self.dtype, hf.cfg.text_len)
        self.scheduler = load_scheduler(self.folder / "scheduler")
        self.dit = self.transformer
        if self.layout is not None:
            self._parallelize()

    def _parallelize(self) -> None:
        """Sequence parallelism wraps the DiT (`opensoraplan_parallel.OpenSoraPlanSequenceParallel`, the
        training plan's sharded forward); FSDP2 shards it and / or mT5 over the model group."""
        from mmkit.infer.opensoraplan_parallel import OpenSoraPlanSequenceParallel

        layout = self.layout
        self.dit = OpenSoraPlanSequenceParallel.parallelize(self.transformer, layout, self.device)
        if self.parallel.t5_fsdp:
            t5 = self.text_encoder.model
            layout.shard_weights(t5, t5.encoder.block, self.device)

    @torch.no_grad()
    def encode(self, video: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Videos (B, 3, T, H, W) in [-1, 1] -> DiT latents: a posterior sample, shifted and scaled (the
        release's `WFVAEModelWrapper.encode`). Training on raw videos calls this."""
        post = self.vae.encode(video.to(self.device, torch.float32), tiled=True)
        return self.vae.scale_latents(post.sample(generator=generator))

    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts as given (no template) -> (mT5 features (B, 512, D), mask (B, 512))."""
        return self.text_encoder(list(prompts))

    def latent_shape(self, height: int, width: int, num_frames: int) -> tuple[int, ...]:
        st, sh, sw = VAE_STRIDE
        return (self.transformer.cfg.in_channels, (num_frames - 1) // st + 1, height // sh, width // sw)

    def check_inputs(
        self, height, width, num_frames, steps, guidance, image, output_type, mask_type=None
    ) -> None:
        if (num_frames - 1) % VAE_STRIDE[0] or num_frames < 1:
            raise ValueError(f"num_frames={num_frames}: must be 4k+1 (the WF-VAE's temporal stride), e.g. 93")
        for name, v in (("height", height), ("width", width)):
            if v <= 0 or v % (VAE_STRIDE[1] * PATCH):
                raise ValueError(f"{name}={v}: must be a positive multiple of 16 (VAE stride 8 x patch 2)")
        if steps < 1:
            raise ValueError(f"num_inference_steps={steps}: must be >= 1")
        if guidance < 0:
            raise ValueError(f"guidance_scale={guidance}: must be >= 0")
        if output_type not in ("np", "latent"):
            raise ValueError(f"output_type={output_type!r}: choose 'np' or 'latent'")
        if self.task == "i2v" and not image and mask_type != "t2iv":
            raise ValueError("task=i2v needs image=PATH or a list of paths (--image, repeatable)")
        if self.task == "t2v" and image:
            raise ValueError("image= is for task=i2v; this pipeline was loaded for t2v")

    def _conditioning(self, image, mask_type, num_frames, height, width, batch, generator, seed: int = 0):
        """i2v: [masked-video latents | compressed mask] (B, 8 + 4, T', h, w) for every model call."""
        if image is None:
            paths = []
        elif isinstance(image, (str, Path)) or hasattr(image, "convert"):
            paths = [image]
        else:
            paths = list(image)
        check_conditioning(
            [p if isinstance(p, (str, Path)) else "image.png" for p in paths], num_frames, mask_type
        )
        if len(paths) == 1 and Path(str(paths[0])).suffix.lower() in CLIP_SUFFIXES:
            clip = read_video(paths[0])[:num_frames]
            paths = [Image.fromarray(f) for f in clip]
            if len(clip) < num_frames and mask_type not in (None, "continuation"):
                raise ValueError(
                    f"--image {image}: {len(clip)} frames; --mask-type {mask_type} on a video needs at least "
                    f"--frames {num_frames} of them (a shorter video only continues: --mask-type continuation)"
                )
            if len(clip) == num_frames:  # the release's MaskProcessor(0.5, 0.5) on the whole clip
                mask_type = mask_type or "continuation"
                m = pixel_mask(mask_type, num_frames, 1, 1, min_clear_ratio=0.5, max_clear_ratio=0.5,
                               rng=random.Random(seed))[:, 0, 0, 0]  # fmt: skip
                idx = [i for i in range(num_frames) if m[i] < 0.5]
                paths = [paths[i] for i in idx]
            else:  # a shorter video: all its frames start the clip
                idx, mask_type = list(range(len(paths))), "continuation"
        else:
            idx, mask_type = image_indices(len(paths), num_frames, mask_type)
        video = torch.zeros(1, 3, num_frames, height, width)
        mask = torch.ones(1, 1, num_frames, height, width)  # 1 = frame to generate
        for i, p in zip(idx, paths):
            video[0, :, i] = _image_tensor(p, height, width)
            mask[:, :, i] = 0
        with torch.no_grad(), on_device(self.vae, self.device, self.parallel.offload):
            post = self.vae.encode((video * (mask < 0.5)).to(self.device), tiled=True)
            masked = self.vae.scale_latents(post.sample(generator=generator))
        cond = torch.cat([masked, compress_mask(mask.to(self.device), *VAE_STRIDE)], dim=1)
        return cond.to(self.dtype).expand(batch, -1, -1, -1, -1), mask_type

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        image=None,
        height: int = 352,
        width: int = 640,
        num_frames: int = 93,
        num_inference_steps: int = 100,
        guidance_scale: float = 7.5,
        seed: int | None = None,
        mask_type: str | None = None,
        output_type: str = "np",
        sampler: str | None = None,
        flow_shift: float | None = None,
        use_template: bool = True,
        progress: bool = True,
        latents: torch.Tensor | None = None,
    ) -> VideoOutput:
        """Generate; returns `VideoOutput(frames (B, T, H, W, 3) in [0, 1] or latents, step_times)`.

        `negative_prompt=None` uses the release's `NEGATIVE_PROMPT`; `use_template=False` sends the prompt
        as given. `sampler` / `flow_shift` are Wan options: OpenSoraPlan samples with the folder's scheduler.
        """
        if sampler not in (None, "folder") or flow_shift is not None:
            raise ValueError(
                "sampler/flow_shift: OpenSoraPlan samples with its folder's scheduler "
                f"({self.scheduler.__class__.__name__}); drop --sampler/--flow-shift"
            )
        self.check_inputs(
            height, width, num_frames, num_inference_steps, guidance_scale, image, output_type, mask_type
        )
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if use_template:
            prompts = [POSITIVE_TEMPLATE.format(p) for p in prompts]
        negs = NEGATIVE_PROMPT if negative_prompt is None else negative_prompt
        negs = [negs] * len(prompts) if isinstance(negs, str) else list(negs)
        if len(negs) != len(prompts):
            raise ValueError(f"negative_prompt: {len(negs)} given for {len(prompts)} prompts")
        seed = seed if seed is not None else torch.seed() % 2**32
        generator = torch.Generator("cpu").manual_seed(seed)
        b = len(prompts)
        prepare = None
        if self.task == "i2v":
            cond, _ = self._conditioning(image, mask_type, num_frames, height, width, b, generator, seed)
            prepare = lambda x: torch.cat([x, cond], dim=1)  # noqa: E731

        do_cfg = guidance_scale > 1.0
        layout, par = self.layout, self.parallel
        # CFG parallelism: a rank encodes (and denoises) only its own branch's text
        split = layout is not None and par.cfg == 2 and do_cfg
        cond_kw = {"caption": None, "caption_mask": None}
        uncond_kw = dict(cond_kw) if do_cfg else None
        with on_device(self.text_encoder, self.device, par.offload):
            if not split or layout.branch == "cond":
                cond_kw = self._caption(prompts)
            if do_cfg and (not split or layout.branch == "uncond"):
                uncond_kw = self._caption(negs)
        shape = self.latent_shape(height, width, num_frames)
        if latents is None:
            # init_noise_sigma depends on the step count (4096 for the release's trailing 100 steps)
            self.scheduler.set_timesteps(num_inference_steps, device=self.device)
            latents = torch.randn((b, *shape), generator=generator, dtype=torch.float32)
            latents = latents.to(self.device) * self.scheduler.init_noise_sigma
        video_mask = torch.ones(b, *shape[1:], device=self.device)  # every latent pixel is real
        dit = self.dit

        def model(x, t, caption, caption_mask):
            return dit(x.to(self.dtype), t.to(self.dtype), caption, video_mask, caption_mask).float()

        reset_all(self.transformer)
        stats = DenoiseStats()
        if layout is None:
            velocity = cfg_velocity(model, guidance_scale, cond_kw, uncond_kw)
        else:
            velocity = layout.velocity(model, guidance_scale, cond_kw, uncond_kw)
            progress = progress and layout.shows_progress
        step_kwargs = {"generator": generator} if "generator" in _step_params(self.scheduler) else {}
        with on_device(self.transformer, self.device, par.offload), step_invariant_cache(self.transformer):
            latents = denoise(
                velocity, latents, self.scheduler, num_inference_steps, prepare, progress, stats, step_kwargs
            )
        if output_type == "latent":
            return VideoOutput(latents, stats.step_times)
        if layout is not None and not layout.writes:
            return VideoOutput(None, stats.step_times)  # the model group's rank 0 decodes
        with on_device(self.vae, self.device, par.offload):
            video = self.vae.decode(self.vae.unscale_latents(latents.float()), tiled=True)  # (B, 3, T, H, W)
        frames = (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1).cpu().numpy()
        return VideoOutput(frames, stats.step_times)

    def _caption(self, prompts: list[str]) -> dict:
        """The DiT's caption keywords of prompts: mT5 features (B, 512, D) in the DiT's dtype and the mask,
        on the pipeline's device (the encoder may sit on the CPU: `t5_cpu`)."""
        feats, mask = self.text_encoder(prompts)
        return {"caption": feats.to(self.device, self.dtype), "caption_mask": mask.to(self.device)}


def _step_params(scheduler) -> set[str]:
    import inspect

    return set(inspect.signature(scheduler.step).parameters)


def load_opensoraplan_pipeline(
    path, task: str = "t2v", device="auto", dtype="fp32", parallel: InferenceParallel | None = None
) -> OpenSoraPlanPipeline:
    """The registry's pipeline loader (`FamilySpec.pipeline`). `parallel`: a multi-process / memory layout
    (`infer.parallel.InferenceParallel`). Example: `load_opensoraplan_pipeline(d, "i2v")`."""
    return OpenSoraPlanPipeline(path, task=task, device=device, dtype=dtype, parallel=parallel)


def _check_parallel(path, parallel: InferenceParallel, world: int) -> None:
    from mmkit.infer.opensoraplan_parallel import check_parallel

    check_parallel(path, parallel, world)


load_opensoraplan_pipeline.check_conditioning = check_conditioning  # what `pipelines.check_conditioning` asks
load_opensoraplan_pipeline.check_parallel = _check_parallel  # what `generate --ulysses-size ...` asks first
