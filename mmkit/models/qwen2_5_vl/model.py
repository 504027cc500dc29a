"""Qwen2.5-VL: vision encoder + Qwen2 decoder, joined by placing image/video features at their
placeholder tokens.

Forward stages: (1) encode all images and videos in one packed vision pass, (2) embed the tokens and
scatter the features into the placeholder positions, (3) M-RoPE positions (computed here unless given),
(4) decoder, (5) logits for the positions asked for only.
"""

from __future__ import annotations

import torch
from torch import nn

from mmkit.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from mmkit.models.qwen2_5_vl.language import TextModel
from mmkit.models.qwen2_5_vl.rope import get_rope_index
from mmkit.models.qwen2_5_vl.vision import VisionTransformer


def padding_mask(attention_mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """Bool (B, 1, q_len, K) attention mask: causal over the last q_len of K keys, minus padded keys.

    `attention_mask` is (B, K), 1 = real token. Padded queries still see themselves, so no softmax
    row is empty (an all-masked row would give NaN, and NaN times a zero weight is still NaN).
    Example: `padding_mask(torch.tensor([[0, 1, 1]]), 3)`.
    """
    k_len = attention_mask.shape[-1]
    keys = torch.arange(k_len, device=attention_mask.device)
    queries = torch.arange(k_len - q_len, k_len, device=attention_mask.device)
    causal = keys[None, :] <= queries[:, None]  # (q, K)
    mask = causal[None] & attention_mask.bool()[:, None, :]  # (B, q, K)
    mask |= keys[None, None, :] == queries[None, :, None]
    return mask[:, None]


class Qwen2_5_VLModel(nn.Module):
    """The whole model; mirrors transformers' `Qwen2_5_VLForConditionalGeneration` (module names differ,
    see hf.py).

    Example:
        >>> model = Qwen2_5_VLModel(Qwen2_5_VLConfig.from_pretrained("tiny"))
        >>> logits = model(input_ids, pixel_values=pv, image_grid_thw=grid, logits_to_keep=1)
    """

    # ModuleLists of identical blocks (activation checkpointing, FSDP units), decoder first
    _repeated_blocks = ("language.layers", "visual.blocks")

    def __init__(self, cfg: Qwen2_5_VLConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTransformer(cfg.vision)
        self.language = TextModel(cfg.text, tie_word_embeddings=cfg.tie_word_embeddings)

    def rope_index(
        self,
        input_ids,
        image_grid_thw=None,
        video_grid_thw=None,
        second_per_grid_ts=None,
        attention_mask=None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`rope.get_rope_index` with this model's token ids, merge size and tokens_per_second."""
        return get_rope_index(
            input_ids,
            image_grid_thw,
            video_grid_thw,
            second_per_grid_ts,
            attention_mask,
            image_token_id=self.cfg.image_token_id,
            video_token_id=self.cfg.video_token_id,
            spatial_merge_size=self.cfg.vision.spatial_merge_size,
            tokens_per_second=self.cfg.vision.tokens_per_second,
        )

    # ---- the inference engine's interface (`mmkit.infer.vlm.VLMModel`) -------------------------
    media_keys = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")

    def kv_cache_spec(self) -> dict:
        """What a decoder KV cache holds: layers, kv_heads, head_dim, dtype, device; and max_positions,
        the context the engine caps prompt + new tokens to (not a `KVCache` argument).

        Example: `KVCache(batch=1, max_len=512, **model.kv_cache_spec())`.
        """
        w, t = self.language.embed_tokens.weight, self.cfg.text
        return {
            "layers": t.num_hidden_layers,
            "kv_heads": t.num_key_value_heads,
            "head_dim": t.head_dim,
            "dtype": w.dtype,
            "device": w.device,
            "max_positions": t.max_position_embeddings,
        }

    def media_inputs(self, inputs: dict) -> dict:
        """The processor's vision entries (pixels and grids moved to this model's device; absent = None)
        plus `second_per_grid_ts` as given. Example: `media = model.media_inputs(processor(...))`."""
        dev = self.language.embed_tokens.weight.device
        media = {k: inputs.get(k) for k in self.media_keys}
        media = {k: (v.to(dev) if v is not None else None) for k, v in media.items()}
        media["second_per_grid_ts"] = inputs.get("second_per_grid_ts")
        return media

    def rope_positions(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, media: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt positions (3, B, L) for `prefill`, and (B,) the position of the first new token
        (text positions continue from the largest prompt position). Example:
        `pos, nxt = model.rope_positions(ids, mask, model.media_inputs(inputs))`."""
        positions, _ = self.rope_index(
            input_ids,
            media["image_grid_thw"],
            media["video_grid_thw"],
            media["second_per_grid_ts"],
            attention_mask,
        )
        return positions, positions.amax(dim=(0, 2)) + 1

    def prefill(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        media: dict,
        cache,
        attention_mask: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Run the (B, L) prompt with its vision inputs, filling `cache`; logits (B, vocab) of the last
        position, or its final-normed hidden state (B, D) with `return_hidden`.

        `attention_mask` (B, L), 1 = real token, for a left-padded batch; None = no padding.
        Example: `logits = model.prefill(ids, pos, media, cache)`.
        """
        embeds = self.embed(
            input_ids,
            media["pixel_values"],
            media["image_grid_thw"],
            media["pixel_values_videos"],
            media["video_grid_thw"],
        )
        mask = None if attention_mask is None else padding_mask(attention_mask, input_ids.shape[1])
        out = self.language(embeds, positions, mask, cache, logits_to_keep=1, return_hidden=return_hidden)
        return out[:, -1]

    def decode_step(
        self,
        tokens: torch.Tensor,
        position: torch.Tensor,
        cache,
        key_mask: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """One new token per row: `tokens` (B,) at text `position` (B,); logits (B, vocab) (or hidden (B, D)).

        `key_mask` (B, K) bool: which of the K cache slots (this token's included) each row may attend
        to; None = all. Example: `logits = model.decode_step(tok, nxt + step, cache)`.
        """
        b = tokens.shape[0]
        pos = position.view(1, b, 1).expand(3, b, 1)  # text positions: the same on all three axes
        x = self.language.embed_tokens(tokens.view(b, 1))  # (B, 1, D)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, K) view
        return self.language(x, pos, mask, cache, logits_to_keep=1, return_hidden=return_hidden)[:, -1]

    def output_head(self) -> nn.Linear:
        """The (vocab, D) output layer applied to `return_hidden` states."""
        return self.language.lm_head

    def embed(
        self, input_ids, pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None
    ) -> torch.Tensor:
        """Token embeddings (B, S, D) with vision features at the placeholder tokens."""
        embeds = self.language.embed_tokens(input_ids)
        merge2 = self.cfg.vision.spatial_merge_size**2
        parts, plan = [], []  # plan: (placeholder mask, feature count), checked before any compute
        for pv, grid, tok, name in (
            (pixel_values, image_grid_thw, self.cfg.image_token_id, "image"),
            (pixel_values_videos, video_grid_thw, self.cfg.video_token_id, "video"),
        ):
            where = input_ids == tok
            if pv is None:
                if bool(where.any()):
                    raise ValueError(
                        f"input_ids hold {int(where.sum())} {name} placeholder tokens but no {name} pixels were given"
                    )
                continue
            if grid is None:
                raise ValueError(f"{name}: pixel values were given without {name}_grid_thw")
            sizes = (grid.prod(-1) // merge2).tolist()
            check_placeholders(where, sizes, name)
            parts.append((pv, grid))
            plan.append((where, sum(sizes)))
        if not parts:
            return embeds
        # One packed vision pass for images and videos together (attention never crosses frames).
        pixels = torch.cat([p[0] for p in parts])
        grids = torch.cat([p[1] for p in parts])
        feats = self.visual(pixels, grids).to(embeds.dtype)  # (sum of t*h*w/4, D)
        start = 0
        for where, n in plan:
            embeds[where] = feats[start : start + n]
            start += n
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        cu_seqlens: torch.Tensor | list[int] | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Logits (B, S, vocab), or (B, logits_to_keep, vocab) for the last positions only.

        input_ids / attention_mask: (B, S), placeholders already expanded (the processor does it).
        pixel_values(_videos): (N, C*2*14*14) packed patches; *_grid_thw: (n, 3).
        position_ids: (3, B, S) M-RoPE positions; computed with `get_rope_index` when None.
        cu_seqlens: packed training row: input_ids (1, N) holds several samples back to back, sample i
            at [cu_seqlens[i], cu_seqlens[i + 1]); position_ids (restarting per sample) are required,
            attention never crosses samples and no padding is computed.
        return_hidden: return the final-normed hidden states (B, S, D) instead of logits.
        Example: `logits = model(**processor(messages), logits_to_keep=1)`.
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        if cu_seqlens is not None:
            cu_seqlens = [int(c) for c in cu_seqlens]
            if input_ids.shape[0] != 1 or position_ids is None:
                raise ValueError(
                    f"packed input (cu_seqlens): input_ids must be one row (1, N), got {tuple(input_ids.shape)}, "
                    "and position_ids (3, 1, N) restarting per sample must be given"
                )
            if cu_seqlens[0] != 0 or cu_seqlens[-1] != input_ids.shape[1] or cu_seqlens != sorted(cu_seqlens):
                raise ValueError(
                    f"cu_seqlens={cu_seqlens[:8]}...: must rise from 0 to the row length {input_ids.shape[1]}"
                )
        if position_ids is None:  # (also checks placeholders against grids, before any compute)
            position_ids, _ = self.rope_index(
                input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask
            )
        elif position_ids.ndim == 2:  # (B, S) text positions: same on all three axes
            position_ids = position_ids[None].expand(3, -1, -1)
        embeds = self.embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        mask = None
        if cu_seqlens is None and attention_mask is not None and not bool(attention_mask.all()):
            mask = padding_mask(attention_mask, input_ids.shape[1])
        return self.language(
            embeds,
            position_ids,
            mask,
            logits_to_keep=logits_to_keep,
            return_hidden=return_hidden,
            cu_seqlens=cu_seqlens,
        )


def check_placeholders(where: torch.Tensor, sizes: list[int], name: str) -> None:
    """Raise, naming the sample, if the placeholder tokens of each row do not match its features.

    `where`: (B, S) bool placeholder positions; `sizes`: features per image/video in batch order.
    Example: `check_placeholders(input_ids == image_token_id, [64, 16], "image")`.
    """
    counts = where.sum(1).tolist()
    k = 0
    for b, c in enumerate(counts):
        got = 0
        first = k
        while k < len(sizes) and got < c:
            got += sizes[k]
            k += 1
        if got != c:
            raise ValueError(
                f"sample {b}: {c} {name} placeholder tokens but its {name}s {list(range(first, k))} give {got} "
                f"features ({name} sizes in batch order: {sizes}); the processor must expand each "
                f"<|{name}_pad|> to t*h*w/4 tokens of its {name}_grid_thw"
            )
    if k == len(sizes):
        return
    raise ValueError(
        f"{sum(counts)} {name} placeholder tokens in the batch but {sum(sizes)} {name} features "
        f"(sizes {sizes}): more {name}s were given than the prompts reference"
    )
