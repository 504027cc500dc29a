"""Multimodal RoPE (M-RoPE) position ids for Qwen2.5-VL: one (t, h, w) triple per token.

Text tokens get the same 1-D position on all three axes. The tokens of an image or video get
(time, row, column) indices on the merged (2x2) patch grid, offset by the position where the
vision block starts; the text after a vision block resumes at (largest vision position + 1).
Video time is scaled to absolute seconds: temporal index = floor(k * second_per_grid_t *
tokens_per_second) for the k-th temporal grid step.

This file holds only index arithmetic (no weights); the data pipeline imports it to precompute
positions, and the model calls it when no `position_ids` are passed.

Note on the reference: transformers 5.x (>= 5.3) resumes text after a *video* at
start + max(h, w) / merge instead of (largest vision position + 1), which collapses the temporal
axis (huggingface/transformers#45381). We follow the original Qwen2.5-VL rule (max + 1); the two agree
for every image and for videos whose scaled time stays below max(h, w) / merge.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Public Qwen2.5-VL config values (Qwen/Qwen2.5-VL-*-Instruct config.json).
IMAGE_TOKEN_ID = 151655
VIDEO_TOKEN_ID = 151656


def token_type_ids(
    input_ids: torch.Tensor, image_token_id: int = IMAGE_TOKEN_ID, video_token_id: int = VIDEO_TOKEN_ID
) -> torch.Tensor:
    """0 for text, 1 for image placeholders, 2 for video placeholders; same shape as `input_ids`.

    This is transformers' `mm_token_type_ids`. Example: `token_type_ids(batch["input_ids"])`.
    """
    types = torch.zeros_like(input_ids, dtype=torch.int32)
    types[input_ids == image_token_id] = 1
    types[input_ids == video_token_id] = 2
    return types


def _vision_positions(start: int, grid_thw: Sequence[int], merge: int, interval: torch.Tensor | None):
    """(3, t*h*w/merge^2) positions of one image/video starting at text position `start`."""
    t, h, w = int(grid_thw[0]), int(grid_thw[1]) // merge, int(grid_thw[2]) // merge
    if interval is None:  # image: no time axis
        t_idx = torch.zeros(t, dtype=torch.long)
    else:  # video: float time (seconds * tokens/s) truncated per grid step, as in the reference
        t_idx = (torch.arange(t, dtype=torch.float32) * interval).long()
    tt = t_idx.view(t, 1, 1).expand(t, h, w)
    hh = torch.arange(h).view(1, h, 1).expand(t, h, w)
    ww = torch.arange(w).view(1, 1, w).expand(t, h, w)
    return torch.stack([tt, hh, ww]).reshape(3, -1) + start


def get_rope_index(
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts: torch.Tensor | Sequence[float] | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    image_token_id: int = IMAGE_TOKEN_ID,
    video_token_id: int = VIDEO_TOKEN_ID,
    spatial_merge_size: int = 2,
    tokens_per_second: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE position ids for a (left- or right-padded) batch of token sequences.

    Args:
        input_ids: (B, L) token ids, with each image/video already expanded to
            t*h*w / spatial_merge_size**2 placeholder tokens (`image_token_id` / `video_token_id`).
        image_grid_thw: (num_images, 3) patch grids (t, h, w) of all images of the batch, in order
            of appearance (row 0 first, then row 1, ...). None if there are no images.
        video_grid_thw: (num_videos, 3) likewise for videos.
        second_per_grid_ts: (num_videos,) seconds covered by one temporal grid step of each video
            (temporal_patch_size / sampled fps); defaults to 1.0 per video.
        attention_mask: (B, L) 1 for real tokens, 0 for padding; padding gets position 0 and is
            skipped when counting. None means no padding.
        image_token_id, video_token_id, spatial_merge_size, tokens_per_second: from config.json
            (`image_token_id`, `video_token_id`, `vision_config.spatial_merge_size`,
            `vision_config.tokens_per_second`).

    Returns:
        position_ids: (3, B, L) long, axes (time, height, width).
        rope_deltas: (B, 1) long, (largest position + 1) - number of real tokens; the position of
            the n-th real token generated after the prompt (n = 0, 1, ...) is
            `num_real_prompt_tokens + n + rope_deltas`.

    Raises ValueError naming the sample when its placeholder tokens do not match the grids.

    Example:
        >>> pos, deltas = get_rope_index(ids, image_grid_thw=torch.tensor([[1, 28, 28]]),
        ...                              attention_mask=mask, tokens_per_second=2)
    """
    if input_ids.ndim != 2:
        raise ValueError(
            f"get_rope_index: input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}"
        )
    batch, seq_len = input_ids.shape
    merge = int(spatial_merge_size)
    grids = {
        1: [] if image_grid_thw is None else [tuple(int(v) for v in g) for g in image_grid_thw.tolist()],
        2: [] if video_grid_thw is None else [tuple(int(v) for v in g) for g in video_grid_thw.tolist()],
    }
    n_videos = len(grids[2])
    if second_per_grid_ts is None:
        seconds = torch.ones(n_videos, dtype=torch.float32)
    else:
        seconds = torch.as_tensor(second_per_grid_ts, dtype=torch.float32).reshape(-1).cpu()
        if seconds.numel() != n_videos:
            raise ValueError(
                f"get_rope_index: second_per_grid_ts has {seconds.numel()} entries but there are {n_videos} videos"
            )
    used = {1: 0, 2: 0}
    names = {1: "image", 2: "video"}

    ids_cpu = input_ids.detach().cpu()
    mask_cpu = None if attention_mask is None else attention_mask.detach().cpu().bool()
    position_ids = torch.zeros(3, batch, seq_len, dtype=torch.long)
    deltas = torch.zeros(batch, 1, dtype=torch.long)
    for b in range(batch):
        ids = ids_cpu[b] if mask_cpu is None else ids_cpu[b][mask_cpu[b]]
        types = token_type_ids(ids, image_token_id, video_token_id)
        # Runs of equal token type: boundaries where the type changes.
        change = torch.nonzero(types[1:] != types[:-1]).flatten() + 1
        bounds = [0, *change.tolist(), len(ids)]
        pieces, pos = [], 0
        for s, e in zip(bounds[:-1], bounds[1:]):
            if e <= s:
                continue
            kind = int(types[s])
            if kind == 0:
                pieces.append(torch.arange(e - s).view(1, -1).expand(3, -1) + pos)
                pos += e - s
                continue
            left = e - s  # a run may hold several back-to-back images/videos
            while left > 0:
                k = used[kind]
                if k >= len(grids[kind]):
                    raise ValueError(
                        f"sample {b}: more {names[kind]} placeholder tokens than {names[kind]}_grid_thw entries "
                        f"({len(grids[kind])} {names[kind]}s given); the prompt and the {names[kind]} list disagree"
                    )
                g = grids[kind][k]
                n = g[0] * g[1] * g[2] // merge**2
                if n > left:
                    raise ValueError(
                        f"sample {b}: {names[kind]} {k} (grid_thw {list(g)}) needs {n} placeholder tokens but only "
                        f"{left} are left in its block; re-run the processor so that tokens match the features"
                    )
                interval = None if kind == 1 else seconds[k] * tokens_per_second
                vis = _vision_positions(pos, g, merge, interval)
                pieces.append(vis)
                pos = int(vis.max()) + 1
                used[kind] += 1
                left -= n
        llm = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)
        if mask_cpu is None:
            position_ids[:, b] = llm
        else:
            position_ids[:, b, mask_cpu[b]] = llm
        deltas[b, 0] = pos - len(ids)
    for kind in (1, 2):
        if used[kind] != len(grids[kind]):
            raise ValueError(
                f"get_rope_index: {len(grids[kind])} {names[kind]}s given but the batch has placeholder tokens "
                f"for only {used[kind]}; every {names[kind]} needs its expanded <|{names[kind]}_pad|> block"
            )
    return position_ids.to(input_ids.device), deltas.to(input_ids.device)
