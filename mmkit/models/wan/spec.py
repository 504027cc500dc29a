"""The Wan2.1 family as the registry sees it (`mmkit.registry`): detection, configs, the tensor- and
pipeline-parallel split declared once, and where its plan, stages, task and pipeline live."""

from __future__ import annotations

from pathlib import Path

from mmkit.models.common.hf_io import read_json
from mmkit.models.common.video_rules import video_clip_errors
from mmkit.registry import EstimatorInfo, FamilySpec, ModelShape, PPRule, TPRule

# diffusers pipeline classes of the Wan2.1 releases (model_index.json `_class_name`)
PIPELINES = ("WanPipeline", "WanImageToVideoPipeline")
# the DiT's config.json `_class_name`: diffusers layout, original release layout
TRANSFORMERS = ("WanTransformer3DModel", "WanModel")


def detect(folder: Path) -> bool:
    """A diffusers Wan pipeline folder, its `transformer/` folder, or an original-release DiT folder."""
    if (folder / "model_index.json").is_file():
        return read_json(folder / "model_index.json").get("_class_name") in PIPELINES
    if (folder / "config.json").is_file():
        return read_json(folder / "config.json").get("_class_name") in TRANSFORMERS
    return False


def _flavors():
    """Named public sizes -> a factory of a fresh config."""
    import dataclasses

    from mmkit.models.wan.config import FLAVORS

    return {name: (lambda c=cfg: dataclasses.replace(c)) for name, cfg in FLAVORS.items()}


def _config_from_hf(d: dict):
    from mmkit.models.wan.config import WanConfig

    return WanConfig.from_dict(d).validate()


def _build(cfg):
    from mmkit.models.wan.model import WanTransformer

    return WanTransformer(cfg)


def _shape(cfg) -> ModelShape:
    h = cfg.num_attention_heads
    return ModelShape("wan", h, h, cfg.num_layers)


def _validate(cfg, world: int) -> list[str]:
    """Wan's own config rules: video clip geometry the VAE and patching accept."""
    return video_clip_errors(cfg, "wan", "the VAE")


def _tiny(task: str):
    def write(outdir, seed: int = 0, original_layout: bool = False, overwrite: bool = False, **_):
        from mmkit.models.wan.tiny import create_tiny_wan

        return create_tiny_wan(
            outdir, task=task, seed=seed, original_layout=original_layout, overwrite=overwrite
        )

    return write


def _tiny_shapes(outdir, seed: int = 0, overwrite: bool = False, **_):
    from mmkit.models.wan.shapes import create_shapes_wan

    return create_shapes_wan(outdir, seed=seed, overwrite=overwrite)


def _estimator_stats(cfg, net) -> dict:
    """Sizes the memory estimator needs (`mmkit/tools/memory.py:ModelStats`)."""
    d = dict(hidden=cfg.dim, ffn=cfg.ffn_dim, heads=cfg.num_attention_heads)
    d.update(kv_heads=cfg.num_attention_heads, head_dim=cfg.attention_head_dim, layers=cfg.num_layers)
    d["ctx_tokens"] = cfg.text_len + (257 if cfg.image_dim is not None else 0)  # CLIP ViT-H: 257
    return d


_BLOCK = r"blocks\.\d+\."

SPEC = FamilySpec(
    name="wan",
    title="Wan2.1",
    tasks=("t2v", "i2v"),
    flavors=_flavors,
    detect=detect,
    config_from_hf=_config_from_hf,
    build_model=_build,
    model_shape=_shape,
    tp_rules=(
        # colwise: q/k/v and the first MLP matrix split their output features (whole heads per rank)
        TPRule(_BLOCK + r"(attn\.(q|k|v)|cross\.(q|k|v|k_img|v_img)|mlp\.fc1)", "colwise"),
        # rowwise: output projections split their input features; their bias is added once (replicated)
        TPRule(_BLOCK + r"(attn\.out|cross\.out|mlp\.fc2)", "rowwise"),
        # Wan's q/k RMSNorm spans all heads, so its weight follows the heads of q/k
        TPRule(_BLOCK + r"(attn\.norm_(q|k)|cross\.norm_(q|k|k_img))", "head_norm"),
    ),
    pp_rule=PPRule(
        r"blocks\.(\d+)\.",
        first=("patch_embed.", "text_embed.", "time_embed.", "time_proj.", "image_embed."),
        last=("head.",),
    ),
    hf_layouts=("diffusers", "original"),
    converter="WanConverter",
    tiny={"wan-t2v": _tiny("t2v"), "wan-i2v": _tiny("i2v"), "wan-shapes": _tiny_shapes},
    estimator=EstimatorInfo(
        kind="dit",
        names={"wan2.1-1.3b": "1.3B", "wan2.1-14b": "14B", "wan2.1-i2v-14b": "i2v-14B-720P"},
        stats=_estimator_stats,
        block=r"blocks\.\d+\.",
        last=r"head\.",
    ),
    validate=_validate,
    hf="mmkit.models.wan.hf:ADAPTER",
    vae_convert="mmkit.convert.vae:convert_vae",
    plan="mmkit.parallel.plans.wan:WanPlan",
    stages="mmkit.parallel.plans.wan_stages:WanStage",
    task="mmkit.train.tasks.wan:build_task",
    data="mmkit.train.tasks.wan:build_data",
    pipeline="mmkit.infer.t2v:load_wan_pipeline",
    loss="mmkit.train.losses:mse_sum",
)
