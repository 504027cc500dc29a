"""The shipped shapes model: a Wan2.1-architecture DiT trained on synthetic moving-shape clips.

`scripts/pretrain_shapes.py` trains it (64x64 px, 17 frames) and `save_shapes_asset` writes its EMA
weights as `mmkit/assets/shapes_wan_dit.safetensors`: bf16 tensors under mmkit's parameter names, with
the DiT config, the held-out prompts (caption combinations never seen in training) and the training
step in the safetensors metadata. `create_shapes_wan` (`mmkit create-tiny wan-shapes DIR`) writes a
complete diffusers-layout t2v folder around it: the tiny umT5 and tokenizer of `create_tiny_wan`
(seed 0, the ones the model was trained with), the shipped fitted VAE, and `heldout_prompts.json`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from mmkit.models.wan.config import WanConfig
from mmkit.models.wan.model import WanTransformer
from mmkit.outputs import mark_output_dir

SHAPES_ASSET = "shapes_wan_dit.safetensors"  # in mmkit/assets, written by scripts/pretrain_shapes.py
# The DiT size, chosen by measurement (README "The shapes model"): at 64x64 px x 17 frames (80 tokens)
# its forward is >= 80% of `mmkit generate` time at 50 steps on a 2-core CPU.
SHAPES_DIT = {"num_attention_heads": 4, "attention_head_dim": 32, "ffn_dim": 512, "num_layers": 6}
# The umT5 context the DiT reads: shapes captions are <= 16 tokens, so 20 instead of Wan2.1's 512, and
# each cross-attention projects 20 text tokens instead of 512 (the run trained at 2.2-2.8 steps/s; the
# earlier runs with 512 at 2.1-2.5 on the same machine, shared then).
SHAPES_TEXT_LEN = 20
SHAPES_VIDEO = {"height": 64, "width": 64, "num_frames": 17}  # what the model was trained on
# the one prompt step caches calibrate on (`mmkit demo`, benchmarks/cache.py): not a held-out prompt
SHAPES_CALIB_PROMPT = "a white triangle moves up on a dark blue background"


def save_shapes_asset(
    ckpt: str | os.PathLike, out: str | os.PathLike, heldout: list[str]
) -> tuple[Path, int]:
    """Write the EMA weights of the latest checkpoint in `ckpt` as the bf16 shapes asset `out`.

    Returns (path, training step). Example:
    `save_shapes_asset("outputs/pretrain_shapes/ckpt", "mmkit/assets/shapes_wan_dit.safetensors", prompts)`.
    """
    from mmkit.checkpoint.dcp import export_model_state, read_checkpoint_info
    from mmkit.models.common.hf_io import read_json

    info = read_checkpoint_info(ckpt)
    init = Path(info.init_from)
    cfg = WanConfig.from_dict(read_json(init / "transformer" / "config.json", "start folder DiT config"))
    model = WanTransformer(cfg)
    model.load_state_dict(export_model_state(info.step_dir, "ema" if info.has_ema else "model"), strict=True)
    return write_shapes_asset(model, out, heldout, info.step, _text_encoder_sha(init)), info.step


def state_sha256(sd: dict[str, torch.Tensor]) -> str:
    """A hash of a state dict's names, dtypes, shapes and values (independent of the file format)."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _text_encoder_sha(folder: Path) -> str:
    from mmkit.models.common.hf_io import load_state_dict

    return state_sha256(load_state_dict(folder / "text_encoder"))


def write_shapes_asset(
    model: WanTransformer, out: str | os.PathLike, heldout: list[str], step: int, text_encoder_sha: str = ""
) -> Path:
    """`model`'s weights in bf16 plus config, held-out prompts, step and the hash of the text encoder it
    was trained with (`create_shapes_wan` checks it) in the metadata -> `out`.

    Example: `write_shapes_asset(dit, "/tmp/shapes.safetensors", ["a red circle moves left on a black background"], 0)`.
    """
    from safetensors.torch import save_file

    meta = {
        "config": json.dumps(model.cfg.to_dict()),
        "heldout_prompts": json.dumps(list(heldout)),
        "step": str(step),
        "video": json.dumps(SHAPES_VIDEO),
        "text_encoder_sha256": text_encoder_sha,
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(out), metadata=meta)
    return out


def load_shapes_asset(path: str | os.PathLike | None = None) -> tuple[WanTransformer, dict]:
    """The shipped shapes DiT (float32, eval mode) and its metadata {"heldout_prompts", "step", "video"}.

    Example: `dit, meta = load_shapes_asset(); meta["heldout_prompts"][:2]`.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    if path is None:
        from mmkit.assets import asset_path

        path = asset_path(SHAPES_ASSET)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"shapes model weights not found: {path}; rerun scripts/pretrain_shapes.py")
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    if "config" not in raw:
        raise ValueError(
            f"{path}: no 'config' in the safetensors metadata; rewrite it with pretrain_shapes.py"
        )
    cfg = WanConfig.from_dict(json.loads(raw["config"]))
    model = WanTransformer(cfg)
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()}, strict=True)
    meta = {
        "heldout_prompts": json.loads(raw.get("heldout_prompts", "[]")),
        "step": int(raw.get("step", 0)),
        "video": json.loads(raw.get("video", json.dumps(SHAPES_VIDEO))),
        "text_encoder_sha256": raw.get("text_encoder_sha256", ""),
    }
    return model.eval(), meta


def create_shapes_wan(
    outdir: str | os.PathLike,
    seed: int = 0,
    asset: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the shipped shapes model as a complete diffusers-layout Wan2.1 t2v folder; returns `outdir`.

    `seed` must stay 0: the DiT was trained on the features of the seed-0 tiny text encoder. A folder an
    earlier `create-tiny` wrote is replaced only with `overwrite=True`; any other non-empty folder is refused.
    Example: `create_shapes_wan("/tmp/wan-shapes")` then
    `mmkit generate t2v --model /tmp/wan-shapes --prompt "a red circle moves left on a black background"
    --height 64 --width 64 --frames 17 --out red.mp4`.
    """
    from mmkit.models.wan.load import save_transformer
    from mmkit.models.wan.tiny import create_tiny_wan

    if seed != 0:
        raise ValueError(
            f"wan-shapes: seed={seed}; the shapes model was trained with the seed-0 text encoder"
        )
    dit, meta = load_shapes_asset(asset)
    c = dit.cfg
    size = {
        "num_attention_heads": c.num_attention_heads,
        "attention_head_dim": c.attention_head_dim,
        "ffn_dim": c.ffn_dim,
        "num_layers": c.num_layers,
    }
    out = create_tiny_wan(outdir, task="t2v", seed=0, dit=size, overwrite=overwrite)
    mark_output_dir(out, "create-tiny wan-shapes")
    sha = _text_encoder_sha(out)
    if meta["text_encoder_sha256"] and sha != meta["text_encoder_sha256"]:
        # the DiT only understands the features of the exact encoder it was trained with
        raise ValueError(
            f"wan-shapes: the tiny umT5 that create_tiny_wan(seed=0) builds here differs from the one the "
            f"shapes model was trained with (sha256 {sha[:12]} vs {meta['text_encoder_sha256'][:12]}); "
            "retrain with scripts/pretrain_shapes.py on this install"
        )

    shutil.rmtree(out / "transformer")  # the random DiT of the same size -> the trained one
    save_transformer(dit, out / "transformer")
    (out / "heldout_prompts.json").write_text(json.dumps(meta["heldout_prompts"], indent=1) + "\n")
    return out
