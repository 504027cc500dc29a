"""KV-cache inference engine for vision-language models (Qwen2.5-VL): prefill, then decode token by token.

The engine knows nothing about tokenization: it takes the processor's tensors (input_ids,
attention_mask, pixel values, grids) and returns token ids. It needs from the model:
`rope_index(...)`, `embed(...)`, `language(embeds, position_ids, mask, cache, logits_to_keep)`,
`language.embed_tokens` and `cfg.text` (sizes). Everything per step is a handful of tensor ops: a
preallocated cache written in place, masks that are views of one preallocated tensor, and no generic
generation utilities.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mmkit.infer.accel.greedy import screened_head
from mmkit.models.qwen2_5_vl.model import padding_mask


class KVCache:
    """Preallocated keys/values for all layers: (layers, B, H_kv, max_len, Dh) each.

    Layers call `update(layer, k, v)` during a forward; the engine calls `advance(n)` after it.
    Example: `cache = KVCache(2, batch=1, kv_heads=2, max_len=512, head_dim=128, dtype=torch.float32)`.
    """

    def __init__(self, layers, batch, kv_heads, max_len, head_dim, dtype, device="cpu"):
        shape = (layers, batch, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.pos = 0  # tokens already stored

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's (B, H_kv, S, Dh) keys/values; return views of all keys/values so far."""
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} tokens > max_len={self.max_len}")
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.pos += n


@dataclass
class SamplingParams:
    """How to pick tokens. temperature 0 = greedy; top_p < 1 keeps the smallest set of tokens whose
    probability mass reaches top_p; seed makes sampling repeatable."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")


@dataclass
class Generation:
    """Output of `generate`: new token ids per row (EOS included when hit), prompt lengths, timings."""

    tokens: list[list[int]] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput over all rows: tokens after the first / decode time."""
        n = sum(max(len(t) - 1, 0) for t in self.tokens)
        return n / self.decode_s if self.decode_s > 0 else 0.0


def sample(
    logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None
) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids: argmax if temperature == 0, else temperature + top-p sampling.

    Example: `sample(logits, 0.7, 0.9, torch.Generator().manual_seed(0))`.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the mass before it already reaches top_p (the first token always stays).
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def _sync(dev: torch.device) -> None:
    """Wait for queued kernels so timings are real (cuda, npu, ...); no-op on CPU."""
    mod = getattr(torch, dev.type, None)
    if dev.type != "cpu" and mod is not None and hasattr(mod, "synchronize"):
        mod.synchronize()


@torch.inference_mode()
def generate(
    model,
    inputs: dict[str, torch.Tensor],
    params: SamplingParams,
    on_token: Callable[[int, int], None] | None = None,
    screen_greedy: bool = True,
) -> Generation:
    """Prefill the (left-padded) batch, then decode up to `params.max_new_tokens` tokens per row.

    `inputs`: the processor's output (input_ids, attention_mask, pixel_values, image_grid_thw,
    pixel_values_videos, video_grid_thw, second_per_grid_ts; extra keys are ignored).
    `on_token(row, token_id)` is called for each new token as soon as it is chosen (streaming).
    A row stops after an EOS id; the batch stops when every row has. `screen_greedy` (temperature 0,
    fp32 weights): pick the exact argmax via `accel.greedy.ScreenedArgmax` instead of full fp32 logits.
    Example:
        >>> out = generate(model, processor(prompt, images=[img]), SamplingParams(64, eos_token_ids=(eos,)))
        >>> processor.decode(out.tokens[0], skip_special_tokens=True)
    """
    params.validate()
    t0 = time.perf_counter()
    dev = model.language.embed_tokens.weight.device
    ids = inputs["input_ids"].to(dev)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(ids.shape)}")
    batch, prompt_len = ids.shape
    attn = inputs.get("attention_mask")
    attn = torch.ones_like(ids) if attn is None else attn.to(dev)
    if bool((attn[:, -1] == 0).any()):
        raise ValueError(
            "generate: the batch must be LEFT-padded (last column all real tokens); use padding_side='left'"
        )
    padded = not bool(attn.all())
    cfg = model.cfg.text
    dtype = model.language.embed_tokens.weight.dtype
    pix = {
        k: inputs.get(k) for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
    }
    pix = {k: (v.to(dev) if v is not None else None) for k, v in pix.items()}
    sec = inputs.get("second_per_grid_ts")

    positions, _ = model.rope_index(ids, pix["image_grid_thw"], pix["video_grid_thw"], sec, attn)  # (3, B, L)
    next_pos = positions.amax(dim=(0, 2)) + 1  # (B,) position of the first new token
    max_len = prompt_len + params.max_new_tokens
    cache = KVCache(cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim, dtype, dev)
    # keys[b, j]: may row b attend to cache slot j (prompt padding never; generated slots always).
    keys = torch.ones(batch, max_len, dtype=torch.bool, device=dev)
    keys[:, :prompt_len] = attn.bool()
    gen = None
    if params.temperature > 0:
        gen = torch.Generator(device=dev).manual_seed(params.seed if params.seed is not None else 0)
    eos = torch.tensor(sorted(set(params.eos_token_ids)) or [-1], device=dev)

    # greedy: exact fp32 argmax screened with a bf16 copy of the output matrix (half the bytes per token)
    head = screened_head(model.language.lm_head) if params.temperature == 0 and screen_greedy else None

    def pick(x, pos, m):  # one forward of the text model, then the next token per row
        if head is not None:
            return head(model.language(x, pos, m, cache, logits_to_keep=1, return_hidden=True)[:, -1])
        logits = model.language(x, pos, m, cache, logits_to_keep=1)[:, -1]  # (B, V)
        return sample(logits, params.temperature, params.top_p, gen)

    # 1) prefill: vision + whole prompt, the last position only.
    embeds = model.embed(
        ids, pix["pixel_values"], pix["image_grid_thw"], pix["pixel_values_videos"], pix["video_grid_thw"]
    )
    token = pick(embeds, positions, padding_mask(attn, prompt_len) if padded else None)  # (B,)
    cache.advance(prompt_len)
    _sync(dev)
    t1 = time.perf_counter()

    # 2) decode: one token per step, attending to the cache.
    out = torch.empty(batch, params.max_new_tokens, dtype=torch.long, device=dev)
    done = torch.zeros(batch, dtype=torch.bool, device=dev)
    n_steps = 0
    for step in range(params.max_new_tokens):
        out[:, step] = token
        n_steps = step + 1
        if on_token is not None:
            for b, t in enumerate(token.tolist()):
                if not bool(done[b]):
                    on_token(b, t)
        done |= torch.isin(token, eos)
        if step + 1 == params.max_new_tokens or bool(done.all()):
            break
        pos = (next_pos + step).view(1, batch, 1).expand(3, batch, 1)  # text positions on all 3 axes
        x = model.language.embed_tokens(token.view(batch, 1))  # (B, 1, D)
        m = keys[:, None, None, : cache.pos + 1] if padded else None  # (B, 1, 1, K) view
        token = pick(x, pos, m)
        cache.advance(1)
    _sync(dev)
    t2 = time.perf_counter()

    res = Generation(prompt_tokens=attn.sum(1).tolist(), prefill_s=t1 - t0, decode_s=t2 - t1)
    rows = out[:, :n_steps].tolist()
    for row in rows:
        cut = next((i + 1 for i, t in enumerate(row) if t in set(params.eos_token_ids)), len(row))
        res.tokens.append(row[:cut])
    return res
