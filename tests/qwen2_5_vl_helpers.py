"""Shared helpers for Qwen2.5-VL model/engine tests: prompts with expanded vision blocks, fake pixels."""

from __future__ import annotations

import torch

PATCH_DIM = 3 * 2 * 14 * 14  # C * temporal_patch * patch * patch


def vision_block(cfg, grid, video: bool = False) -> list[int]:
    """<|vision_start|> + t*h*w/4 placeholder tokens + <|vision_end|> for one image/video grid."""
    t, h, w = grid
    tok = cfg.video_token_id if video else cfg.image_token_id
    return [cfg.vision_start_token_id] + [tok] * (t * h * w // 4) + [cfg.vision_end_token_id]


def prompt(cfg, gen: torch.Generator, pieces) -> list[int]:
    """Token ids from pieces: an int n = n random text tokens, ("image"|"video", grid) = a vision block."""
    ids = []
    for p in pieces:
        if isinstance(p, int):
            ids += torch.randint(0, 300, (p,), generator=gen).tolist()
        else:
            ids += vision_block(cfg, p[1], video=p[0] == "video")
    return ids


def pixels(grids, gen: torch.Generator) -> torch.Tensor:
    """Random normalised patches (sum t*h*w, 1176) for the given grids."""
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, PATCH_DIM, generator=gen)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) left-padded ids and attention mask."""
    n = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (n - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows])
    return ids, mask
