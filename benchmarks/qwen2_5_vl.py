"""Qwen2.5-VL inference: mmkit engine vs transformers `generate` on the same weights (fp32, CPU).

Config: Qwen2.5-VL-3B widths (LLM 2048 wide, 16/2 heads, vocab 151936 tied; ViT 1280 wide), but only
2 LLM layers and 2 vision layers (block 1 full attention); one 448x448 image (1024 patches -> 256
tokens) + 64 text tokens. Measured, best of interleaved runs:
  - prefill: time to the first new token (generate with max_new_tokens=1), vision encoder included;
  - decode: tokens/s over the next 127 tokens, greedy, no EOS: time from the first to the last new
    token, stamped by a logits processor (transformers) and the streaming callback (mmkit).
mmkit runs its engine: preallocated KV cache, last layer trimmed to the kept logits, oneDNN fp32
GEMMs for prefill-sized inputs (`--no-onednn` to compare without), and the exact screened greedy
argmax (bf16 screen of the output matrix, exact fp32 logits for the few candidates;
`--no-screen` to compare without). Prints both sides, the ratios (> 1 means mmkit is faster), the
max abs difference of the prefill logits, and whether both produced the same 128 tokens.

Run: `.venv/bin/python benchmarks/qwen2_5_vl.py [--repeats 3] [--new-tokens 128]`
"""

from __future__ import annotations

import argparse
import time

import torch
from common import interleaved_best, transformers_qwen_twin
from transformers import LogitsProcessor, LogitsProcessorList

from mmkit.infer.vlm import SamplingParams, generate
from mmkit.models.common import ops
from mmkit.models.qwen2_5_vl.config import flavor
from mmkit.models.qwen2_5_vl.model import Qwen2_5_VLModel
from mmkit.models.qwen2_5_vl.tiny import perturbed_init


def build(layers: int, vision_layers: int, seed: int = 0):
    """Our model with perturbed random weights, and transformers' model sharing the same tensors."""
    cfg = flavor("3B")
    cfg.text.num_hidden_layers = layers
    cfg.vision.depth = vision_layers
    cfg.vision.fullatt_block_indexes = (vision_layers - 1,)
    cfg.validate()
    ours = Qwen2_5_VLModel(cfg)
    perturbed_init(ours, seed)
    with torch.no_grad():  # keep the 3B-width activations in a sane range (1/sqrt(fan_in) init is already)
        ours.language.embed_tokens.weight.mul_(0.05)
    ours.eval()
    ref = transformers_qwen_twin(ours, cfg)
    ref.eval()
    ref.generation_config.eos_token_id = None  # always decode the full budget
    ref.generation_config.pad_token_id = 0
    return ours, ref


def inputs(cfg, text_tokens: int = 64, side: int = 448, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    grid = (1, side // 14, side // 14)
    n_img = grid[1] * grid[2] // 4
    half = text_tokens // 2
    ids = torch.randint(0, 150000, (text_tokens,), generator=g).tolist()
    row = (
        ids[:half]
        + [cfg.vision_start_token_id]
        + [cfg.image_token_id] * n_img
        + [cfg.vision_end_token_id]
        + ids[half:]
    )
    input_ids = torch.tensor([row])
    pixel_values = torch.randn(grid[1] * grid[2], 3 * 2 * 14 * 14, generator=g)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": pixel_values,
        "image_grid_thw": torch.tensor([grid]),
        "mm_token_type_ids": (input_ids == cfg.image_token_id).int(),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vision-layers", type=int, default=2)
    ap.add_argument("--no-onednn", action="store_true", help="keep PyTorch's default fp32 GEMM path on CPU")
    ap.add_argument("--no-screen", action="store_true", help="greedy over full fp32 logits (no bf16 screen)")
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    ours, ref = build(args.layers, args.vision_layers)
    x = inputs(ours.cfg)
    print(
        f"built in {time.perf_counter() - t0:.1f}s; prompt {x['input_ids'].shape[1]} tokens, threads {torch.get_num_threads()}"
    )

    ops.ONEDNN = not args.no_onednn  # mmkit's CPU kernel choice for fp32 GEMMs (prefill / vision)
    with torch.inference_mode():
        a = ref(**x, logits_to_keep=1).logits[:, -1]
        b = ours(
            x["input_ids"],
            pixel_values=x["pixel_values"],
            image_grid_thw=x["image_grid_thw"],
            logits_to_keep=1,
        )[:, -1]
    err = (a - b).abs().max().item()
    n = args.new_tokens
    stamps: list[float] = []  # wall time at which each new token was chosen / its logits were ready

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    def hf_gen(k):
        with torch.inference_mode():
            out = ref.generate(
                **x, max_new_tokens=k, do_sample=False, logits_processor=LogitsProcessorList([Stamp()])
            )
        return out[0, x["input_ids"].shape[1] :].tolist()

    def mm_gen(k):
        params = SamplingParams(max_new_tokens=k)
        stamp = lambda row, t: stamps.append(time.perf_counter())  # noqa: E731
        return generate(ours, x, params, on_token=stamp, screen_greedy=not args.no_screen).tokens[0]

    def decode_time(fn):
        stamps.clear()
        fn(n)
        assert len(stamps) == n
        return stamps[-1] - stamps[0]  # n - 1 decode steps

    same = hf_gen(n) == mm_gen(n)
    first = interleaved_best(
        {"transformers": lambda: hf_gen(1), "mmkit": lambda: mm_gen(1)}, args.repeats, warmup=1
    )
    dec = {"transformers": float("inf"), "mmkit": float("inf")}
    for _ in range(args.repeats):  # interleaved, best of
        dec["transformers"] = min(dec["transformers"], decode_time(hf_gen))
        dec["mmkit"] = min(dec["mmkit"], decode_time(mm_gen))
    tps = {k: (n - 1) / v for k, v in dec.items()}
    print(
        f"prefill (time to first token): transformers {first['transformers'] * 1e3:.0f} ms, mmkit {first['mmkit'] * 1e3:.0f} ms"
    )
    print(
        f"decode tokens/s ({n - 1} tokens): transformers {tps['transformers']:.2f}, mmkit {tps['mmkit']:.2f}"
    )
    print(
        f"ratio prefill  (transformers time / mmkit time): {first['transformers'] / first['mmkit']:.2f}x  (goal >= 1.2x)"
    )
    print(
        f"ratio decode   (mmkit tok/s / transformers tok/s): {tps['mmkit'] / tps['transformers']:.2f}x  (goal >= 1.5x)"
    )
    print(
        f"prefill logits max abs diff: {err:.2e}  (|logits| max {a.abs().max().item():.2f}); same {n} tokens: {same}"
    )


if __name__ == "__main__":
    main()
