"""The OpenSoraPlan 1.3 family as the registry sees it (`mmkit.registry`): detection, configs, the tensor-
and pipeline-parallel split declared once, and where its plan, stages, task and pipeline live."""

from __future__ import annotations

from pathlib import Path

from mmkit.models.common.video_rules import video_clip_errors
from mmkit.registry import EstimatorInfo, FamilySpec, ModelShape, PPRule, TPRule


def detect(folder: Path) -> bool:
    """A release DiT folder (config.json `_class_name` OpenSoraT2V_v1_3 / OpenSoraInpaint_v1_3), or a
    pipeline folder (model_index.json) whose `transformer/config.json` is one."""
    from mmkit.models.opensoraplan.hf import is_osp_dit

    if (folder / "model_index.json").is_file():
        return is_osp_dit(folder / "transformer")
    return is_osp_dit(folder)


def _flavors():
    """Named public sizes (plus "tiny" / "tiny-i2v", the test models) -> a factory of a fresh config."""
    import dataclasses

    from mmkit.models.opensoraplan.config import FLAVORS, TINY

    table = {**TINY, **FLAVORS}
    return {name: (lambda c=cfg: dataclasses.replace(c, extra=dict(c.extra))) for name, cfg in table.items()}


def _config_from_hf(d: dict):
    from mmkit.models.opensoraplan.config import OSPConfig

    return OSPConfig.from_dict(d)


def _build(cfg):
    from mmkit.models.opensoraplan.model import OpenSoraPlanTransformer

    return OpenSoraPlanTransformer(cfg)


def _shape(cfg) -> ModelShape:
    h = cfg.num_attention_heads
    return ModelShape("opensoraplan", h, h, cfg.num_layers)


def _validate(cfg, world: int) -> list[str]:
    """OpenSoraPlan's own config rules: clip geometry the WF-VAE (4x8x8) and the 2x2 patches accept."""
    d = cfg.data
    errs = video_clip_errors(cfg, "opensoraplan", "the WF-VAE")
    if d.mask_type_ratios is not None and (
        len(d.mask_type_ratios) != 6 or min(d.mask_type_ratios) < 0 or not sum(d.mask_type_ratios)
    ):
        errs.append(
            f"data.mask_type_ratios={d.mask_type_ratios!r}: give 6 non-negative weights, not all zero, for "
            "[t2iv, i2v, transition, continuation, clear, random_temporal]"
        )
    if cfg.train.loss != "v_pred_zero_snr":
        errs.append(f"train.loss={cfg.train.loss!r}: OpenSoraPlan 1.3 trains with 'v_pred_zero_snr'")
    return errs


def _estimator_stats(cfg, net) -> dict:
    """Sizes the memory estimator needs (`mmkit/tools/memory.py:ModelStats`)."""
    d = dict(hidden=cfg.hidden, ffn=4 * cfg.hidden, heads=cfg.num_attention_heads)
    d.update(kv_heads=cfg.num_attention_heads, head_dim=cfg.attention_head_dim, layers=cfg.num_layers)
    d["ctx_tokens"] = cfg.text_len
    return d


def _tiny(task: str):
    def write(outdir, seed: int = 0, overwrite: bool = False, **options):
        from mmkit.models.opensoraplan.tiny import create_tiny_osp

        return create_tiny_osp(outdir, task=task, seed=seed, overwrite=overwrite)

    return write


_BLOCK = r"blocks\.\d+\."

SPEC = FamilySpec(
    name="opensoraplan",
    title="OpenSoraPlan 1.3",
    tasks=("t2v", "i2v"),
    flavors=_flavors,
    detect=detect,
    config_from_hf=_config_from_hf,
    build_model=_build,
    model_shape=_shape,
    tp_rules=(
        # colwise: q/k/v and the first MLP matrix split their output features (whole heads per rank)
        TPRule(_BLOCK + r"(attn\.(q|k|v)|cross\.(q|k|v)|mlp\.fc1)", "colwise"),
        # rowwise: output projections split their input features; their bias is added once (replicated)
        TPRule(_BLOCK + r"(attn\.out|cross\.out|mlp\.fc2)", "rowwise"),
    ),
    pp_rule=PPRule(
        r"blocks\.(\d+)\.",
        first=("patch_embed.", "masked_embed.", "mask_embed.", "text_embed.", "time_embed.", "time_proj."),
        last=("head.",),
    ),
    hf_layouts=("diffusers",),
    converter="OpenSoraPlanConverter",
    plan="mmkit.parallel.plans.opensoraplan:OpenSoraPlanPlan",
    stages="mmkit.parallel.plans.opensoraplan_stages:OpenSoraPlanStage",
    task="mmkit.train.tasks.opensoraplan:build_task",
    data="mmkit.train.tasks.opensoraplan:build_data",
    loss="mmkit.train.losses:mse_sum",
    estimator=EstimatorInfo(
        kind="dit",
        names={"opensoraplan-v1.3-2b": "v1.3-2B", "opensoraplan-v1.3-2b-i2v": "v1.3-2B-i2v"},
        stats=_estimator_stats,
        block=_BLOCK,
        last=r"head\.",
    ),
    validate=_validate,
    hf="mmkit.models.opensoraplan.hf:ADAPTER",
    pipeline="mmkit.infer.opensoraplan:load_opensoraplan_pipeline",
    vae_convert="mmkit.convert.opensoraplan_vae:convert_vae",
    tiny={"osp-t2v": _tiny("t2v"), "osp-i2v": _tiny("i2v")},
)
