"""KV-cache inference engine for vision-language models: prefill, then decode token by token.

The engine knows nothing about tokenization: it takes the processor's tensors (input_ids,
attention_mask, pixel values, grids) and returns token ids. It knows nothing about a model family
either: it drives any model with the `VLMModel` interface below (Qwen2.5-VL implements it in
`models/qwen2_5_vl/model.py`). Everything per step is a handful of tensor ops: a preallocated cache
written in place, masks that are views of one preallocated tensor, and no generic generation utilities.
Every request owns its cache, masks and sampler state, so threads may share one model.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from mmkit.infer.accel.greedy import screened_head


@runtime_checkable
class VLMModel(Protocol):
    """What `generate` needs from a model. Positions are opaque to the engine: it only hands the
    prompt's positions back to `prefill` and counts new tokens' positions up from `rope_positions`.

    Example: `assert isinstance(Qwen2_5_VLModel(cfg), VLMModel)`.
    """

    def kv_cache_spec(self) -> dict:
        """`KVCache` sizes: {"layers", "kv_heads", "head_dim", "dtype", "device"[, "max_positions"]};
        max_positions (the model's context) caps prompt + new tokens."""
        ...

    def media_inputs(self, inputs: dict) -> dict:
        """The processor entries the model reads besides input_ids / attention_mask, on its device."""
        ...

    def rope_positions(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, media: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt positions for `prefill`, (B,) position of the first new token)."""
        ...

    def prefill(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        media: dict,
        cache: KVCache,
        attention_mask: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Run the prompt, filling `cache`: logits (B, V) at its last position, or hidden (B, D)."""
        ...

    def decode_step(
        self,
        tokens: torch.Tensor,
        position: torch.Tensor,
        cache: KVCache,
        key_mask: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """One token (B,) per row at `position` (B,), attending to the (B, K) `key_mask` slots."""
        ...

    def output_head(self) -> nn.Linear:
        """The output layer that `return_hidden` states skip (for the screened greedy argmax)."""
        ...


class KVCache:
    """Preallocated keys/values for all layers: (layers, B, H_kv, max_len, Dh) each.

    Layers call `update(layer, k, v)` during a forward; the engine calls `advance(n)` after it.
    Example: `cache = KVCache(2, batch=1, kv_heads=2, max_len=512, head_dim=128, dtype=torch.float32)`.
    """

    def __init__(self, layers, batch, kv_heads, max_len, head_dim, dtype, device="cpu", max_positions=None):
        # max_positions: the model's context, part of `kv_cache_spec`; the engine caps max_len to it
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
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be a finite number >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:  # NaN fails this too
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


def _fit_context(prompt_len: int, max_new: int, context: int | None) -> int:
    """New tokens that fit the model's context after the prompt: the cache is preallocated for them."""
    if context is None or prompt_len + max_new <= context:
        return max_new
    if prompt_len >= context:
        raise ValueError(f"the prompt is {prompt_len} tokens, the model's context {context}; shorten it")
    warnings.warn(
        f"max_new_tokens={max_new}: the prompt ({prompt_len} tokens) leaves {context - prompt_len} of the "
        f"model's {context}-token context; generating at most that many",
        stacklevel=3,
    )
    return context - prompt_len


@torch.inference_mode()
def generate(
    model: VLMModel,
    inputs: dict[str, torch.Tensor],
    params: SamplingParams,
    on_token: Callable[[int, int], None] | None = None,
    screen_greedy: bool = True,
) -> Generation:
    """Prefill the (left-padded) batch, then decode up to `params.max_new_tokens` tokens per row.

    `inputs`: the processor's output: input_ids, attention_mask, and the media entries the model
    reads (`model.media_inputs`; for Qwen2.5-VL pixel_values, image_grid_thw, pixel_values_videos,
    video_grid_thw, second_per_grid_ts); extra keys are ignored.
    `on_token(row, token_id)` is called for each new token as soon as it is chosen (streaming).
    A row stops after an EOS id; the batch stops when every row has. `screen_greedy` (temperature 0,
    fp32 weights): pick the exact argmax via `accel.greedy.ScreenedArgmax` instead of full fp32 logits.
    Example:
        >>> out = generate(model, processor(prompt, images=[img]), SamplingParams(64, eos_token_ids=(eos,)))
        >>> processor.decode(out.tokens[0], skip_special_tokens=True)
    """
    params.validate()
    t0 = time.perf_counter()
    spec = dict(model.kv_cache_spec())
    context = spec.pop("max_positions", None)  # the model's context, where it declares one
    dev = spec["device"]
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
    media = model.media_inputs(inputs)

    positions, next_pos = model.rope_positions(ids, attn, media)  # next_pos (B,): first new token's
    max_new = _fit_context(prompt_len, params.max_new_tokens, context)
    max_len = prompt_len + max_new
    cache = KVCache(batch=batch, max_len=max_len, **spec)
    # keys[b, j]: may row b attend to cache slot j (prompt padding never; generated slots always).
    keys = torch.ones(batch, max_len, dtype=torch.bool, device=dev)
    keys[:, :prompt_len] = attn.bool()
    gen = None
    if params.temperature > 0:
        gen = torch.Generator(device=dev).manual_seed(params.seed if params.seed is not None else 0)
    eos = torch.tensor(sorted(set(params.eos_token_ids)) or [-1], device=dev)

    # greedy: exact fp32 argmax screened with a bf16 copy of the output matrix (half the bytes per token)
    head = screened_head(model.output_head()) if params.temperature == 0 and screen_greedy else None

    def pick(out):  # the model's last-position output -> the next token per row
        return head(out) if head is not None else sample(out, params.temperature, params.top_p, gen)

    # 1) prefill: vision + whole prompt, the last position only.
    hidden = head is not None
    token = pick(model.prefill(ids, positions, media, cache, attn if padded else None, hidden))  # (B,)
    cache.advance(prompt_len)
    _sync(dev)
    t1 = time.perf_counter()

    # 2) decode: one token per step, attending to the cache.
    out = torch.empty(batch, max_new, dtype=torch.long, device=dev)
    done = torch.zeros(batch, dtype=torch.bool, device=dev)
    n_steps = 0
    for step in range(max_new):
        out[:, step] = token
        n_steps = step + 1
        if on_token is not None:
            for b, t in enumerate(token.tolist()):
                if not bool(done[b]):
                    on_token(b, t)
        done |= torch.isin(token, eos)
        if step + 1 == max_new or bool(done.all()):
            break
        m = keys[:, : cache.pos + 1] if padded else None  # (B, K) view
        token = pick(model.decode_step(token, next_pos + step, cache, m, hidden))
        cache.advance(1)
    _sync(dev)
    t2 = time.perf_counter()

    res = Generation(prompt_tokens=attn.sum(1).tolist(), prefill_s=t1 - t0, decode_s=t2 - t1)
    rows = out[:, :n_steps].tolist()
    for row in rows:
        cut = next((i + 1 for i, t in enumerate(row) if t in set(params.eos_token_ids)), len(row))
        res.tokens.append(row[:cut])
    return res
