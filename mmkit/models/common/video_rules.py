"""Config rules every video DiT family shares (each family's spec `_validate` adds its own)."""

from __future__ import annotations


def video_clip_errors(cfg, family: str, vae: str) -> list[str]:
    """Errors for a training config of a video family whose VAE strides time by 4 and space by 8 and
    whose DiT patches are 2 x 2: the clip geometry, the text dropout, and the VLM-only freeze flags.

    Example: `errs = video_clip_errors(cfg, "wan", "the VAE")`.
    """
    m, d = cfg.model, cfg.data
    errs = []
    if any((m.freeze_vision, m.freeze_merger, m.freeze_llm)):
        errs.append(
            f"model.freeze_vision/freeze_merger/freeze_llm: apply to qwen2_5_vl only; remove them for {family}"
        )
    if d.num_frames < 1 or (d.num_frames - 1) % 4:
        k = max(0, round((d.num_frames - 1) / 4))
        errs.append(
            f"data.num_frames={d.num_frames!r}: must be 4k+1 ({vae}'s temporal stride), e.g. {4 * k + 1} or {4 * k + 5}"
        )
    for name in ("height", "width"):
        v = getattr(d, name)
        if v < 16 or v % 16:
            errs.append(
                f"data.{name}={v!r}: must be a positive multiple of 16 (VAE stride 8 x patch 2), e.g. {max(16, v // 16 * 16)}"
            )
    if d.train_fps <= 0:
        errs.append(f"data.train_fps={d.train_fps!r}: must be > 0 frames per second")
    if not 0.0 <= d.text_dropout <= 1.0:
        errs.append(f"data.text_dropout={d.text_dropout!r}: is a probability; use a value in [0, 1]")
    return errs
