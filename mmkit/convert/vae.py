"""Wan2.1 VAE: the original release checkpoint (`Wan2.1_VAE.pth`) <-> a diffusers `AutoencoderKLWan` folder.

The two layouts hold the same tensors under different names; only the names change (bit-exact both ways):
- original (wan/modules/vae.py): `encoder.conv1`, a flat `encoder.downsamples.N` list (residual blocks
  `residual.{0,2,3,6}` + `shortcut`, resamples), `encoder.middle.{0,1,2}`, `encoder.head.{0,2}`, the same
  for the decoder with a flat `decoder.upsamples.N`, and the 1x1 convs `conv1` / `conv2` between them;
- diffusers: `conv_in`, `down_blocks.N` (same flat order), `mid_block.{resnets,attentions}`, `norm_out` /
  `conv_out`, decoder `up_blocks.I.resnets.J` + `up_blocks.I.upsamplers.0`, `quant_conv` / `post_quant_conv`.
The name table is generated from the VAE config (levels, residual blocks per level, temporal strides), so it
covers any size, not only the released one. The original file stores no config: reading one, the
structure is read off the tensor shapes and the latent statistics are the Wan2.1 release values
(diffusers' defaults), unless the file is one this module wrote (its safetensors metadata carries the
diffusers config, so a round trip keeps e.g. `latents_mean`).

Reads `.pth` only through `torch.load(weights_only=True)`; writes safetensors only (never a pickle).

Example:
    >>> convert_vae("Wan2.1-T2V-1.3B/Wan2.1_VAE.pth", "wan_vae_diffusers", to="diffusers")
    >>> AutoencoderKLWan.from_pretrained("wan_vae_diffusers")
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from mmkit.checkpoint.common import check_out, new_dir
from mmkit.models.common.hf_io import (
    check_keys,
    load_safetensors,
    load_state_dict,
    read_json,
    save_state_dict,
)
from mmkit.outputs import check_output_file

COMMAND = "convert vae-convert"  # the marker of the folders it writes
ORIGINAL_NAME = "Wan2.1_VAE"  # the release file stem (Wan-AI/Wan2.1-*/Wan2.1_VAE.pth)
CONFIG_META_KEY = "mmkit_diffusers_config"  # safetensors metadata entry of files written here
DIFFUSERS_STEM = "diffusion_pytorch_model"
# residual block sub-modules: original Sequential index -> diffusers name
_RESIDUAL = (("residual.0.", "norm1."), ("residual.2.", "conv1."), ("residual.3.", "norm2."))
_RESIDUAL += (("residual.6.", "conv2."), ("shortcut.", "conv_shortcut."))
_RESAMPLE = ("resample.1.", "time_conv.")  # same names in both layouts
_ATTENTION = ("norm.", "to_qkv.", "proj.")


def _block(orig: str, diff: str, kind: str) -> list[tuple[str, str]]:
    """(original module prefix, diffusers module prefix) pairs of one residual / resample / attention block."""
    if kind == "residual":
        return [(orig + o, diff + d) for o, d in _RESIDUAL]
    subs = _RESAMPLE if kind == "resample" else _ATTENTION
    return [(orig + s, diff + s) for s in subs]


def _check_supported(cfg: dict) -> None:
    if cfg.get("is_residual"):
        raise ValueError(
            "VAE config is_residual=true is the Wan2.2 VAE; vae-convert handles the Wan2.1 VAE only"
        )
    if cfg.get("attn_scales"):
        raise ValueError(
            f"VAE config attn_scales={cfg['attn_scales']}: attention inside the down/up blocks is not part of the "
            "Wan2.1 VAE (diffusers' decoder has no such blocks); only attn_scales=[] converts"
        )


def name_pairs(cfg: dict) -> list[tuple[str, str]]:
    """Every (original module prefix, diffusers module prefix) a Wan2.1 VAE of diffusers config `cfg` can have.

    Example: `dict(name_pairs({"dim_mult": [1, 2, 4, 4], "num_res_blocks": 2}))["decoder.upsamples.3.resample.1."]`
    -> `"decoder.up_blocks.0.upsamplers.0.resample.1."`.
    """
    _check_supported(cfg)
    levels, nrb = len(cfg.get("dim_mult", [1, 2, 4, 4])), int(cfg.get("num_res_blocks", 2))
    pairs = [("conv1.", "quant_conv."), ("conv2.", "post_quant_conv.")]
    for side in ("encoder", "decoder"):
        pairs += [(f"{side}.conv1.", f"{side}.conv_in."), (f"{side}.head.0.", f"{side}.norm_out.")]
        pairs += [(f"{side}.head.2.", f"{side}.conv_out.")]
        pairs += _block(f"{side}.middle.0.", f"{side}.mid_block.resnets.0.", "residual")
        pairs += _block(f"{side}.middle.1.", f"{side}.mid_block.attentions.0.", "attention")
        pairs += _block(f"{side}.middle.2.", f"{side}.mid_block.resnets.1.", "residual")
    n = 0  # encoder: one flat list in both layouts (residual blocks, then a resample between levels)
    for level in range(levels):
        for _ in range(nrb):
            pairs += _block(f"encoder.downsamples.{n}.", f"encoder.down_blocks.{n}.", "residual")
            n += 1
        if level != levels - 1:
            pairs += _block(f"encoder.downsamples.{n}.", f"encoder.down_blocks.{n}.", "resample")
            n += 1
    n = 0  # decoder: flat in the original, grouped per level in diffusers (num_res_blocks + 1 resnets each)
    for level in range(levels):
        for j in range(nrb + 1):
            pairs += _block(f"decoder.upsamples.{n}.", f"decoder.up_blocks.{level}.resnets.{j}.", "residual")
            n += 1
        if level != levels - 1:
            pairs += _block(f"decoder.upsamples.{n}.", f"decoder.up_blocks.{level}.upsamplers.0.", "resample")
            n += 1
    return pairs


def _expected(cfg: dict) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the diffusers model `cfg` describes (built on the meta device)."""
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        model = AutoencoderKLWan(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_diffusers(sd: dict[str, torch.Tensor], cfg: dict, where: str) -> None:
    _check_supported(cfg)  # before anything is built from the config
    want = _expected(cfg)
    check_keys(want, sd, where)
    wrong = [f"{k}: {tuple(sd[k].shape)} vs {s}" for k, s in want.items() if tuple(sd[k].shape) != s]
    if wrong:
        raise ValueError(f"{where}: tensor shapes differ from the VAE config, e.g. {'; '.join(wrong[:3])}")


def _rename(sd: dict[str, torch.Tensor], table: dict[str, str], where: str, progress: bool) -> dict:
    out, unknown = {}, []
    for key in tqdm(sorted(sd), desc="rename VAE tensors", unit="tensor", disable=not progress):
        cut = key.rfind(".") + 1  # module prefix + parameter name (weight / bias / gamma)
        new = table.get(key[:cut])
        if new is None:
            unknown.append(key)
        else:
            out[new + key[cut:]] = sd[key]
    if unknown:
        raise ValueError(
            f"{where}: {len(unknown)} tensor(s) are not part of a Wan2.1 VAE of this config: "
            f"{', '.join(unknown[:10])}. Is it a Wan2.1 VAE checkpoint?"
        )
    return out


def to_diffusers(sd: dict[str, torch.Tensor], cfg: dict, progress: bool = False) -> dict[str, torch.Tensor]:
    """Original-layout VAE state dict -> diffusers `AutoencoderKLWan` state dict (checked against `cfg`).

    Example: `vae.load_state_dict(to_diffusers(sd, config_from_original(sd)))`.
    """
    out = _rename(sd, dict(name_pairs(cfg)), "original Wan VAE", progress)
    _check_diffusers(out, cfg, "original Wan VAE converted to diffusers")
    return out


def to_original(sd: dict[str, torch.Tensor], cfg: dict, progress: bool = False) -> dict[str, torch.Tensor]:
    """diffusers `AutoencoderKLWan` state dict -> original Wan2.1 VAE names.

    Example: `save_file(to_original(vae.state_dict(), dict(vae.config)), "Wan2.1_VAE.safetensors")`.
    """
    _check_diffusers(sd, cfg, "diffusers AutoencoderKLWan")
    return _rename(sd, {d: o for o, d in name_pairs(cfg)}, "diffusers AutoencoderKLWan", progress)


def config_from_original(sd: dict[str, torch.Tensor]) -> dict:
    """A diffusers `AutoencoderKLWan` config for an original-layout state dict, read off its shapes.

    Latent statistics are left to diffusers' defaults, the Wan2.1 release values.
    Example: `config_from_original(torch.load("Wan2.1_VAE.pth", weights_only=True))["base_dim"]` -> 96.
    """
    need = ("encoder.conv1.weight", "conv2.weight", "decoder.head.2.weight")
    lacking = [k for k in need if k not in sd]
    if lacking:
        raise ValueError(
            f"not an original Wan2.1 VAE checkpoint: it lacks {', '.join(lacking)} "
            f"(first keys: {sorted(sd)[:5]})"
        )
    base = sd["encoder.conv1.weight"].shape[0]
    blocks = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.downsamples.")})
    dims, per_level, temporal, count = [], [], [], 0
    for i in blocks:
        p = f"encoder.downsamples.{i}."
        if p + "to_qkv.weight" in sd:
            _check_supported({"attn_scales": ["(attention blocks in encoder.downsamples)"]})
        if p + "resample.1.weight" in sd:
            temporal.append(p + "time_conv.weight" in sd)
            per_level.append(count)
            count = 0
        elif p + "residual.2.weight" in sd:
            if count == 0:
                dims.append(sd[p + "residual.2.weight"].shape[0] // base)
            count += 1
    per_level.append(count)
    if len(set(per_level)) != 1:
        raise ValueError(
            f"original Wan VAE: residual blocks per level differ ({per_level}); not a Wan2.1 VAE"
        )
    cfg = {
        "base_dim": base,
        "z_dim": sd["conv2.weight"].shape[0],
        "dim_mult": dims,
        "num_res_blocks": per_level[0],
        "attn_scales": [],
        "temperal_downsample": temporal,
        "in_channels": sd["encoder.conv1.weight"].shape[1],
        "out_channels": sd["decoder.head.2.weight"].shape[0],
    }
    decoder_base = sd["decoder.head.2.weight"].shape[1] // dims[0]
    if decoder_base != base:
        cfg["decoder_base_dim"] = decoder_base
    return cfg


def _full_config(cfg: dict) -> dict:
    """The config.json diffusers writes for `cfg` (every field, defaults filled in)."""
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        model = AutoencoderKLWan(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    return json.loads(model.to_json_string())


def load_original(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(state dict, diffusers config if the file carries one) of an original-layout VAE file or folder.

    `.pth` is read with `torch.load(weights_only=True)` (tensors only, no code); `.safetensors` directly.
    A folder must hold `Wan2.1_VAE.safetensors` or `Wan2.1_VAE.pth`.
    Example: `sd, cfg = load_original("Wan2.1-T2V-1.3B/Wan2.1_VAE.pth")`.
    """
    p = Path(path)
    if p.is_dir():
        found = [p / f"{ORIGINAL_NAME}{ext}" for ext in (".safetensors", ".pth")]
        found = [f for f in found if f.is_file()]
        if not found:
            raise FileNotFoundError(
                f"{p} holds no {ORIGINAL_NAME}.safetensors / {ORIGINAL_NAME}.pth; pass the VAE file itself"
            )
        p = found[0]
    if not p.is_file():
        raise FileNotFoundError(f"VAE checkpoint not found: {p}")
    if p.suffix == ".safetensors":
        sd = load_safetensors(p)  # a damaged file: one error naming it
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
        try:
            cfg = json.loads(meta[CONFIG_META_KEY]) if CONFIG_META_KEY in meta else None
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: the VAE config in its metadata is not valid JSON ({e})") from e
        return sd, cfg
    if p.suffix not in (".pth", ".pt", ".ckpt"):
        raise ValueError(f"{p}: expected a .pth or .safetensors VAE file")
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with code or classes in it
        raise ValueError(
            f"{p}: cannot be read safely (torch.load weights_only=True refused it: {e}); mmkit never "
            "unpickles arbitrary objects. Convert it to safetensors with the tool that wrote it"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{p}: expected a dict of tensors (a VAE state dict), got {type(obj).__name__}")
    return obj, None


def _diffusers_folder(path: Path) -> Path:
    """The folder holding an AutoencoderKLWan: `path` itself or its `vae/` (a pipeline folder)."""
    if not path.is_dir():
        raise FileNotFoundError(f"diffusers VAE folder not found: {path}")
    folder = path / "vae" if (path / "model_index.json").is_file() else path
    cfg = read_json(folder / "config.json", "diffusers VAE config")
    if cfg.get("_class_name") != "AutoencoderKLWan":
        raise ValueError(
            f"{folder / 'config.json'}: _class_name={cfg.get('_class_name')!r}, expected 'AutoencoderKLWan'"
        )
    return folder


def convert_vae(
    src: str | os.PathLike, out: str | os.PathLike, to: str, progress: bool = True, overwrite: bool = False
) -> Path:
    """Convert a Wan2.1 VAE between the original release layout and diffusers; returns what was written.

    `to="diffusers"`: `src` is `Wan2.1_VAE.pth` / `.safetensors` (or a folder with it); `out` becomes a
    folder with `config.json` + `diffusion_pytorch_model.safetensors` that `AutoencoderKLWan.from_pretrained`
    loads. `to="original"`: `src` is a diffusers VAE folder (or a pipeline folder with `vae/`); `out` is a
    `.safetensors` file, or a folder that receives `Wan2.1_VAE.safetensors`. Output folders are marked as
    mmkit's; an existing output is refused before any weights are read, unless it is an earlier mmkit output
    and `overwrite` is given (replaced only once the new one is complete). A user's folder is never touched.
    Example: `convert_vae("Wan2.1_VAE.pth", "vae_diffusers", to="diffusers")`.
    """
    if to not in ("diffusers", "original"):
        raise ValueError(f"--to {to!r}: choose 'diffusers' or 'original'")
    src, out = Path(src), Path(out)
    if to == "diffusers":
        check_out(out, COMMAND, overwrite)
        sd, cfg = load_original(src)
        cfg = cfg or config_from_original(sd)
        new = to_diffusers(sd, cfg, progress)
        with new_dir(out, COMMAND, overwrite) as tmp:
            save_state_dict(new, tmp, DIFFUSERS_STEM, progress=progress, desc="write VAE")
            (tmp / "config.json").write_text(json.dumps(_full_config(cfg), indent=2) + "\n")
        return out
    if out.suffix == ".pth":
        raise ValueError(
            f"{out}: mmkit writes safetensors only; name the output {out.with_suffix('.safetensors')}"
        )
    single = out.suffix == ".safetensors"  # one file; else a folder that receives it
    if single:
        check_output_file(out, overwrite, flag="OUT")
    else:
        check_out(out, COMMAND, overwrite)
    folder = _diffusers_folder(src)
    cfg = read_json(folder / "config.json", "diffusers VAE config")
    _check_supported(cfg)
    new = to_original(load_state_dict(folder), cfg, progress)
    meta = {"format": "pt", CONFIG_META_KEY: json.dumps(cfg)}
    tensors = {k: v.contiguous() for k, v in new.items()}
    if not single:
        with new_dir(out, COMMAND, overwrite) as tmp:
            save_file(tensors, str(tmp / f"{ORIGINAL_NAME}.safetensors"), metadata=meta)
        return out / f"{ORIGINAL_NAME}.safetensors"
    part = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:  # written beside, then renamed over: an earlier file survives any crash
        save_file(tensors, str(part), metadata=meta)
        os.replace(part, out)
    finally:
        part.unlink(missing_ok=True)
    return out
