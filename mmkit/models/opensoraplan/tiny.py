"""A tiny random OpenSoraPlan 1.3 pipeline folder in the release layout, for tests and the demo.

`model_index.json`, `transformer/` (release DiT config + `diffusion_pytorch_model.safetensors`), `vae/`
(WF-VAE `config.json` + a release `merged.ckpt`), `text_encoder/` (a tiny `MT5EncoderModel`),
`tokenizer/` (a T5-style Unigram tokenizer fitted locally) and `scheduler/` (the release sampler config).
Nothing is downloaded. Same seed -> the same weights.

Example: `create_tiny_osp("/tmp/osp-tiny", task="i2v")` then `mmkit.load_pipeline("/tmp/osp-tiny", task="i2v")`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mmkit.models.opensoraplan import vae_io
from mmkit.models.opensoraplan.config import OSPConfig
from mmkit.models.opensoraplan.hf import DIT_STEM, to_hf
from mmkit.models.opensoraplan.wfvae import WFVAE, WFVAEConfig
from mmkit.models.wan.tiny import _perturb, _write_tokenizer, build_tokenizer
from mmkit.outputs import claim_output_dir

TINY_MT5 = {
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
}
# 4 layers so layer 2 is Skiparse (layers 0, 1 and >= 30 stay dense), 2 heads x 24
TINY_DIT = {"num_attention_heads": 2, "attention_head_dim": 24, "num_layers": 4, "caption_channels": 32}
TINY_DIT["cross_attention_dim"] = 48
TINY_VAE = {
    "base_channels": 8,
    "encoder_energy_flow_hidden_size": 4,
    "decoder_energy_flow_hidden_size": 8,
    "norm_type": "layernorm",
    "t_interpolation": "trilinear",
    "connect_res_layer_num": 2,
}
# the release sampling scheduler (`--sample_method EulerAncestralDiscrete --rescale_betas_zero_snr
# --prediction_type v_prediction`, diffusers defaults otherwise: linear betas 1e-4..0.02, 1000 steps)
SCHEDULER_CONFIG = {
    "_class_name": "EulerAncestralDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
}
PIPELINE_CLASS = {"t2v": "OpenSoraPipeline", "i2v": "OpenSoraInpaintPipeline"}


def _json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def create_tiny_osp(
    outdir: str | os.PathLike, task: str = "t2v", seed: int = 0, overwrite: bool = False
) -> Path:
    """Write a tiny random OpenSoraPlan 1.3 t2v or i2v pipeline folder; returns `outdir`.

    A folder an earlier `create-tiny` wrote is replaced only with `overwrite=True`; any other non-empty
    folder is refused (`mmkit.outputs.claim_output_dir`).
    Example: `create_tiny_osp("/tmp/osp-tiny", task="t2v", seed=0)`.
    """
    from transformers import MT5Config, MT5EncoderModel

    if task not in PIPELINE_CLASS:
        raise ValueError(f"create_tiny_osp: task={task!r} is not supported; use 't2v' or 'i2v'")
    out = claim_output_dir(outdir, f"create-tiny osp-{task}", overwrite)
    tok = build_tokenizer()
    _write_tokenizer(tok, out / "tokenizer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 101 + 1)
        enc = MT5EncoderModel(MT5Config(vocab_size=tok.get_vocab_size(), **TINY_MT5))
        _perturb(enc, seed * 101 + 2)
        enc.save_pretrained(out / "text_encoder")

        cfg = OSPConfig(**TINY_DIT, vae_scale_factor_t=4 if task == "i2v" else None)
        torch.manual_seed(seed * 101 + 3)
        from mmkit.models.opensoraplan.model import OpenSoraPlanTransformer

        dit = OpenSoraPlanTransformer(cfg)
        _perturb(dit, seed * 101 + 4)
        from mmkit.models.common.hf_io import save_state_dict

        save_state_dict(to_hf(dit.state_dict()), out / "transformer", DIT_STEM)
        _json(out / "transformer" / "config.json", cfg.to_dict())

        vcfg = WFVAEConfig(**TINY_VAE)
        torch.manual_seed(seed * 101 + 5)
        vae = WFVAE(vcfg)
        trainable = [p for n, p in vae.named_parameters() if "wavelet" not in n]
        gen = torch.Generator().manual_seed(seed * 101 + 6)
        with torch.no_grad():
            for p in trainable:
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
        vae_io.write_ckpt(vae.state_dict(), vcfg.to_dict(), out / "vae")

    _json(out / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
    index = {
        "_class_name": PIPELINE_CLASS[task],
        "transformer": ["mmkit", "OpenSoraPlanTransformer"],
        "vae": ["mmkit", "WFVAE"],
        "text_encoder": ["transformers", "MT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "scheduler": ["diffusers", SCHEDULER_CONFIG["_class_name"]],
    }
    _json(out / "model_index.json", index)
    return out
