"""tp/pp split + merge of mmkit state dicts (mmkit.checkpoint.layouts): placement, exact inverse, the maths of
the TP rules, and the layout errors training raises too."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmkit.checkpoint.layouts import (
    Layout,
    LayoutError,
    merge_states,
    placement,
    plan_layout,
    shard_bounds,
    split_state,
    tp_dim,
)
from mmkit.models.qwen2_5_vl.model import Qwen2_5_VLModel
from mmkit.models.qwen2_5_vl.tiny import perturbed_init, tiny_config
from mmkit.models.wan.config import WanConfig
from mmkit.models.wan.model import WanTransformer
from mmkit.models.wan.tiny import TINY_DIT


def _wan(num_layers=2, i2v=True) -> tuple[WanConfig, dict]:
    d = dict(TINY_DIT, num_layers=num_layers)
    if i2v:
        d.update(in_channels=36, image_dim=32, added_kv_proj_dim=64)
    cfg = WanConfig.from_dict(d)
    torch.manual_seed(0)
    model = WanTransformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # norms and biases away from 1 / 0
    return cfg, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _qwen(tied=False) -> tuple:
    cfg = tiny_config()
    cfg.tie_word_embeddings = tied
    torch.manual_seed(0)
    model = Qwen2_5_VLModel(cfg)
    perturbed_init(model, seed=1)
    return cfg, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------------------
def test_tp_rules_match_the_dtensor_plans():
    wan = {
        "blocks.3.attn.q.weight": 0,
        "blocks.3.attn.v.bias": 0,
        "blocks.3.cross.k_img.weight": 0,
        "blocks.3.cross.v_img.bias": 0,
        "blocks.3.mlp.fc1.bias": 0,
        "blocks.3.attn.out.weight": 1,
        "blocks.3.cross.out.weight": 1,
        "blocks.3.mlp.fc2.weight": 1,
        "blocks.3.attn.norm_k.weight": 0,
        "blocks.3.cross.norm_k_img.weight": 0,
        "blocks.3.attn.out.bias": None,  # rowwise bias: added once
        "blocks.3.mlp.fc2.bias": None,
        "blocks.3.norm_cross.weight": None,
        "blocks.3.modulation": None,
        "head.proj.weight": None,
        "patch_embed.weight": None,
    }
    qwen = {
        "language.layers.1.attn.q_proj.weight": 0,
        "language.layers.1.attn.k_proj.bias": 0,
        "language.layers.1.attn.o_proj.weight": 1,
        "language.layers.1.mlp.gate_proj.weight": 0,
        "language.layers.1.mlp.up_proj.weight": 0,
        "language.layers.1.mlp.down_proj.weight": 1,
        "language.embed_tokens.weight": 0,
        "language.lm_head.weight": 0,
        "language.layers.1.attn_norm.weight": None,
        "language.norm.weight": None,
        "visual.blocks.0.attn.qkv.weight": None,  # the vision tower is replicated
        "visual.merger.fc1.weight": None,
    }
    for family, table in (("wan", wan), ("qwen2_5_vl", qwen)):
        for name, dim in table.items():
            assert tp_dim(family, name) == dim, (family, name)


def test_shard_bounds_follow_dtensor_chunking():
    for size, tp in ((10, 4), (8, 2), (7, 3), (2, 4)):
        pieces = [shard_bounds(size, tp, r) for r in range(tp)]
        chunks = torch.arange(size).chunk(tp)
        for r, (a, b) in enumerate(pieces):
            want = chunks[r].tolist() if r < len(chunks) else []
            assert list(range(a, b)) == want, (size, tp, r)


@torch.no_grad()
def test_tp_pieces_compute_the_full_layer():
    """Colwise-then-rowwise pieces, summed over ranks (+ the bias once), give the unsplit MLP exactly
    in exact arithmetic; this is what makes the rules right, not only invertible."""
    cfg, state = _wan()
    layout = plan_layout("wan", cfg, tp=2)
    shards = split_state(state, layout)
    x = torch.randn(3, cfg.dim, dtype=torch.float64)
    p = "blocks.1.mlp."

    def mlp(sd):
        h = F.gelu(x @ sd[p + "fc1.weight"].double().T + sd[p + "fc1.bias"].double(), approximate="tanh")
        return h @ sd[p + "fc2.weight"].double().T

    full = mlp(state) + state[p + "fc2.bias"].double()
    split = sum(mlp(shards[(t, 0)]) for t in range(2)) + shards[(0, 0)][p + "fc2.bias"].double()
    torch.testing.assert_close(split, full, rtol=1e-12, atol=1e-12)

    qcfg, qstate = _qwen()
    qshards = split_state(qstate, plan_layout("qwen2_5_vl", qcfg, tp=2))
    y = torch.randn(3, qcfg.text.hidden_size, dtype=torch.float64)
    m = "language.layers.0.mlp."

    def swiglu(sd):
        g, u, dn = (sd[m + n + "_proj.weight"].double() for n in ("gate", "up", "down"))
        return (F.silu(y @ g.T) * (y @ u.T)) @ dn.T

    torch.testing.assert_close(sum(swiglu(qshards[(t, 0)]) for t in range(2)), swiglu(qstate))
    # q/k/v pieces are whole heads: rank 1 holds heads 2, 3 of q and KV head 1
    hd = qcfg.text.head_dim
    q, k = "language.layers.0.attn.q_proj.weight", "language.layers.0.attn.k_proj.weight"
    assert torch.equal(qshards[(1, 0)][q], qstate[q][2 * hd :])
    assert torch.equal(qshards[(1, 0)][k], qstate[k][hd:])


# ---------------------------------------------------------------------------------------------------
# Split / merge
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tp, pp_layers", [(1, None), (2, None), (1, [1, 1]), (2, [[1, 1]]), (2, [[1], [1]])])
def test_wan_split_merge_is_exact(tp, pp_layers):
    cfg, state = _wan()
    layout = plan_layout("wan", cfg, tp=tp, pp_layers=pp_layers)
    shards = split_state(state, layout)
    assert set(shards) == set(layout.ranks)
    expected = {k: tuple(v.shape) for k, v in state.items()}
    _assert_same(merge_states(shards, layout, expected), state)


def test_wan_virtual_stages_place_chunks_round_robin():
    """pp 2 x virtual 2 on 4 layers: [[a, b], [c, d]] -> stages a, b, c, d; rank 0 runs a and c."""
    cfg, state = _wan(num_layers=4)
    layout = plan_layout("wan", cfg, tp=2, pp_layers=[[1, 1], [1, 1]])
    assert (layout.pp, layout.vpp, layout.stages) == (2, 2, [1, 1, 1, 1])
    shards = split_state(state, layout)
    blocks = {r: sorted({k.split(".")[1] for k in shards[(0, r)] if k.startswith("blocks.")}) for r in (0, 1)}
    assert blocks == {0: ["0", "2"], 1: ["1", "3"]}  # global names, no renumbering
    assert "patch_embed.weight" in shards[(0, 0)] and "image_embed.fc1.weight" in shards[(0, 0)]
    assert "head.proj.weight" in shards[(0, 1)] and "head.proj.weight" not in shards[(0, 0)]
    _assert_same(merge_states(shards, layout), state)
    # the same 4 layers as [[3, 1]]: pp 2, rank 0 holds blocks 0-2
    flat = plan_layout("wan", cfg, pp_layers=[[3, 1]])
    assert flat.stages == [3, 1] and placement("blocks.2.attn.q.weight", flat) == [0]


def test_qwen_pipeline_placement_and_tied_head():
    cfg, state = _qwen(tied=True)
    layout = plan_layout("qwen2_5_vl", cfg, tp=2, pp_layers=[1, 1])
    assert layout.vit_pp_layers == [2, 0]  # default: the vision tower on stage 0
    shards = split_state(state, layout)
    first, last = shards[(1, 0)], shards[(1, 1)]
    assert all(k in first for k in state if k.startswith("visual."))
    assert "language.embed_tokens.weight" in first and "language.layers.1.mlp.up_proj.weight" in last
    # tied: the last stage keeps the embedding's piece under the head's name
    assert torch.equal(last["language.lm_head.weight"], first["language.embed_tokens.weight"])
    back = merge_states(shards, layout, {k: tuple(v.shape) for k, v in state.items()})
    _assert_same(back, state)
    # one pipeline rank: only the embedding is stored (safetensors refuses shared tensors)
    one = plan_layout("qwen2_5_vl", cfg, tp=2)
    assert all("language.lm_head.weight" not in s for s in split_state(state, one).values())
    _assert_same(merge_states(split_state(state, one), one), state)
    # a state without the tied head (as some loaders give it) splits the same way
    no_head = {k: v for k, v in state.items() if k != "language.lm_head.weight"}
    _assert_same(merge_states(split_state(no_head, layout), layout), state)


def test_layout_roundtrips_through_its_dict():
    cfg, _ = _wan(num_layers=4)
    layout = plan_layout("wan", cfg, tp=2, pp_layers=[[1, 1], [1, 1]])
    assert Layout.from_dict(layout.to_dict()) == layout


# ---------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------
def test_impossible_layouts_name_the_field():
    qcfg, _ = _qwen()  # 4 heads, 2 KV heads, 2 layers, vision depth 2
    cases = [
        (dict(tp=3), "parallel.tp=3.*key/value heads"),
        (dict(pp_layers=[1, 2]), "pp_layers=.*3 layers but the model has 2"),
        (dict(pp_layers=[2, 0]), "stage 1 has no layers"),
        (dict(pp=3), "parallel.pp=3 stages but the model has 2 layers.*at most 2 stages"),
        (dict(pp=3, pp_layers=[1, 1]), "parallel.pp=3 stages but the model has 2 layers"),  # no bad hint
        (dict(pp_layers=[1, 1], vit_pp_layers=[1, 1]), "vision tower .* stage 0"),
        (dict(tp=0), "parallel.tp=0: must be a positive integer"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(LayoutError, match=msg):
            plan_layout("qwen2_5_vl", qcfg, **kwargs)
    wcfg, _ = _wan()  # 2 heads
    with pytest.raises(LayoutError, match="--tp=4"):
        plan_layout("wan", wcfg, tp=4, names={"parallel.tp": "--tp"})
    with pytest.raises(LayoutError, match="vit_pp_layers applies to qwen2_5_vl only"):
        plan_layout("wan", wcfg, vit_pp_layers=[[2]])
    with pytest.raises(LayoutError, match="virtual|inner list"):
        plan_layout("wan", _wan(num_layers=4)[0], pp_layers=[[1, 1], [2]])


def test_merge_refuses_incomplete_or_inconsistent_shards():
    cfg, state = _wan()
    layout = plan_layout("wan", cfg, tp=2, pp_layers=[1, 1])
    shards = split_state(state, layout)
    with pytest.raises(LayoutError, match="missing: mp_rank_01_001"):
        merge_states({r: s for r, s in shards.items() if r != (1, 1)}, layout)
    bad = {r: dict(s) for r, s in shards.items()}
    bad[(1, 0)]["patch_embed.bias"] = bad[(1, 0)]["patch_embed.bias"] + 1
    with pytest.raises(LayoutError, match="replicated tensor differs"):
        merge_states(bad, layout)
    moved = {r: dict(s) for r, s in shards.items()}
    for t in range(2):
        moved[(t, 0)]["head.proj.bias"] = moved[(t, 1)].pop("head.proj.bias")
    with pytest.raises(LayoutError, match=r"mp_rank_00_000 holds head.proj.bias.*rank\(s\) \[1\]"):
        merge_states(moved, layout)
    lost = {r: dict(s) for r, s in shards.items()}
    for t in range(2):
        del lost[(t, 1)]["head.proj.bias"]
    with pytest.raises(LayoutError, match="1 missing"):
        merge_states(lost, layout, {k: tuple(v.shape) for k, v in state.items()})
    uneven = {r: dict(s) for r, s in shards.items()}
    del uneven[(1, 0)]["blocks.0.attn.q.weight"]
    with pytest.raises(LayoutError, match="hold different tensors"):
        merge_states(uneven, layout)
