"""Analytic per-rank training memory of a parallel layout: an estimate, not a measurement.

`estimate_memory("wan2.1-14b", dp_shard=8, seq_len=75_600)` returns GiB on the busiest rank.
Parameter counts come from the real model classes built on the meta device; the bytes a block saves
for backward come from formulas derived by listing every tensor autograd keeps in mmkit's Wan block,
Qwen2.5-VL decoder layer and ViT block under bf16 autocast (tests/unit/parallel/test_memory.py
re-measures them on tiny blocks). `python -m mmkit.tools.memory --table` prints docs/parallel.md's
tables.

What it models, as mmkit trains today (parallel/plans, train/trainer.py):
- fp32 master weights, fp32 gradients, AdamW's two fp32 moments: 16 B per parameter of the rank's
  pipeline stage, tp-split parts divided by tp, everything divided by the FSDP2 group dp_shard x cp;
- bf16 compute through `torch.autocast`, whose cache keeps a bf16 copy of every weight the forward
  touched until the forward ends (2 B per unsharded parameter, FSDP or not);
- FSDP2 without a MixedPrecisionPolicy: blocks all-gather fp32 weights (current + prefetched block),
  the root unit (embeddings, heads: whatever is outside the blocks) stays gathered through forward and
  backward, and gradients are reduce-scattered in fp32;
- activations: tokens per rank x bytes per token per block x blocks held (pipeline schedules keep
  several micro-batches in flight on early stages); full checkpointing keeps each block's input and
  recomputes one block at a time in backward;
- the VLM loss: fp32 log-softmax saved for backward plus the bf16 and fp32 logits around it, 10 B per
  supervised token per vocabulary entry (the LM head is replicated; each rank scores its own tokens).
Peak = state + activations + logits + max(end of forward: autocast cache + gathered weights,
backward: recomputed block + gathered weights + unsharded gradients + one block's bf16 casts).
Flash attention is assumed (no S x S scores); `cp_kernel="math"` adds the fp32 score blocks that
`ContextParallel`'s math kernel (its CUDA path today) materializes. Not counted: CUDA context and NCCL
buffers (~1-2 GiB), allocator fragmentation, gradient tensors in flight inside one block, frozen
encoders (umT5, VAE, CLIP) when features are computed on the fly. Keep ~10% of the card free.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass
from functools import cache

from mmkit import registry
from mmkit.parallel.dims import check_model_layout, padded_len, stage_layers
from mmkit.parallel.pp_stages import plan_layers

GIB = 2**30

AC_MODES = ("none", "full", "selective")
SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")


@dataclass(frozen=True)
class ModelStats:
    """Sizes the estimate needs, read from the model built on the meta device."""

    name: str
    family: str  # the registry name, "wan" or "qwen2_5_vl"
    kind: str  # the activation formulas: "dit" or "vlm" (the family's `EstimatorInfo.kind`)
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    total_params: int
    layer_params: int  # one repeated block (DiT block / LLM decoder layer)
    layer_tp_params: int  # ... of which the TP plan splits (the 2-D weights)
    first_params: int  # outside the blocks, on pipeline stage 0 (embeddings; Qwen: the ViT too)
    last_params: int  # outside the blocks, on the last stage (Wan head; Qwen final norm + LM head)
    vocab: int = 0
    ctx_tokens: int = 0  # Wan: text (+ CLIP image) tokens every cross-attention reads
    vit_layers: int = 0
    vit_hidden: int = 0
    vit_ffn: int = 0
    vit_heads: int = 0
    vit_layer_params: int = 0  # one ViT block (its own FSDP unit, replicated over tp)


def models() -> dict[str, tuple[str, str]]:
    """Accepted model names (lower case) -> (family, flavor), from every family's `EstimatorInfo`."""
    return {
        name: (spec.name, flavor)
        for spec in registry.specs()
        if spec.estimator is not None
        for name, flavor in spec.estimator.names.items()
    }


def resolve_model(model: str) -> tuple[str, str]:
    """A model name -> (family, flavor). Example: `resolve_model("Wan2.1-14B")` -> `("wan", "14B")`."""
    key, known = model.lower(), models()
    if key not in known:
        raise ValueError(f"model={model!r}: unknown; choose one of {', '.join(known)}")
    return known[key]


def _config(model: str):
    family, flavor = resolve_model(model)
    return registry.get(family).flavor(flavor)


@cache
def model_stats(model: str) -> ModelStats:
    """Count the parameters of the real model class on the meta device (no memory used; ~1 s for 72B).

    Example: `model_stats("wan2.1-14b").total_params` -> 14288491584.
    """
    import torch

    family, _ = resolve_model(model)
    spec, cfg = registry.get(family), _config(model)
    with torch.device("meta"):
        net = spec.build_model(cfg)
    est = spec.estimator
    dims = est.stats(cfg, net)
    # The TP plans (parallel/plans/) split the Linear weights of the repeated blocks (Wan: also the
    # q/k RMSNorm over all heads); norms, biases, AdaLN tables, embeddings, heads and the Qwen ViT
    # stay replicated over tp.
    counts = {k: [0, 0] for k in ("layer", "first", "last")}
    for name, p in net.named_parameters():  # tied weights appear once
        where = "layer" if re.match(est.block, name) else "last" if re.match(est.last, name) else "first"
        counts[where][0] += p.numel()
        counts[where][1] += p.numel() if where == "layer" and p.ndim == 2 else 0
    n = dims["layers"]
    return ModelStats(
        name=model.lower(),
        family=family,
        kind=est.kind,
        total_params=sum(c[0] for c in counts.values()),
        layer_params=counts["layer"][0] // n,
        layer_tp_params=counts["layer"][1] // n,
        first_params=counts["first"][0],
        last_params=counts["last"][0],
        **dims,
    )


def wan_seq_len(frames: int = 81, height: int = 480, width: int = 832, patch=(1, 2, 2)) -> int:
    """DiT tokens of a Wan2.1 clip: VAE stride (4, 8, 8), then the (1, 2, 2) patch.

    Example: `wan_seq_len(81, 720, 1280)` -> 75600 (21 x 45 x 80); `wan_seq_len(81, 480, 832)` -> 32760.
    """
    t, h, w = (frames - 1) // 4 + 1, height // 8, width // 8
    return (t // patch[0]) * (h // patch[1]) * (w // patch[2])


def block_terms(kind: str, s: ModelStats, bf16_params: bool = False, fused_norm: bool = False):
    """Bytes one block saves for backward per token: (seq, gathered, tp, block_input).

    - seq: residual-side tensors (norm inputs and outputs, gate products); sequence parallelism
      splits them over tp;
    - gathered: inputs of column-parallel Linears; with sequence parallelism these are all-gathered
      full-sequence tensors, so tp never divides them;
    - tp: per-head and FFN-hidden tensors (q, k, v, attention output, GELU/SwiGLU intermediates);
    - block_input: what a checkpointed block keeps (its input: the residual stream).
    As on CUDA: autocast runs LayerNorm in fp32 (it keeps an fp32 copy of its input, and every Linear
    after it takes its own bf16 copy of the fp32 output), RMSNorm with a weight whose dtype differs from
    its input runs unfused (two fp32 tensors kept). `bf16_params` (FSDP2 MixedPrecisionPolicy, not
    mmkit's default): Linears reading one normed input share it and the Qwen residual is bf16;
    `fused_norm` (bf16 params, tp = 1): Wan's RMSNorm keeps only its bf16 input. Small terms:
    LayerNorm mean/rstd 8 B, RMSNorm 1/rms 4 B, flash-attention log-sum-exp 4 B per head.
    Example: `block_terms("llm", model_stats("qwen2.5-vl-7b"))` -> (57352, 35840, 168048, 14336).
    """
    if kind == "wan":  # self-attention, cross-attention to the text, GELU MLP (3 LayerNorms, 3 RMSNorms)
        h, f, H = s.hidden, s.ffn, s.heads
        norms = 6 * h if fused_norm else 24 * h  # q, k, cross-q RMSNorm: 2h each fused, 8h composite
        # seq: 3 fp32 LayerNorm inputs (4h) + 2 gate products (2h); gathered: q, k, v, cross-q, fc1
        # inputs (2h each); tp: q, k, v, out of self-attention (8h), q, out of cross-attention (4h),
        # out-projection inputs (2 x 2h), GELU input and output (4f)
        return 16 * h + 24, 10 * h, norms + 16 * h + 4 * f + 12 + 8 * H, 2 * h
    if kind in ("wan_lean", "wan_lean_tp"):  # a Wan block with `recompute_hidden` (selective AC)
        # 14 bf16 (tokens x width) tensors (see WanBlock): the 2 gated branch outputs (seq), the inputs of
        # self-attention, cross-attention and MLP (gathered), q, k, v, out of self- and q, out of
        # cross-attention (tp), and q, k, cross-q before their RMSNorm, which keeps only its input (tp);
        # under TP the head-sharded RMSNorm keeps its fp32 input and output (8h each) and 1/rms instead.
        # The log-sum-exp of both attentions; no FFN term (the MLP hidden is recomputed).
        h, H = s.hidden, s.heads
        norms = 24 * h + 12 if kind == "wan_lean_tp" else 6 * h
        return 4 * h, 6 * h, 12 * h + norms + 8 * H, 2 * h
    if kind == "llm":  # Qwen2 decoder layer: RMSNorm, GQA attention, RMSNorm, SwiGLU
        h, kv, f, H = s.hidden, s.kv_heads * s.head_dim, s.ffn, s.heads
        tp = 4 * h + 4 * kv + 8 * f + 4 * H  # q, out; k, v; gate, silu, up, down input; lse
        if bf16_params:
            return 12 * h + 8, 4 * h, tp, 2 * h
        # fp32 residual (the embedding output is fp32): each norm keeps two fp32 tensors; q/k/v and
        # gate/up each keep their own bf16 copy of the normed input
        return 16 * h + 8, 10 * h, tp, 4 * h
    if kind == "vit":  # Qwen2.5-VL ViT block on packed patches (bf16 residual: patch_embed is a Linear)
        h, f, H = s.vit_hidden, s.vit_ffn, s.vit_heads
        # v stays a view of the fused qkv output, so attention keeps that whole (6h) buffer
        return 12 * h + 8, (4 if bf16_params else 6) * h, 12 * h + 8 * f + 4 * H, 2 * h
    raise ValueError(f"block_terms: kind={kind!r}, choose wan, wan_lean, wan_lean_tp, llm or vit")
    raise AssertionError(kind)


def _per_token(terms, tp: int, sp: bool) -> tuple[float, float]:
    """(bytes per token of an un-checkpointed block, of a checkpointed one) on one rank."""
    seq, gathered, tpt, inp = terms
    split = tp if sp else 1
    return seq / split + gathered + tpt / tp, inp / split


def _in_flight(schedule: str, pp: int, virtual: int, rank: int, microbatches: int) -> int:
    """Chunk forwards whose activations pipeline rank `rank` holds at its peak (Megatron warm-up counts).

    1F1B: pp - rank; interleaved: 2 (pp - rank - 1) + (virtual - 1) pp + 1, which for rank 0 is
    Korthikanti et al.'s (1 + (pp - 1) / (pp virtual)) x its layers; GPipe: every micro-batch.
    """
    total = microbatches * virtual
    if pp == 1:
        return 1
    if schedule == "gpipe":
        return total
    if schedule == "interleaved_1f1b" and virtual > 1:
        return min(total, 2 * (pp - rank - 1) + (virtual - 1) * pp + 1)
    return min(total, pp - rank)


def estimate_memory(
    model: str,
    *,
    seq_len: int,
    dp_shard: int = 1,
    dp_replicate: int = 1,
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    micro_batch: int = 1,
    ac: str = "full",
    ac_every_k: int = 2,
    sequence_parallel: bool | None = None,
    cp_algo: str = "ulysses",
    ulysses_degree: int | None = None,
    pp_layers=None,
    virtual_stages: int = 1,
    pp_schedule: str = "1f1b",
    microbatches: int | None = None,
    image_tokens: int = 0,
    supervised: float = 1.0,
    ema: bool = False,
    autocast_cache: bool | None = None,
    bf16_params: bool = False,
    cp_kernel: str = "flash",
) -> dict:
    """Estimated peak memory (GiB) of the busiest rank when training `model` with this layout.

    seq_len: tokens of one sample (Wan: video tokens, see `wan_seq_len`; Qwen: LLM tokens, images
    included). image_tokens: how many of those come from images (the ViT runs on 4x as many patches,
    on stage 0, replicated over tp and cp). supervised: fraction of tokens with a label (only those
    get logits). microbatches: pipeline micro-batches per step (default pp x virtual_stages).
    ac_every_k: selective checkpointing's k (blocks i % k == 0 are checkpointed). autocast_cache:
    torch.autocast's weight-cast cache (default: as mmkit's trainer, on for one process, off under
    FSDP2 or pipeline stages). bf16_params: an FSDP2
    MixedPrecisionPolicy(param_dtype=bf16) instead (no cache, half-size gathers). cp_kernel: "flash"
    or "math" (ContextParallel's fp32 score blocks).
    Returns params, grads, optimizer, ema, activations, logits, autocast_cache, fwd_working,
    bwd_working, total (GiB), and stage (the pipeline rank described), params_per_rank,
    tokens_per_rank, fsdp.

    Example:
        >>> m = estimate_memory("wan2.1-14b", dp_shard=4, cp=2, seq_len=75_600, ac="full")
        >>> round(m["optimizer"], 2), m["tokens_per_rank"]
        (13.31, 37800)
    """
    s = model_stats(model)
    if ac not in AC_MODES:
        raise ValueError(f"ac={ac!r}: choose one of {', '.join(AC_MODES)}")
    if pp_schedule not in SCHEDULES:
        raise ValueError(f"pp_schedule={pp_schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if cp_kernel not in ("flash", "math"):
        raise ValueError(f"cp_kernel={cp_kernel!r}: choose flash or math")
    for name, v in (("dp_shard", dp_shard), ("dp_replicate", dp_replicate), ("tp", tp), ("pp", pp),
                    ("cp", cp), ("micro_batch", micro_batch), ("virtual_stages", virtual_stages),
                    ("seq_len", seq_len), ("ac_every_k", ac_every_k)):  # fmt: skip
        if v < 1:
            raise ValueError(f"{name}={v}: must be >= 1")
    if s.kind == "dit" and image_tokens:
        raise ValueError("image_tokens: only for Qwen2.5-VL (Wan's CLIP tokens are counted already)")
    if not 0.0 <= supervised <= 1.0:
        raise ValueError(f"supervised={supervised}: a fraction in [0, 1]")
    check_model_layout(s.family, _config(model), tp=tp, cp=cp, cp_algo=cp_algo, ulysses_degree=ulysses_degree)
    if pp > 1 or pp_layers is not None:
        stage_layers(pp, s.layers, pp_layers)  # the layout rules (sum, no empty stage)
    nested = bool(pp_layers) and all(isinstance(x, (list, tuple)) for x in pp_layers)
    if nested:
        virtual_stages = len(pp_layers)
    elif pp_schedule == "interleaved_1f1b" and virtual_stages == 1:
        virtual_stages = 2  # the trainer's default for the interleaved schedule
    chunks = [len(c) for c in plan_layers(s.layers, pp, pp_layers, virtual_stages)]  # stage s on rank s % pp
    virtual_stages = len(chunks) // pp
    per_rank = [sum(chunks[r::pp]) for r in range(pp)]

    sp = tp > 1 if sequence_parallel is None else sequence_parallel
    fsdp = dp_replicate * dp_shard * cp > 1  # ParallelDims.fsdp
    shard = dp_shard * cp if fsdp else 1  # the "dp_shard_cp" mesh
    fused = bf16_params and tp == 1  # the TP plan's head-sharded RMSNorm always computes in fp32
    if autocast_cache is None:  # the trainer turns the cache off where weights are sharded (FSDP2) or staged
        autocast_cache = not (fsdp or pp > 1)
    cast_cache = autocast_cache and not bf16_params
    m_micro = microbatches or pp * virtual_stages
    b = micro_batch
    tokens = padded_len(seq_len, cp * (tp if sp else 1)) // cp  # padded to every split
    uly = {"ulysses": cp, "ring": 1, "hybrid": ulysses_degree or 1}[cp_algo]
    kind = "wan" if s.kind == "dit" else "llm"
    if kind == "wan" and ac == "selective":  # selective AC turns on WanBlock.recompute_hidden
        kind = "wan_lean" if tp == 1 else "wan_lean_tp"
    full, ckpt = _per_token(block_terms(kind, s, bf16_params, fused), tp, sp)
    k_ac = {"none": 0, "full": 1, "selective": ac_every_k}[ac]
    gather_b = 2 if bf16_params else 4  # bytes per all-gathered weight
    grad_b = 6 if bf16_params else 4  # unsharded gradient bytes before the fp32 reduce-scatter
    cast_b = 0 if bf16_params else 2  # autocast's bf16 copy of an fp32 weight

    def stack(n_layers: int, copies: float, full: float, ckpt: float) -> tuple[float, int]:
        """(saved bytes per token of `copies` micro-batches through n_layers blocks, open blocks)."""
        n_open = n_layers if k_ac == 0 else n_layers - math.ceil(n_layers / k_ac)
        return copies * (n_open * full + (n_layers - n_open) * ckpt), n_open

    stages = []
    for r in range(pp):
        n = per_rank[r]
        # Qwen under TP: the token embedding and the LM head are split over vocabulary rows
        vocab_rows = s.vocab * s.hidden * (1 - 1 / tp) if s.kind == "vlm" else 0
        untied = s.kind == "vlm" and s.last_params >= s.vocab * s.hidden  # tied: counted in first_params
        head_rows = vocab_rows if untied else 0
        root = (s.first_params - vocab_rows if r == 0 else 0) + (
            s.last_params - head_rows if r == pp - 1 else 0
        )
        vit_blocks = s.vit_layers * s.vit_layer_params if r == 0 else 0
        local = n * (s.layer_params - s.layer_tp_params * (1 - 1 / tp)) + root  # before FSDP sharding
        root -= vit_blocks  # the ViT blocks are their own FSDP units
        block = s.layer_params - s.layer_tp_params * (1 - 1 / tp)
        big_block = max(block, s.vit_layer_params if vit_blocks else 0)
        untied_units = untied and pp == 1
        if untied_units:  # the plan makes the (untied) embedding and LM head FSDP units of their own
            table = s.vocab * s.hidden / tp
            root -= 2 * table
            big_block = max(big_block, table)
        held = local / shard
        copies = _in_flight(pp_schedule, pp, virtual_stages, r, m_micro) / virtual_stages
        tail = m_micro if pp_schedule == "gpipe" and pp > 1 else 1  # last chunk: backward follows forward
        per_token, n_open = stack(n, copies, full, ckpt)
        act = (per_token + 4 * s.head_dim) * tokens * b  # + RoPE cos/sin tables (bf16, shared)
        recompute = full * tokens * b if k_ac else 0.0
        logits = 0.0
        if s.kind == "dit":
            # cross-attention K/V of the text (+ CLIP) tokens: whole on every cp rank, split over tp
            act += n_open * copies * (6 if fused else 12) * s.hidden * s.ctx_tokens * b / tp
            if r == pp - 1:  # head on this rank's tokens: fp32 LayerNorm input + proj input
                act += tail * 6 * s.hidden * tokens * b / (tp if sp else 1)
        else:
            if r == 0 and image_tokens:  # the ViT on 4 patches per image token, whole on every rank
                v_full, v_ckpt = _per_token(block_terms("vit", s, bf16_params, fused), 1, False)
                patches = 4 * image_tokens * b
                act += stack(s.vit_layers, copies, v_full, v_ckpt)[0] * patches
                recompute = max(recompute, v_full * patches if k_ac else 0.0)
            if r == pp - 1:
                mine = tokens * b / (tp if sp else 1)  # the LM head runs on this rank's tokens
                sup = math.ceil(supervised * mine)
                act += tail * ((6 if bf16_params else 8) * s.hidden * mine + 2 * s.hidden * sup)
                logits = tail * 10 * sup * s.vocab
        cache_bytes = cast_b * local if cast_cache else 0.0
        if cast_b and not cast_cache and k_ac == 0:  # saved bf16 weight copies of un-checkpointed blocks
            act += copies * cast_b * n_open * block
        # FSDP2: a block and the prefetched next one are gathered; the root unit (everything outside the
        # blocks) stays gathered from its pre-forward to its post-backward, and holds the head's
        # gradient from the start of backward (the embeddings' only at the end, when blocks are done),
        # unless the head is a unit of its own (reduce-scattered right after its backward)
        head = s.last_params - head_rows if r == pp - 1 and not untied_units else 0
        fwd = 0.0 if cast_cache else cast_b * big_block
        bwd = recompute + cast_b * big_block
        end = 0.0
        if fsdp and pp > 1:
            # one FSDP unit per stage; torch's pipeline schedules keep it gathered after the first
            # backward and accumulate unsharded gradients until the last micro-batch
            fwd += (gather_b + grad_b) * local
            bwd += (gather_b + grad_b) * local
        elif fsdp:
            fwd += 2 * gather_b * big_block + gather_b * root
            bwd += (2 * gather_b + grad_b) * big_block + gather_b * root + grad_b * head
            end = (gather_b + grad_b) * root
        bwd = max(bwd, end)
        if cp > 1 and cp_kernel == "math":  # fp32 scores of one (chunk x chunk) block: s, p / p, dp, ds
            chunk = uly * tokens
            heads = s.heads // tp // uly
            fwd += 8 * b * heads * chunk * chunk
            bwd += 12 * b * heads * chunk * chunk
        parts = dict(
            params=4 * held,
            grads=4 * held,
            optimizer=8 * held,
            ema=4 * held if ema else 0.0,
            activations=act,
            logits=logits,
            autocast_cache=cache_bytes,
            fwd_working=fwd,
            bwd_working=bwd,
        )
        parts = {k: v / GIB for k, v in parts.items()}
        base = sum(v for k, v in parts.items() if k not in ("autocast_cache", "fwd_working", "bwd_working"))
        parts["total"] = base + max(parts["autocast_cache"] + parts["fwd_working"], parts["bwd_working"])
        parts.update(stage=r, params_per_rank=int(held), tokens_per_rank=tokens, fsdp=fsdp)
        stages.append(parts)
    return max(stages, key=lambda d: d["total"])


# ---------------------------------------------------------------------------------------------------
# Tables for docs/parallel.md
# ---------------------------------------------------------------------------------------------------
CARD_GIB = 80.0  # an "80 GB" H100 / A100 (81,559 / 81,920 MiB)
USABLE = 0.9  # "fits" = total <= 72 GiB: ~10% left for the CUDA context, NCCL and fragmentation

TABLES = [  # (title, model, seq_len)
    (
        "Wan2.1-T2V-14B, 480p 81 frames (32,760 tokens), micro_batch 1",
        "wan2.1-14b",
        wan_seq_len(81, 480, 832),
    ),
    (
        "Wan2.1-T2V-14B, 720p 81 frames (75,600 tokens), micro_batch 1",
        "wan2.1-14b",
        wan_seq_len(81, 720, 1280),
    ),
    ("Qwen2.5-VL-72B, 8,192 tokens per sample, micro_batch 1", "qwen2.5-vl-72b", 8192),
    ("Qwen2.5-VL-72B, 32,768 tokens per sample, micro_batch 1", "qwen2.5-vl-72b", 32768),
]
WAN_LAYOUTS = [  # (GPUs, estimate_memory kwargs)
    (8, dict(dp_shard=8, ac="none")),
    (8, dict(dp_shard=8, ac="selective", ac_every_k=2)),
    (8, dict(dp_shard=8)),
    (8, dict(dp_shard=8, bf16_params=True)),
    (8, dict(dp_shard=4, cp=2)),
    (8, dict(dp_shard=2, cp=4)),
    (8, dict(cp=8)),
    (8, dict(cp=8, cp_algo="ring")),
    (8, dict(dp_shard=4, tp=2)),
    (8, dict(dp_shard=2, tp=4)),
    (8, dict(dp_shard=2, pp=4)),
    (8, dict(pp=2, tp=4)),
    (64, dict(dp_shard=64)),
    (64, dict(dp_replicate=8, dp_shard=8)),
    (64, dict(dp_shard=16, cp=4)),
    (64, dict(dp_shard=8, cp=8)),
    (64, dict(dp_shard=8, tp=2, cp=4)),
]
QWEN_LAYOUTS = [
    (8, dict(dp_shard=8)),
    (8, dict(dp_shard=2, tp=4)),
    (8, dict(tp=8)),
    (8, dict(pp=8)),
    (8, dict(pp=2, tp=4)),
    (32, dict(dp_shard=32)),
    (32, dict(dp_shard=8, tp=4)),
    (32, dict(dp_shard=4, tp=8)),
    (64, dict(dp_shard=64, ac="none")),
    (64, dict(dp_shard=64)),
    (64, dict(dp_shard=64, bf16_params=True)),
    (64, dict(dp_replicate=8, dp_shard=8)),
    (64, dict(dp_shard=16, tp=4)),
    (64, dict(dp_shard=8, tp=8)),
    (64, dict(dp_shard=8, tp=4, cp=2)),
    (64, dict(dp_shard=4, tp=8, cp=2, cp_algo="ring")),
    (64, dict(dp_shard=8, pp=8)),
    (64, dict(dp_shard=4, pp=16, pp_schedule="interleaved_1f1b", virtual_stages=2)),
    (64, dict(dp_shard=2, pp=4, tp=8)),
    (64, dict(dp_shard=2, pp=4, tp=4, cp=2)),
]


def layout_label(kw: dict) -> str:
    """Short layout name. Example: `layout_label({"dp_shard": 4, "cp": 2})` -> "dp_shard 4, cp 2 ulysses"."""
    parts = [f"{k} {kw[k]}" for k in ("dp_replicate", "dp_shard") if kw.get(k, 1) > 1]
    if kw.get("tp", 1) > 1:
        parts.append(f"tp {kw['tp']} +SP")
    if kw.get("cp", 1) > 1:
        parts.append(f"cp {kw['cp']} {kw.get('cp_algo', 'ulysses')}")
    if kw.get("pp", 1) > 1:
        v = kw.get("virtual_stages", 1)
        parts.append(f"pp {kw['pp']}" + (f"x{v}" if v > 1 else "") + f" {kw.get('pp_schedule', '1f1b')}")
    if kw.get("autocast_cache") is False:
        parts.append("no autocast cache")
    if kw.get("bf16_params"):
        parts.append("bf16 params")
    return ", ".join(parts) or "1 GPU"


def format_table(model: str, seq_len: int, layouts, **extra) -> str:
    """One markdown table, a row per layout, GiB on the busiest rank.

    Example: `print(format_table("wan2.1-14b", 32760, WAN_LAYOUTS))`.
    """
    rows = [
        "| GPUs | layout | AC | params | grads | AdamW | activations | logits | autocast cache "
        "| fwd / bwd working | total | fits 80 GB |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for gpus, kw in layouts:
        kw = dict(kw)
        ac = kw.pop("ac", "full")
        ac_name = f"selective k={kw['ac_every_k']}" if ac == "selective" else ac
        world = math.prod(kw.get(k, 1) for k in ("dp_replicate", "dp_shard", "tp", "pp", "cp"))
        assert world == gpus, (gpus, kw)
        label = layout_label(kw)
        try:
            m = estimate_memory(model, seq_len=seq_len, ac=ac, **kw, **extra)
        except ValueError as e:  # LayoutError included
            rows.append(f"| {gpus} | {label} | {ac_name} | invalid: {e} |")
            continue
        if kw.get("pp", 1) > 1:
            label += f" (stage {m['stage']})"
        fits = "yes" if m["total"] <= USABLE * CARD_GIB else "no"
        cols = [
            f"{m[k]:.1f}" for k in ("params", "grads", "optimizer", "activations", "logits", "autocast_cache")
        ]
        cols.append(f"{m['fwd_working']:.1f} / {m['bwd_working']:.1f}")
        rows.append(f"| {gpus} | {label} | {ac_name} | {' | '.join(cols)} | **{m['total']:.1f}** | {fits} |")
    return "\n".join(rows)


def all_tables() -> str:
    """The tables of docs/parallel.md, as markdown. Example: `print(all_tables())`."""
    out = []
    for title, model, seq in TABLES:
        s = model_stats(model)
        layouts = WAN_LAYOUTS if s.kind == "dit" else QWEN_LAYOUTS
        out.append(
            f"#### {title}\n\n{s.total_params / 1e9:.2f}B parameters; GiB on the busiest rank (estimate).\n"
        )
        out.append(format_table(model, seq, layouts) + "\n")
    cp_rows = [(8, dict(dp_shard=4, cp=2)), (8, dict(cp=8)), (64, dict(dp_shard=8, cp=8))]
    out.append(
        '#### Context parallelism with today\'s CUDA block kernel (`cp_kernel="math"`), Wan2.1-14B 720p\n\n'
        "The same layouts as above when each attention block materializes fp32 scores.\n"
    )
    out.append(format_table("wan2.1-14b", wan_seq_len(81, 720, 1280), cp_rows, cp_kernel="math") + "\n")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """`python -m mmkit.tools.memory --table`, or one layout:
    `python -m mmkit.tools.memory --model wan2.1-14b --seq-len 75600 --dp-shard 4 --cp 2`."""
    ap = argparse.ArgumentParser(prog="python -m mmkit.tools.memory", description=__doc__.split("\n")[0])
    ap.add_argument("--table", action="store_true", help="print the tables of docs/parallel.md")
    ap.add_argument("--model", default="wan2.1-14b", help=f"one of {', '.join(models())}")
    ap.add_argument("--seq-len", type=int, default=wan_seq_len(81, 480, 832))
    for name in ("dp-shard", "dp-replicate", "tp", "pp", "cp", "micro-batch", "virtual-stages"):
        ap.add_argument(f"--{name}", type=int, default=1)
    ap.add_argument("--ac", default="full", choices=AC_MODES)
    ap.add_argument("--ac-every-k", type=int, default=2)
    ap.add_argument("--cp-algo", default="ulysses", choices=("ulysses", "ring", "hybrid"))
    ap.add_argument("--ulysses-degree", type=int, default=None)
    ap.add_argument("--pp-schedule", default="1f1b", choices=SCHEDULES)
    ap.add_argument("--microbatches", type=int, default=None)
    ap.add_argument("--image-tokens", type=int, default=0)
    ap.add_argument("--supervised", type=float, default=1.0)
    ap.add_argument("--ema", action="store_true")
    ap.add_argument("--no-autocast-cache", action="store_true")
    ap.add_argument("--bf16-params", action="store_true")
    ap.add_argument("--cp-kernel", default="flash", choices=("flash", "math"))
    a = ap.parse_args(argv)
    if a.table:
        print(all_tables())
        return 0
    try:
        m = estimate_memory(
            a.model, seq_len=a.seq_len, dp_shard=a.dp_shard, dp_replicate=a.dp_replicate, tp=a.tp, pp=a.pp,
            cp=a.cp, micro_batch=a.micro_batch, ac=a.ac, ac_every_k=a.ac_every_k, cp_algo=a.cp_algo,
            ulysses_degree=a.ulysses_degree, virtual_stages=a.virtual_stages, pp_schedule=a.pp_schedule,
            microbatches=a.microbatches, image_tokens=a.image_tokens, supervised=a.supervised, ema=a.ema,
            autocast_cache=not a.no_autocast_cache, bf16_params=a.bf16_params, cp_kernel=a.cp_kernel,
        )  # fmt: skip
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for k, v in m.items():
        print(f"{k:16s} {v:.2f}" if isinstance(v, float) else f"{k:16s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
