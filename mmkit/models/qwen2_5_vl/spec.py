"""The Qwen2.5-VL family as the registry sees it (`mmkit.registry`): detection, configs, the tensor- and
pipeline-parallel split declared once, and where its plan, stages, task and engine live."""

from __future__ import annotations

from pathlib import Path

from mmkit.models.common.hf_io import read_json
from mmkit.registry import EstimatorInfo, FamilySpec, ModelShape, PPRule, TPRule


def detect(folder: Path) -> bool:
    """A transformers Qwen2.5-VL folder: config.json with model_type "qwen2_5_vl"."""
    if not (folder / "config.json").is_file() or (folder / "model_index.json").is_file():
        return False
    d = read_json(folder / "config.json")
    return d.get("model_type") == "qwen2_5_vl" or "Qwen2_5_VLForConditionalGeneration" in (
        d.get("architectures") or []
    )


def _flavors():
    """Named public sizes (plus "tiny", the test model) -> a factory of a fresh config."""
    from mmkit.models.qwen2_5_vl.config import FLAVORS
    from mmkit.models.qwen2_5_vl.tiny import tiny_config

    return {"tiny": tiny_config, **FLAVORS}


def _config_from_hf(d: dict):
    from mmkit.models.qwen2_5_vl.config import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig.from_hf_dict(d)


def _build(cfg):
    from mmkit.models.qwen2_5_vl.model import Qwen2_5_VLModel

    return Qwen2_5_VLModel(cfg)


def _shape(cfg) -> ModelShape:
    t = cfg.text
    return ModelShape(
        "qwen2_5_vl", t.num_attention_heads, t.num_key_value_heads, t.num_hidden_layers, cfg.vision.depth
    )


def _validate(cfg, world: int) -> list[str]:
    """Qwen2.5-VL's own config rules."""
    if world > 1 and not cfg.data.packing:
        return [
            f"data.packing={cfg.data.packing!r}: multi-process Qwen2.5-VL training runs on packed rows (no "
            "padding is computed, and context parallelism needs sample boundaries); set data.packing=true"
        ]
    return []


def _tiny_shapes(outdir, seed: int = 0, overwrite: bool = False, **_):
    from mmkit.models.qwen2_5_vl.shapes import create_qwen_shapes

    return create_qwen_shapes(outdir, seed=seed, overwrite=overwrite)


def _tiny(outdir, seed: int = 0, overwrite: bool = False, **_):
    from mmkit.models.qwen2_5_vl.tiny import create_tiny_qwen2_5_vl

    return create_tiny_qwen2_5_vl(outdir, seed=seed, overwrite=overwrite)


def _estimator_stats(cfg, net) -> dict:
    """Sizes the memory estimator needs (`mmkit/tools/memory.py:ModelStats`)."""
    t, v = cfg.text, cfg.vision
    d = dict(hidden=t.hidden_size, ffn=t.intermediate_size, heads=t.num_attention_heads)
    d.update(kv_heads=t.num_key_value_heads, head_dim=t.head_dim, layers=t.num_hidden_layers)
    d.update(vocab=t.vocab_size, vit_layers=v.depth, vit_hidden=v.hidden_size)
    d.update(vit_ffn=v.intermediate_size, vit_heads=v.num_heads)
    d["vit_layer_params"] = sum(p.numel() for p in net.visual.blocks[0].parameters())
    return d


_LAYER = r"language\.layers\.\d+\."

SPEC = FamilySpec(
    name="qwen2_5_vl",
    title="Qwen2.5-VL",
    tasks=("sft",),
    flavors=_flavors,
    detect=detect,
    config_from_hf=_config_from_hf,
    build_model=_build,
    model_shape=_shape,
    tp_rules=(
        TPRule(_LAYER + r"attn\.(q|k|v)_proj", "colwise"),
        TPRule(_LAYER + r"attn\.o_proj", "rowwise"),
        TPRule(_LAYER + r"mlp\.(gate|up)_proj", "colwise"),
        TPRule(_LAYER + r"mlp\.down_proj", "rowwise"),
        # vocabulary-parallel embedding and LM head (the vision tower stays replicated)
        TPRule(r"language\.(embed_tokens|lm_head)", "vocab"),
    ),
    pp_rule=PPRule(
        r"language\.layers\.(\d+)\.",
        # the whole vision tower (patch embed, blocks, merger) sits on stage 0, with the token embedding
        first=("visual.", "language.embed_tokens."),
        last=("language.norm.", "language.lm_head."),
    ),
    hf_layouts=("transformers",),
    converter="Qwen2_5_VLConverter",
    packed=True,
    tiny={"qwen2_5_vl": _tiny, "qwen-shapes": _tiny_shapes},
    estimator=EstimatorInfo(
        kind="vlm",
        names={f"qwen2.5-vl-{n.lower()}": n for n in ("3B", "7B", "32B", "72B")},
        stats=_estimator_stats,
        block=_LAYER,
        last=r"language\.(norm|lm_head)\.",
    ),
    validate=_validate,
    hf="mmkit.models.qwen2_5_vl.hf:ADAPTER",
    plan="mmkit.parallel.plans.qwen2_5_vl:Qwen2_5_VLPlan",
    stages="mmkit.parallel.plans.qwen2_5_vl_stages:QwenStage",
    task="mmkit.train.tasks.qwen2_5_vl:build_task",
    data="mmkit.train.tasks.qwen2_5_vl:build_data",
    pipeline="mmkit.infer.qwen2_5_vl:load_chat",
    loss="mmkit.train.losses:supervised_ce_sum",
)
