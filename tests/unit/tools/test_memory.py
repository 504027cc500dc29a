"""The memory estimator: real parameter counts, per-block activation formulas equal to the bytes autograd
actually saves in mmkit's blocks, and the divisions each parallel dimension promises."""

import doctest
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from memory_helpers import saved_bytes

from mmkit.models.qwen2_5_vl.config import TextConfig, VisionConfig
from mmkit.models.qwen2_5_vl.config import flavor as qwen_flavor
from mmkit.models.qwen2_5_vl.language import DecoderLayer
from mmkit.models.qwen2_5_vl.model import Qwen2_5_VLModel
from mmkit.models.qwen2_5_vl.vision import SegmentPlan, VisionBlock
from mmkit.models.wan.config import FLAVORS, WanConfig
from mmkit.models.wan.model import WanBlock, WanTransformer
from mmkit.parallel.dims import LayoutError
from mmkit.tools import memory
from mmkit.tools.memory import GIB, ModelStats, block_terms, estimate_memory, model_stats, wan_seq_len


def _meta_count(build) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


@pytest.mark.parametrize(
    "name, build, billions",
    [
        ("wan2.1-14b", lambda: WanTransformer(FLAVORS["14B"]), 14.29),
        ("wan2.1-1.3b", lambda: WanTransformer(FLAVORS["1.3B"]), 1.42),
        ("qwen2.5-vl-72b", lambda: Qwen2_5_VLModel(qwen_flavor("72B")), 73.41),  # HF model card: 73.4B
        ("qwen2.5-vl-7b", lambda: Qwen2_5_VLModel(qwen_flavor("7B")), 8.29),  # HF model card: 8.29B
    ],
)
def test_parameter_counts_are_the_meta_models(name, build, billions):
    s = model_stats(name)
    assert s.total_params == _meta_count(build)
    assert abs(s.total_params / 1e9 - billions) < 0.01
    # the pipeline split covers every parameter exactly once
    assert s.layers * s.layer_params + s.first_params + s.last_params == s.total_params
    assert 0 < s.layer_tp_params < s.layer_params


def test_qwen_72b_shape_is_the_published_config():
    s = model_stats("Qwen2.5-VL-72B")
    assert (s.hidden, s.ffn, s.layers, s.heads, s.kv_heads, s.vocab) == (8192, 29568, 80, 64, 8, 152064)
    assert (s.vit_layers, s.vit_hidden, s.vit_heads, s.vit_ffn) == (32, 1280, 16, 3420)
    # untied: embed_tokens (stage 0) and lm_head (last stage) are both counted
    assert s.last_params == 152064 * 8192 + 8192


def test_wan_sequence_lengths():
    assert wan_seq_len(81, 720, 1280) == 21 * 45 * 80 == 75_600
    assert wan_seq_len(81, 480, 832) == 21 * 30 * 52 == 32_760


# ---- activation formulas == bytes autograd saves -------------------------------------------------------
def _per_token(run, s1=128, s2=384) -> float:
    """Saved bytes per token: the difference of two sequence lengths cancels weights and fixed inputs."""
    return (run(s2) - run(s1)) / (s2 - s1)


class _FusedRMSNorm(torch.autograd.Function):
    """What CUDA's fused RMSNorm keeps for backward: its input and the fp32 1/rms (weight aside)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, rstd, weight)
        y = x.float() * rstd
        return (y * weight.float() if weight is not None else y).to(x.dtype)

    @staticmethod
    def backward(ctx, g):  # pragma: no cover - only forward's saved tensors are measured
        raise NotImplementedError


def _cuda_autocast(monkeypatch, fused_rms_norm: bool):
    """Make CPU autocast treat the norms as CUDA autocast does (the estimate targets CUDA):
    layer_norm is on CUDA's float32 list (inputs cast to fp32, fp32 output); rms_norm runs fused when
    weight and input dtypes match, composite otherwise."""
    layer_norm, rms_norm = F.layer_norm, F.rms_norm

    def ln(x, shape, weight=None, bias=None, eps=1e-5):
        if torch.is_autocast_enabled("cpu"):
            f32 = [t.float() if t is not None else None for t in (x, weight, bias)]
            with torch.autocast("cpu", enabled=False):
                return layer_norm(f32[0], shape, f32[1], f32[2], eps)
        return layer_norm(x, shape, weight, bias, eps)

    def rms(x, shape, weight=None, eps=None):
        if fused_rms_norm and (weight is None or weight.dtype == x.dtype):
            return _FusedRMSNorm.apply(x, weight, 1e-6 if eps is None else eps)
        return rms_norm(x, shape, weight, eps)

    monkeypatch.setattr(F, "layer_norm", ln)
    monkeypatch.setattr(F, "rms_norm", rms)


def _stats(**kw) -> ModelStats:
    base = dict(
        name="tiny", family="x", kind="dit", hidden=0, ffn=0, heads=0, kv_heads=0, head_dim=64, layers=1
    )
    base.update(total_params=0, layer_params=0, layer_tp_params=0, first_params=0, last_params=0)
    return ModelStats(**{**base, **kw})


def _formula(kind, stats, bf16_params, fused) -> float:
    seq, gathered, tp, _ = block_terms(kind, stats, bf16_params, fused)
    return seq + gathered + tp


@pytest.mark.parametrize("heads, ffn", [(2, 256), (4, 384)])
@pytest.mark.parametrize("bf16_params, fused", [(False, False), (True, True)])
@pytest.mark.parametrize("lean", [False, True], ids=["autograd", "recompute_hidden"])
def test_wan_block_formula_equals_saved_bytes(monkeypatch, heads, ffn, bf16_params, fused, lean):
    _cuda_autocast(monkeypatch, fused_rms_norm=fused)
    cfg = WanConfig(num_attention_heads=heads, attention_head_dim=64, ffn_dim=ffn, num_layers=1)
    torch.manual_seed(0)
    block = WanBlock(cfg)
    block.recompute_hidden = lean  # what selective AC turns on
    if bf16_params:
        block.to(torch.bfloat16)
    dim = cfg.dim
    e, ctx = torch.randn(1, 6, dim), torch.randn(1, 16, dim, dtype=torch.bfloat16)

    def run(s):
        x = torch.randn(1, s, dim, dtype=torch.bfloat16, requires_grad=True)  # the residual stream is bf16
        rope = torch.randn(s, 64, dtype=torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return saved_bytes(lambda: block(x, e, ctx, None, (rope, rope)), ignore=[rope])

    stats = _stats(hidden=dim, ffn=ffn, heads=heads, kv_heads=heads)
    kind = "wan_lean" if lean else "wan"
    assert _per_token(run) == pytest.approx(_formula(kind, stats, bf16_params, fused), rel=1e-6)


def test_wan_lean_block_with_head_sharded_norms_formula(monkeypatch, tmp_path):
    """The lean block as a tensor-parallel plan runs it: q/k RMSNorms replaced by the head-sharded ones
    (a 1-process group: the same ops and saved tensors, nothing divided)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import mmkit.models.wan.model as wan_model
    from mmkit.parallel.tp import HeadShardedRMSNorm

    _cuda_autocast(monkeypatch, fused_rms_norm=False)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        cfg = WanConfig(num_attention_heads=2, attention_head_dim=64, ffn_dim=256, num_layers=1)
        torch.manual_seed(0)
        block = WanBlock(cfg)
        for attn, names in ((block.attn, ("norm_q", "norm_k")), (block.cross, ("norm_q",))):
            for name in names:
                setattr(attn, name, HeadShardedRMSNorm(getattr(attn, name), mesh))
        block.recompute_hidden = True
        monkeypatch.setattr(wan_model, "_plain", lambda *p: True)  # the norms' DTensor weights aside
        dim = cfg.dim
        e, ctx = torch.randn(1, 6, dim), torch.randn(1, 16, dim, dtype=torch.bfloat16)

        def run(s):
            x = torch.randn(1, s, dim, dtype=torch.bfloat16, requires_grad=True)
            rope = torch.randn(s, 64, dtype=torch.bfloat16)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return saved_bytes(lambda: block(x, e, ctx, None, (rope, rope)), ignore=[rope])

        stats = _stats(hidden=dim, ffn=256, heads=2, kv_heads=2)
        assert _per_token(run) == pytest.approx(_formula("wan_lean_tp", stats, False, False), rel=1e-6)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("heads, kv, ffn", [(4, 2, 256), (8, 4, 384)])
@pytest.mark.parametrize("bf16_params", [False, True])
def test_qwen_decoder_layer_formula_equals_saved_bytes(monkeypatch, heads, kv, ffn, bf16_params):
    _cuda_autocast(monkeypatch, fused_rms_norm=True)  # no LayerNorm; RMSNorm without weight: same bytes
    cfg = TextConfig(
        hidden_size=heads * 64,
        intermediate_size=ffn,
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        mrope_section=(8, 12, 12),
    )
    torch.manual_seed(0)
    layer = DecoderLayer(cfg, 0)
    # fp32 parameters: the embedding output, hence the residual stream, is fp32 under autocast
    dtype = torch.bfloat16 if bf16_params else torch.float32
    if bf16_params:
        layer.to(torch.bfloat16)

    def run(s):
        x = torch.randn(1, s, cfg.hidden_size, dtype=dtype, requires_grad=True)
        rope = torch.randn(1, s, 64, dtype=torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return saved_bytes(lambda: layer(x, rope, rope, None), ignore=[rope])

    stats = _stats(hidden=cfg.hidden_size, ffn=ffn, heads=heads, kv_heads=kv)
    assert _per_token(run) == pytest.approx(_formula("llm", stats, bf16_params, bf16_params), rel=1e-6)


@pytest.mark.parametrize("bf16_params", [False, True])
def test_vit_block_formula_equals_saved_bytes(monkeypatch, bf16_params):
    _cuda_autocast(monkeypatch, fused_rms_norm=True)
    cfg = VisionConfig(
        hidden_size=256, num_heads=4, intermediate_size=320, depth=1, fullatt_block_indexes=(0,)
    )
    torch.manual_seed(0)
    block = VisionBlock(cfg)
    if bf16_params:
        block.to(torch.bfloat16)

    def run(n):
        x = torch.randn(n, 256, dtype=torch.bfloat16, requires_grad=True)  # patch_embed output: bf16
        rope = torch.randn(n, 1, 64)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return saved_bytes(lambda: block(x, rope, rope, SegmentPlan([0, n], x.device)), ignore=[rope])

    stats = _stats(vit_hidden=256, vit_ffn=320, vit_heads=4)
    assert _per_token(run) == pytest.approx(_formula("vit", stats, bf16_params, bf16_params), rel=1e-6)


# ---- what each parallel dimension divides ----------------------------------------------------------------
def test_hand_computed_case():
    """Wan2.1-14B on 8 GPUs, FSDP over all 8, full checkpointing, 480p: every term by hand."""
    m = estimate_memory("wan2.1-14b", dp_shard=8, seq_len=32_760, ac="full", autocast_cache=True)
    st = model_stats("wan2.1-14b")
    n, h, f, heads, s = 14_288_491_584, 5120, 13824, 40, 32_760
    assert m["params"] * GIB == pytest.approx(4 * n / 8)
    assert m["optimizer"] * GIB == pytest.approx(8 * n / 8)
    # saved: 40 block inputs (bf16 residual) + RoPE cos/sin (2 x 128 bf16) + head (fp32 LayerNorm input
    # + bf16 proj input)
    assert m["activations"] * GIB == pytest.approx(s * (40 * 2 * h + 4 * 128 + 6 * h))
    # with the cache on, autocast keeps a bf16 copy of all 14.29B weights until the forward ends
    # (the trainer turns it off under FSDP2: the default below)
    assert m["autocast_cache"] * GIB == pytest.approx(2 * n)
    assert estimate_memory("wan2.1-14b", dp_shard=8, seq_len=32_760, ac="full")["autocast_cache"] == 0
    # backward: one block recomputed (66h + 4f + small terms per token), its bf16 weight copies, two
    # gathered fp32 blocks + one block's fp32 grads, the root unit gathered + the head's grads
    block = st.layer_params
    root = st.first_params + st.last_params
    recompute = s * (66 * h + 4 * f + 24 + 12 + 8 * heads)
    bwd = recompute + 2 * block + 12 * block + 4 * root + 4 * st.last_params
    assert m["bwd_working"] * GIB == pytest.approx(bwd)
    assert m["fwd_working"] * GIB == pytest.approx(8 * block + 4 * root)
    state = 16 * n / 8
    assert m["total"] * GIB == pytest.approx(
        state + m["activations"] * GIB + max(2 * n + 8 * block + 4 * root, bwd)
    )
    assert round(m["total"], 1) == 70.2


def test_autocast_cache_keeps_weight_copies_until_forward_ends():
    """Why `autocast_cache` is counted: even with every block checkpointed, autocast's cache holds the
    bf16 copy of each fp32 weight until the autocast region exits (mmkit's trainer wraps the forward)."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.checkpoint import checkpoint

    class Casts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.refs = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if (
                func is torch.ops.aten._to_copy.default
                and out.dtype == torch.bfloat16
                and out.shape == (32, 32)
            ):
                self.refs.append(weakref.ref(out))
            return out

    layers = torch.nn.ModuleList(torch.nn.Linear(32, 32, bias=False) for _ in range(3))
    for cache, alive in ((True, 3), (False, 0)):
        x, casts = torch.randn(4, 32, requires_grad=True), Casts()
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=cache):
            with casts:
                for layer in layers:
                    x = checkpoint(layer, x, use_reentrant=False)
            assert sum(r() is not None for r in casts.refs) == alive
        assert sum(r() is not None for r in casts.refs) == 0  # freed when autocast exits


def test_dp_shard_divides_params_grads_and_optimizer():
    one = estimate_memory("qwen2.5-vl-7b", dp_shard=2, seq_len=4096)
    eight = estimate_memory("qwen2.5-vl-7b", dp_shard=16, seq_len=4096)
    for k in ("params", "grads", "optimizer"):
        assert eight[k] == pytest.approx(one[k] / 8)
    assert eight["activations"] == pytest.approx(one["activations"])
    n = model_stats("qwen2.5-vl-7b").total_params
    assert eight["params"] + eight["grads"] + eight["optimizer"] == pytest.approx(16 * n / 16 / GIB)


def test_dp_replicate_copies_instead_of_sharding():
    hsdp = estimate_memory("wan2.1-14b", dp_replicate=4, dp_shard=2, seq_len=32_760)
    fsdp = estimate_memory("wan2.1-14b", dp_shard=2, seq_len=32_760)
    assert hsdp["optimizer"] == pytest.approx(fsdp["optimizer"])


def test_tp_splits_the_block_weights_and_activations():
    s = model_stats("qwen2.5-vl-72b")
    one = estimate_memory("qwen2.5-vl-72b", dp_shard=8, seq_len=8192, autocast_cache=True)
    four = estimate_memory("qwen2.5-vl-72b", dp_shard=8, tp=4, seq_len=8192, autocast_cache=True)
    # the Qwen plan splits the decoder layers' Linear weights, and the (untied) embedding and LM head
    # over vocabulary rows; the ViT stays whole
    saved = (s.layers * s.layer_tp_params + 2 * s.vocab * s.hidden) * (1 - 1 / 4)
    assert (one["params"] - four["params"]) * GIB == pytest.approx(4 * saved / 8)
    assert (one["autocast_cache"] - four["autocast_cache"]) * GIB == pytest.approx(2 * saved)
    assert four["activations"] < one["activations"] / 3  # all but the gathered Linear inputs / 4
    assert four["logits"] == pytest.approx(one["logits"] / 4)  # the LM head scores this rank's tokens


def test_cp_splits_activations_and_joins_the_fsdp_group():
    dp = estimate_memory("qwen2.5-vl-7b", dp_shard=8, seq_len=8192)
    cp = estimate_memory("qwen2.5-vl-7b", dp_shard=4, cp=2, seq_len=8192)
    assert cp["optimizer"] == pytest.approx(dp["optimizer"])  # FSDP shards over dp_shard x cp
    assert cp["activations"] == pytest.approx(dp["activations"] / 2)
    assert cp["logits"] == pytest.approx(dp["logits"] / 2)
    assert cp["tokens_per_rank"] == 4096
    # sequences are padded to a multiple of cp (x tp with sequence parallelism)
    assert estimate_memory("wan2.1-14b", dp_shard=1, cp=8, seq_len=75_601)["tokens_per_rank"] == 9451


def test_checkpointing_modes_order():
    kw = dict(model="wan2.1-1.3b", dp_shard=8, seq_len=32_760)
    none, sel, full = (estimate_memory(**kw, ac=a)["activations"] for a in ("none", "selective", "full"))
    assert full < sel < none
    sel3 = estimate_memory(**kw, ac="selective", ac_every_k=3)["activations"]
    assert sel < sel3 < none  # checkpointing fewer blocks keeps more


def test_pipeline_in_flight_microbatches():
    """1F1B: stage 0 holds pp micro-batches of its L/pp layers = all L layers; interleaved adds
    (pp - 1) / (pp v) of that (Korthikanti et al.); GPipe holds every micro-batch."""
    kw = dict(model="wan2.1-14b", seq_len=8192, ac="none", dp_shard=2)
    flat = estimate_memory(**kw)["activations"]
    pp4 = estimate_memory(**kw, pp=4)
    inter = estimate_memory(**kw, pp=4, virtual_stages=2, pp_schedule="interleaved_1f1b")
    gpipe = estimate_memory(**kw, pp=4, pp_schedule="gpipe", microbatches=8)
    assert pp4["stage"] == 0 and pp4["activations"] == pytest.approx(flat, rel=0.02)
    assert inter["activations"] == pytest.approx(flat * (1 + 3 / 8), rel=0.02)
    assert gpipe["activations"] == pytest.approx(flat * 2, rel=0.02)
    st = model_stats("wan2.1-14b")  # stage 0: 10 blocks + the embeddings, sharded over dp_shard 2
    assert pp4["params"] * GIB == pytest.approx(4 * (10 * st.layer_params + st.first_params) / 2)


def test_pipeline_with_tensor_parallel_divides_the_stage():
    # pp x tp: a stage holds 1/pp of the layers, each split over tp; the busiest rank holds about 1/(pp*tp)
    one = estimate_memory("qwen2.5-vl-72b", seq_len=1024)["params"]
    both = estimate_memory("qwen2.5-vl-72b", tp=8, pp=8, seq_len=1024)
    assert 1 / 64 < both["params"] / one < 2 / 64  # stage 0 also holds the ViT, replicated over tp
    assert both["tokens_per_rank"] == 1024


def test_layout_errors_name_the_field():
    with pytest.raises(LayoutError, match="parallel.tp=16"):
        estimate_memory("wan2.1-14b", tp=16, seq_len=1024)
    with pytest.raises(LayoutError, match="parallel.cp=3"):
        estimate_memory("wan2.1-14b", cp=3, seq_len=1024)
    with pytest.raises(LayoutError, match="kv|key/value"):
        estimate_memory("qwen2.5-vl-72b", tp=16, seq_len=1024)
    with pytest.raises(LayoutError, match="pp_layers"):
        estimate_memory("wan2.1-14b", pp=2, pp_layers=[10, 20], seq_len=1024)
    with pytest.raises(LayoutError, match="parallel.tp=16"):
        estimate_memory("wan2.1-14b", tp=16, pp=2, seq_len=1024)  # checked with pipeline stages too
    with pytest.raises(ValueError, match="unknown"):
        estimate_memory("llama-70b", seq_len=1024)
    with pytest.raises(ValueError, match="ac="):
        estimate_memory("wan2.1-14b", ac="some", seq_len=1024)


def test_docstring_examples_and_doc_tables_are_current(capsys):
    assert doctest.testmod(memory, optionflags=doctest.ELLIPSIS).failed == 0
    assert memory.main(["--table"]) == 0
    tables = capsys.readouterr().out.strip()
    doc = (Path(__file__).parents[3] / "docs" / "parallel.md").read_text()
    assert tables in doc, "docs/parallel.md is stale: paste `python -m mmkit.tools.memory --table`"
    assert re.search(r"\| 64 \| dp_shard 8, cp 8 ulysses \| full \|", tables)
