"""Tiny random Wan2.1 pipelines written in the real diffusers folder layout, for tests and the demo.

`create_tiny_wan` writes what `Wan-AI/Wan2.1-T2V-1.3B-Diffusers` / `Wan2.1-I2V-14B-480P-Diffusers` hold
(model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/, and for i2v image_encoder/ and
image_processor/), only with small random weights, so diffusers' `WanPipeline.from_pretrained(outdir)` and
mmkit's loader read it through the same code path as a real checkpoint, offline, in seconds on a CPU.
The VAE is by default not random: its small weights were fitted once on synthetic shape clips
(`scripts/fit_tiny_vae.py`, shipped as `mmkit/assets/tiny_wan_vae.safetensors`), so that a DiT trained
on those clips decodes to visible shapes; `vae="random"` gives a random one.

Every parameter is perturbed away from its init (zero biases, unit norm weights included) so that a parity
test comparing mmkit with diffusers/transformers on these weights can actually fail.

This file does not hold the mmkit DiT or its converters (model.py, hf.py); the original-layout writer
below keeps its own key map on purpose, so that tests of `hf.py` compare against an independent source.
"""

from __future__ import annotations

import collections
import json
import math
import os
from pathlib import Path

import torch

from mmkit.outputs import claim_output_dir

# Tiny stand-ins for the real components. Widths are small but every structural feature stays:
# RoPE head_dim 32 splits unevenly into t/h/w = 12/10/10, the VAE keeps 8x spatial and 4x temporal
# compression, and text_dim / image_dim equal the tiny encoders' hidden sizes as 4096 / 1280 do for real.
TINY_DIT = {
    "patch_size": [1, 2, 2],
    "num_attention_heads": 2,
    "attention_head_dim": 32,  # inner dim 64
    "in_channels": 16,  # 36 for i2v: 16 noise + 4 first-frame mask + 16 image latents
    "out_channels": 16,
    "text_dim": 32,  # = TINY_UMT5["d_model"]
    "freq_dim": 32,
    "ffn_dim": 96,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": None,  # i2v: = TINY_CLIP["hidden_size"]
    "added_kv_proj_dim": None,  # i2v: = inner dim
    "rope_max_seq_len": 1024,
}
TINY_VAE = {
    "base_dim": 8,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],  # 3 spatial downsamples: 8x
    "num_res_blocks": 1,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],  # 2 temporal downsamples: 4x
    "dropout": 0.0,
}
TINY_VAE_ASSET = "tiny_wan_vae.safetensors"  # in mmkit/assets, written by scripts/fit_tiny_vae.py
TINY_UMT5 = {
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",  # as umt5-xxl
    "layer_norm_epsilon": 1e-6,
    "tie_word_embeddings": False,
    "scalable_attention": True,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}
TINY_CLIP = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,  # the pipeline reads hidden_states[-2], the output of layer 1
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,  # 4x4 patches + CLS = 17 image tokens
    "projection_dim": 16,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}
TOKENIZER_MAX_LENGTH = 512  # umt5 context the Wan pipelines pad prompts to

# scheduler/scheduler_config.json of Wan-AI/Wan2.1-T2V-1.3B-Diffusers (same in the I2V-480P folder).
SCHEDULER_CONFIG = {
    "_class_name": "UniPCMultistepScheduler",
    "_diffusers_version": "0.33.0.dev0",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "disable_corrector": [],
    "dynamic_thresholding_ratio": 0.995,
    "final_sigmas_type": "zero",
    "flow_shift": 3.0,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "predict_x0": True,
    "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_p": None,
    "solver_type": "bh2",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_beta_sigmas": False,
    "use_exponential_sigmas": False,
    "use_flow_sigmas": True,
    "use_karras_sigmas": False,
}

# model_index.json component classes as the real Hugging Face folders name them.
_T2V_COMPONENTS = {
    "scheduler": ["diffusers", "UniPCMultistepScheduler"],
    "text_encoder": ["transformers", "UMT5EncoderModel"],
    "tokenizer": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "WanTransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLWan"],
}
_I2V_COMPONENTS = {
    **_T2V_COMPONENTS,
    "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
    "image_processor": ["transformers", "CLIPImageProcessor"],
}
_PIPELINE_CLASS = {"t2v": "WanPipeline", "i2v": "WanImageToVideoPipeline"}

# The tokenizer's training text: short captions of the kind the demo prompts use.
CAPTIONS = [
    "a red cube spins slowly on a white table",
    "two blue spheres bounce across green grass",
    "a yellow triangle slides to the left under soft light",
    "the camera pans right over a small orange cone",
    "a purple ring rolls down a gray ramp and stops",
    "three black squares move up and fade into the dark",
    "a pink circle grows and shrinks in the center of the frame",
    "a green star rotates quickly while the background turns blue",
    "the camera zooms in on a striped ball falling from the sky",
    "a white cloud drifts over a calm blue sea at sunset",
    "a small boat moves from left to right across the water",
    "colorful shapes swirl around a bright light in slow motion",
]
_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()"
_SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in (u)mT5


def build_tokenizer():
    """A umT5-style Unigram tokenizer (`tokenizers.Tokenizer`) fitted on `CAPTIONS`.

    Pieces: `<pad>`=0, `</s>`=1, `<unk>`=2, the word boundary `▁`, every caption word as `▁word` scored by its
    log frequency, then single characters as a low-score fallback; characters outside `_ALPHABET` map to
    `<unk>`. Built from counts rather than `UnigramTrainer`, whose output is not reproducible run to run.
    Example: `build_tokenizer().encode("a red cube").tokens  # ['▁a', '▁red', '▁cube', '</s>']`.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    counts = collections.Counter(w for caption in CAPTIONS for w in caption.split())
    total = sum(counts.values())
    vocab = [(t, 0.0) for t in _SPECIAL_TOKENS] + [("▁", -2.0)]
    vocab += [
        ("▁" + w, math.log(c / total)) for w, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    ]
    vocab += [(ch, -12.0) for ch in _ALPHABET]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    # T5 appends </s> to every sequence.
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _SPECIAL_TOKENS])
    return tok


def create_tiny_wan(
    outdir: str | os.PathLike,
    task: str = "t2v",
    seed: int = 0,
    original_layout: bool = False,
    vae: str = "fitted",
    overwrite: bool = False,
    dit: dict | None = None,
) -> Path:
    """Write a tiny random Wan2.1 t2v or i2v pipeline in the diffusers layout; returns `outdir`.

    The transformer is saved sharded (with `diffusion_pytorch_model.safetensors.index.json`), as is the
    text encoder. Same `seed` -> byte-identical weights. `vae="fitted"` (default) writes the VAE fitted once
    on synthetic shape clips by `scripts/fit_tiny_vae.py` (`fitted_tiny_vae`; it reconstructs the demo's
    videos, whatever the seed); `vae="random"` writes perturbed random VAE weights drawn from `seed`
    (`random_tiny_vae`), which decode noise. `original_layout=True` also writes the same DiT
    weights in the original Wan2.1 release layout (original key names, `config.json` with `dim`, `in_dim`,
    ..., sharded safetensors) under `outdir/original/`. `dit` overrides entries of `TINY_DIT` (a wider or
    deeper DiT, e.g. the shapes model's `{"num_layers": 4, ...}`). A folder an earlier `create-tiny` wrote
    is replaced only with `overwrite=True`; any other non-empty folder is refused
    (`mmkit.outputs.claim_output_dir`).
    Example: `create_tiny_wan("/tmp/wan-tiny", task="i2v", seed=0)` then
    `diffusers.WanImageToVideoPipeline.from_pretrained("/tmp/wan-tiny")`.
    """
    if task not in _PIPELINE_CLASS:
        raise ValueError(f"create_tiny_wan: task={task!r} is not supported; use 't2v' or 'i2v'.")
    if vae not in ("fitted", "random"):
        raise ValueError(f"create_tiny_wan: vae={vae!r} is not supported; use 'fitted' or 'random'.")
    out = claim_output_dir(outdir, f"create-tiny wan-{task}", overwrite)
    from diffusers import WanTransformer3DModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, UMT5Config, UMT5EncoderModel

    # Tokenizer first: the text encoder's vocabulary is its size.
    tok = build_tokenizer()
    _write_tokenizer(tok, out / "tokenizer")

    # Each component gets its own seed so adding one never changes another's weights.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 101 + 1)
        text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=tok.get_vocab_size(), **TINY_UMT5))
        _perturb(text_encoder, seed * 101 + 2)
        text_encoder.save_pretrained(out / "text_encoder", max_shard_size=_shard_bytes(text_encoder, 2))

        unknown = set(dit or {}) - set(TINY_DIT)
        if unknown:
            raise ValueError(f"create_tiny_wan: dit has unknown keys {sorted(unknown)}; use keys of TINY_DIT")
        dit_cfg = {**TINY_DIT, **(dit or {})}
        if task == "i2v":
            inner = dit_cfg["num_attention_heads"] * dit_cfg["attention_head_dim"]
            dit_cfg.update(in_channels=36, image_dim=TINY_CLIP["hidden_size"], added_kv_proj_dim=inner)
        torch.manual_seed(seed * 101 + 3)
        transformer = WanTransformer3DModel(**dit_cfg)
        _perturb(transformer, seed * 101 + 4)
        transformer.save_pretrained(out / "transformer", max_shard_size=_shard_bytes(transformer, 3))

        (fitted_tiny_vae() if vae == "fitted" else random_tiny_vae(seed)).save_pretrained(out / "vae")

        if task == "i2v":
            torch.manual_seed(seed * 101 + 8)
            clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP))
            _perturb(clip, seed * 101 + 9)
            clip.save_pretrained(out / "image_encoder")
            _write_image_processor(out / "image_processor", TINY_CLIP["image_size"])

    (out / "scheduler").mkdir()
    _write_json(out / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
    _write_model_index(out, task)
    if original_layout:
        _write_original_dit(transformer, dit_cfg, task, out / "original")
    return out


def random_tiny_vae(seed: int = 0):
    """The tiny `AutoencoderKLWan` (`TINY_VAE`) with perturbed random weights drawn from `seed`.

    Its decoder turns any latent into coloured noise; it serves tests that want every weight random and off
    its init. The per-channel `latents_mean` / `latents_std` are random too, away from (0, 1), so a pipeline
    that skips (de)normalising differs.
    Example: `random_tiny_vae(seed=0).save_pretrained("/tmp/vae")`.
    """
    from diffusers import AutoencoderKLWan

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 101 + 5)
        gen = torch.Generator().manual_seed(seed * 101 + 6)
        z = TINY_VAE["z_dim"]
        latents_mean = [round(v, 4) for v in (0.5 * torch.randn(z, generator=gen)).tolist()]
        latents_std = [round(v, 4) for v in (0.6 + 1.8 * torch.rand(z, generator=gen)).tolist()]
        vae = AutoencoderKLWan(**TINY_VAE, latents_mean=latents_mean, latents_std=latents_std)
        _perturb(vae, seed * 101 + 7)
    return vae


def fitted_tiny_vae(path: str | os.PathLike | None = None):
    """The tiny `AutoencoderKLWan` (`TINY_VAE`) with the weights `scripts/fit_tiny_vae.py` fitted, float32.

    Reads one safetensors file (default: the `tiny_wan_vae.safetensors` shipped in `mmkit/assets`): fp16
    weights plus, in its metadata, the architecture and the per-channel `latents_mean` / `latents_std`
    measured on the fitting data. The architecture must equal `TINY_VAE`; nothing is unpickled.
    Example: `vae = fitted_tiny_vae(); vae.decode(vae.encode(video).latent_dist.mode()).sample`.
    """
    from diffusers import AutoencoderKLWan
    from safetensors import safe_open
    from safetensors.torch import load_file

    if path is None:
        from mmkit.assets import asset_path

        path = asset_path(TINY_VAE_ASSET)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"fitted tiny VAE weights not found: {path}; rerun `python scripts/fit_tiny_vae.py --out {path}` "
            "or pass vae='random' to create_tiny_wan."
        )
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise ValueError(
            f"{path}: no 'config' in the safetensors metadata; rewrite it with scripts/fit_tiny_vae.py."
        )
    config = json.loads(meta["config"])
    arch = {k: v for k, v in config.items() if k not in ("latents_mean", "latents_std")}
    if arch != TINY_VAE:
        raise ValueError(
            f"{path} was fitted for the VAE config {arch}, but TINY_VAE is now {TINY_VAE}; "
            "rerun scripts/fit_tiny_vae.py to fit the current one."
        )
    vae = AutoencoderKLWan(**config)
    vae.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()}, strict=True)
    return vae.eval()


def _perturb(module: torch.nn.Module, seed: int) -> None:
    """Move every parameter off its init: constant tensors (zero biases, unit norm weights) get N(0, 0.1)
    added, random ones N(0, (0.25 * own std)^2), so the init's scale, and norms' weights near 1, survive."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            flat = p.detach().float().flatten()
            spread = float(flat.std()) if flat.numel() > 1 else 0.0
            scale = 0.1 if spread < 1e-8 else 0.25 * spread
            p.add_((scale * noise).to(p.dtype))


def _shard_bytes(module: torch.nn.Module, n: int) -> int:
    """A max_shard_size that splits `module`'s fp32 weights into about `n` files."""
    total = sum(p.numel() * p.element_size() for p in module.state_dict().values())
    return total // n + 1


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _write_tokenizer(tok, folder: Path) -> None:
    """tokenizer.json plus the configs transformers' `T5TokenizerFast`/`AutoTokenizer` read."""
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    specials = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    _write_json(folder / "special_tokens_map.json", {**specials, "additional_special_tokens": []})
    _write_json(
        folder / "tokenizer_config.json",
        {
            **specials,
            "tokenizer_class": "T5Tokenizer",
            "model_max_length": TOKENIZER_MAX_LENGTH,
            "extra_ids": 0,  # no <extra_id_N> sentinels: the encoder's vocab is exactly tokenizer.json's
            "additional_special_tokens": [],
            "clean_up_tokenization_spaces": True,
        },
    )


def _write_image_processor(folder: Path, size: int) -> None:
    """preprocessor_config.json of the real I2V folders (OpenCLIP ViT-H/14 statistics), at `size` pixels."""
    folder.mkdir(parents=True)
    _write_json(
        folder / "preprocessor_config.json",
        {
            "crop_size": {"height": size, "width": size},
            "do_center_crop": True,
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_processor_type": "CLIPImageProcessor",
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "resample": 3,  # bicubic
            "rescale_factor": 1 / 255,
            "size": {"shortest_edge": size},
        },
    )


def _write_model_index(out: Path, task: str) -> None:
    import diffusers

    components = _I2V_COMPONENTS if task == "i2v" else _T2V_COMPONENTS
    index = {"_class_name": _PIPELINE_CLASS[task], "_diffusers_version": diffusers.__version__, **components}
    _write_json(out / "model_index.json", index)


# diffusers WanTransformer3DModel key -> original Wan2.1 `WanModel` key (wan/modules/model.py).
# Note the swap: diffusers' affine cross-attention norm `norm2` is the original `norm3`.
_TO_ORIGINAL = [
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    ("condition_embedder.image_embedder.norm1.", "img_emb.proj.0."),
    ("condition_embedder.image_embedder.ff.net.0.proj.", "img_emb.proj.1."),
    ("condition_embedder.image_embedder.ff.net.2.", "img_emb.proj.3."),
    ("condition_embedder.image_embedder.norm2.", "img_emb.proj.4."),
    (".attn1.to_out.0.", ".self_attn.o."),
    (".attn2.to_out.0.", ".cross_attn.o."),
    (".attn2.add_k_proj.", ".cross_attn.k_img."),
    (".attn2.add_v_proj.", ".cross_attn.v_img."),
    (".attn2.norm_added_k.", ".cross_attn.norm_k_img."),
    (".attn1.to_", ".self_attn."),
    (".attn2.to_", ".cross_attn."),
    (".attn1.", ".self_attn."),
    (".attn2.", ".cross_attn."),
    (".norm2.", ".norm3."),
    (".ffn.net.0.proj.", ".ffn.0."),
    (".ffn.net.2.", ".ffn.2."),
    (".scale_shift_table", ".modulation"),
    ("proj_out.", "head.head."),
]


def _original_key(key: str) -> str:
    if key == "scale_shift_table":
        return "head.modulation"
    for src, dst in _TO_ORIGINAL:
        if src in key:
            return key.replace(src, dst)
    return key  # patch_embedding.* keeps its name


def _write_original_dit(transformer: torch.nn.Module, dit_cfg: dict, task: str, folder: Path) -> None:
    """The DiT as the original Wan2.1 release ships it: `config.json` + sharded safetensors, original keys."""
    from mmkit.models.common.hf_io import save_state_dict

    sd = {_original_key(k): v for k, v in transformer.state_dict().items()}
    assert len(sd) == len(transformer.state_dict()), "original-layout key map collapsed two keys"
    heads, head_dim = dit_cfg["num_attention_heads"], dit_cfg["attention_head_dim"]
    config = {
        "_class_name": "WanModel",
        "_diffusers_version": "0.30.0",
        "model_type": task,
        "patch_size": dit_cfg["patch_size"],
        "text_len": TOKENIZER_MAX_LENGTH,
        "in_dim": dit_cfg["in_channels"],
        "dim": heads * head_dim,
        "ffn_dim": dit_cfg["ffn_dim"],
        "freq_dim": dit_cfg["freq_dim"],
        "text_dim": dit_cfg["text_dim"],  # fixed at 4096 in the real configs, so they omit it
        "out_dim": dit_cfg["out_channels"],
        "num_heads": heads,
        "num_layers": dit_cfg["num_layers"],
        "eps": dit_cfg["eps"],
    }
    total = sum(v.numel() * v.element_size() for v in sd.values())
    save_state_dict(sd, folder, "diffusion_pytorch_model", max_shard_bytes=total // 2 + 1)
    _write_json(folder / "config.json", config)
