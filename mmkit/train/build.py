"""Config -> task (model + frozen encoders) and data pipeline. One function per family."""

from __future__ import annotations

import torch

from mmkit.config import Config


def mm_checkpoint(path: str | None):
    """The `MMCheckpoint` (full state, config, HF side files) if `path` is an mmkit checkpoint (from
    `mmkit convert hf-to-mm` / `resplit`, pre-split or not, or a training run), else None (an HF folder).

    Example: `mm_checkpoint("ckpt/wan_tp2pp2")`.
    """
    from pathlib import Path

    p = Path(path) if path else None
    if p is None or not p.is_dir():
        return None
    marks = ("layout.json", "train_state.json", "latest")
    if not any((d / f).is_file() for d in (p, p.parent) for f in marks[:1]) and not any(
        (p / f).is_file() for f in marks[1:]
    ):
        return None
    from mmkit.checkpoint.mm import read_mm

    return read_mm(p)


def build_task(cfg: Config, device: torch.device):
    """The training task of `cfg.model.family`. Example: `task = build_task(cfg, torch.device("cpu"))`."""
    if cfg.model.family == "wan":
        return _wan_task(cfg, device)
    if cfg.model.family == "qwen2_5_vl":
        return _qwen_task(cfg, device)
    raise ValueError(f"model.family={cfg.model.family!r}: the trainer supports 'wan' and 'qwen2_5_vl'")


def _wan_task(cfg: Config, device: torch.device):
    from mmkit.infer.pipelines import load_pipeline
    from mmkit.train.tasks.wan import WanTask, WanTaskConfig

    if not cfg.model.init_from:
        raise ValueError(
            "model.init_from: Wan training needs a diffusers-layout folder for its frozen VAE and umT5 "
            "(and the DiT to start from); e.g. `mmkit create-tiny wan-t2v DIR` then --model.init_from DIR"
        )
    mm = mm_checkpoint(cfg.model.init_from)  # an mmkit checkpoint (converted, pre-split or trained)
    src = str(mm.source) if mm is not None else cfg.model.init_from
    pipe = load_pipeline(src, task=cfg.model.task, device=str(device), dtype=cfg.model.dtype)
    dit = pipe.transformer
    if mm is not None:
        dit.load_state_dict(mm.state)
    dit.to_dtype(torch.float32)  # trainable weights are the fp32 master copy
    for p in dit.parameters():
        p.requires_grad_(True)
    for m in (pipe.vae, pipe.text_encoder, getattr(pipe, "image_encoder", None)):
        if m is not None:
            m.requires_grad_(False).eval()
    tcfg = WanTaskConfig(
        task=cfg.model.task,
        loss=cfg.train.loss,
        timestep_sampling=cfg.train.timestep_sampling,
        flow_shift=cfg.train.flow_shift,
        text_dropout=cfg.data.text_dropout,
    )
    return WanTask(dit, pipe, tcfg)


def build_data(cfg: Config, task, rank: int = 0, world_size: int = 1):
    """(dataset, resumable sampler, DataLoader) for the task's family."""
    from torch.utils.data import DataLoader

    from mmkit.data.video import ResumableSampler, VideoDataset, collate_videos

    if cfg.model.family == "qwen2_5_vl":
        return _qwen_data(cfg, task, rank, world_size)
    if cfg.data.precomputed_dir:
        from mmkit.data.features import FeatureDataset, collate_features

        ds = FeatureDataset(cfg.data.precomputed_dir, cfg.data.max_samples)
        if ds.task != cfg.model.task:
            raise ValueError(
                f"data.precomputed_dir holds {ds.task} features but model.task={cfg.model.task!r}"
            )
        sampler = ResumableSampler(len(ds), seed=cfg.train.seed, rank=rank, world_size=world_size)
        loader = DataLoader(
            ds, batch_size=cfg.train.micro_batch, sampler=sampler, collate_fn=collate_features,
            num_workers=cfg.data.num_workers,
        )  # fmt: skip
        return ds, sampler, loader
    ds = VideoDataset(
        cfg.data.paths,
        num_frames=cfg.data.num_frames,
        height=cfg.data.height,
        width=cfg.data.width,
        train_fps=cfg.data.train_fps,
        max_samples=cfg.data.max_samples,
        seed=cfg.train.seed,
        progress=False,
    )
    sampler = ResumableSampler(len(ds), seed=cfg.train.seed, rank=rank, world_size=world_size)
    loader = DataLoader(
        ds,
        batch_size=cfg.train.micro_batch,
        sampler=sampler,
        collate_fn=collate_videos,
        num_workers=cfg.data.num_workers,
    )
    return ds, sampler, loader


# ---------------------------------------------------------------------------------------------------
# Qwen2.5-VL SFT


def _qwen_task(cfg: Config, device: torch.device):
    """VLMSFTTask over a model loaded from `model.init_from` (transformers folder) or, for flavor "tiny"
    only, a random tiny model with a freshly built tiny tokenizer."""
    from mmkit.models.qwen2_5_vl.processor import Qwen2_5_VLProcessor
    from mmkit.train.tasks.qwen2_5_vl import VLMSFTTask, VLMTaskConfig

    m = cfg.model
    mm = mm_checkpoint(m.init_from) if m.init_from else None
    if mm is not None:  # an mmkit checkpoint: config + state from it, tokenizer from its HF side files
        from mmkit.models.qwen2_5_vl.model import Qwen2_5_VLModel

        model = Qwen2_5_VLModel(mm.model_cfg)
        missing, unexpected = model.load_state_dict(mm.state, strict=False)
        tied = {"language.lm_head.weight"} if mm.model_cfg.tie_word_embeddings else set()
        if set(missing) - tied or unexpected:
            raise ValueError(
                f"model.init_from={m.init_from}: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        model.to(device)
        processor = Qwen2_5_VLProcessor.from_pretrained(str(mm.hf_files))
    elif m.init_from:
        from mmkit.models.qwen2_5_vl.load import load_model

        model = load_model(m.init_from, device=str(device), dtype="fp32")  # fp32 master weights
        processor = Qwen2_5_VLProcessor.from_pretrained(m.init_from)
    elif m.flavor == "tiny":
        import tempfile

        from mmkit.models.qwen2_5_vl.model import Qwen2_5_VLModel
        from mmkit.models.qwen2_5_vl.tiny import perturbed_init, tiny_config
        from mmkit.models.qwen2_5_vl.tokenizer import build_tiny_tokenizer

        with tempfile.TemporaryDirectory(prefix="mmkit-tiny-qwen-tokenizer-") as tok_dir:
            model = Qwen2_5_VLModel(tiny_config(build_tiny_tokenizer(tok_dir)))
            processor = Qwen2_5_VLProcessor.from_pretrained(tok_dir)  # read fully into memory
        perturbed_init(model, seed=cfg.train.seed)
        model.to(device)
    else:
        raise ValueError(
            f"model.flavor={m.flavor!r} without model.init_from: Qwen2.5-VL SFT needs a transformers folder "
            "(weights + tokenizer), e.g. --model.init_from /path/Qwen2.5-VL-7B-Instruct; only flavor 'tiny' "
            "can start from random weights"
        )
    model.train()
    tcfg = VLMTaskConfig(
        freeze_vision=m.freeze_vision, freeze_merger=m.freeze_merger, freeze_llm=m.freeze_llm
    )
    return VLMSFTTask(model, tcfg, processor=processor)


def _qwen_data(cfg: Config, task, rank: int = 0, world_size: int = 1):
    """(SFTDataset, ResumableSampler, DataLoader) with the padding or the packing collator."""
    from torch.utils.data import DataLoader

    from mmkit.data.sft import PackingCollator, SFTCollator, SFTDataset
    from mmkit.data.video import ResumableSampler

    d = cfg.data
    if not d.paths:
        raise ValueError(
            "data.paths: give SFT JSON/JSONL files, e.g. --data.paths outputs/shapes_qa/qa.json "
            "(`mmkit data synth shapes-qa outputs/shapes_qa` writes a synthetic set)"
        )
    ds = SFTDataset(
        d.paths,
        task.processor,
        cutoff_len=d.cutoff_len,
        max_samples=d.max_samples,
        media_root=d.media_root,
        tokens_per_second=task.model.cfg.vision.tokens_per_second,
        progress=False,
    )
    pad = ds.pad_token_id
    collate = PackingCollator(pad, max_len=d.cutoff_len) if d.packing else SFTCollator(pad)
    sampler = ResumableSampler(len(ds), seed=cfg.train.seed, rank=rank, world_size=world_size)
    loader = DataLoader(
        ds, batch_size=cfg.train.micro_batch, sampler=sampler, collate_fn=collate, num_workers=d.num_workers
    )
    return ds, sampler, loader
