"""Pipeline parallelism (mmkit/parallel/pp.py, pp_stages.py).

Single process: the layer plan and its errors; stages hold the model's own submodules under the
model's names (their state_dict keys partition the model's); stages chained by hand reproduce the
model's output and loss. Two processes (gloo, `_pp_worker.py`): every schedule gives the single-device
summed loss, per-parameter gradients and gradient norm (Wan t2v/i2v, Qwen2.5-VL packed rows with and
without images, tied embeddings, uneven and virtual stages, repeated steps, a shape change).
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmkit.models.qwen2_5_vl.model import Qwen2_5_VLModel
from mmkit.models.qwen2_5_vl.tiny import perturbed_init, tiny_config
from mmkit.models.qwen2_5_vl.tokenizer import build_tiny_tokenizer
from mmkit.models.wan.config import WanConfig
from mmkit.models.wan.model import WanTransformer
from mmkit.models.wan.tiny import TINY_DIT
from mmkit.parallel.pp import plan_layers, split_stages

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_pp_worker.py")


# ---- layer plan ---------------------------------------------------------------------------------------
def test_plan_layers():
    assert plan_layers(4, 2, None) == [[0, 1], [2, 3]]
    assert plan_layers(5, 2, None) == [[0, 1], [2, 3, 4]]  # the remainder goes to later stages
    assert plan_layers(6, 2, None, virtual=2) == [[0], [1], [2, 3], [4, 5]]
    assert plan_layers(4, 2, [1, 3]) == [[0], [1, 2, 3]]
    assert plan_layers(6, 2, [[1, 2], [2, 1]]) == [[0], [1, 2], [3, 4], [5]]


@pytest.mark.parametrize(
    "n, pp, layers, match",
    [
        (4, 2, [1, 2], "sums to 3 but the model has 4"),
        (4, 2, [0, 4], "stage 0 would hold 0 layers"),
        (4, 2, [[1, 1], [2, 0]], "stage 3 would hold 0 layers"),
        (4, 2, [1, 1, 2], "3 layer counts in .* but parallel.pp=2"),
        (4, 2, [[2, 2], [1]], "1 layer counts"),
        (4, 2, [[2, 2], 1], "not a mix"),
        (2, 4, None, "only 2 layers"),
    ],
)
def test_plan_layers_errors(n, pp, layers, match):
    with pytest.raises(ValueError, match=match):
        plan_layers(n, pp, layers)


# ---- tiny models --------------------------------------------------------------------------------------
def _wan(num_layers=4, i2v=False):
    torch.manual_seed(0)
    kw = dict(TINY_DIT, num_layers=num_layers, patch_size=tuple(TINY_DIT["patch_size"]))
    if i2v:
        kw.update(in_channels=36, image_dim=32, added_kv_proj_dim=64)
    model = WanTransformer(WanConfig(**kw))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off the init: zero biases, unit norms and the zero image pos-embed move too
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def qwen_ids():
    with tempfile.TemporaryDirectory() as tmp:
        return build_tiny_tokenizer(tmp)


def _qwen(ids, num_layers=4, tie=False):
    cfg = tiny_config(ids, num_hidden_layers=num_layers)
    cfg.tie_word_embeddings = tie
    torch.manual_seed(0)
    model = Qwen2_5_VLModel(cfg)
    perturbed_init(model, seed=1)
    return model


def _all_stages(model, family, pp, layers):
    return [s for r in range(pp) for s in split_stages(model, family, pp, r, layers)]


# ---- split_stages -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "family, tie, pp, layers",
    [
        ("wan", False, 2, [1, 3]),
        ("wan", False, 2, [[1, 1], [1, 1]]),
        ("wan-i2v", False, 3, None),
        ("qwen2_5_vl", False, 2, [[1, 1], [1, 1]]),
        ("qwen2_5_vl", True, 2, [3, 1]),
    ],
)
def test_stage_state_dicts_partition_the_model(qwen_ids, family, tie, pp, layers):
    model = _qwen(qwen_ids, tie=tie) if family == "qwen2_5_vl" else _wan(i2v=family == "wan-i2v")
    stages = _all_stages(model, family.removesuffix("-i2v"), pp, layers)
    assert [s.stage_index for s in sorted(stages, key=lambda s: s.stage_index)] == list(range(len(stages)))
    full = model.state_dict()
    seen: dict[str, int] = {}
    for st in stages:
        for k, v in st.state_dict().items():
            assert k not in seen, f"{k} in stages {seen[k]} and {st.stage_index}"
            seen[k] = st.stage_index
            assert v.data_ptr() == full[k].data_ptr(), f"{k}: a copy, not the model's own tensor"
    assert set(seen) == set(full)
    last = len(stages) - 1
    if family.startswith("wan"):
        embeds = ("patch_embed.", "text_embed.", "time_embed.", "time_proj.", "image_embed.")
        assert all(seen[k] == 0 for k in full if k.startswith(embeds))
        assert all(seen[k] == last for k in full if k.startswith("head."))
        assert any(k.startswith("image_embed.") for k in full) == (family == "wan-i2v")
    else:
        assert all(seen[k] == 0 for k in full if k.startswith(("visual.", "language.embed_tokens.")))
        assert all(seen[k] == last for k in full if k.startswith(("language.norm.", "language.lm_head.")))
        if tie:  # the last stage's head is the embedding matrix itself
            head = next(s for s in stages if s.is_last).language.lm_head
            assert head.weight is model.language.embed_tokens.weight


def test_split_stages_errors():
    model = _wan(2)
    with pytest.raises(ValueError, match="model.family='llama'"):
        split_stages(model, "llama", 2, 0, None)
    with pytest.raises(ValueError, match="pp_rank=2"):
        split_stages(model, "wan", 2, 2, None)
    with pytest.raises(ValueError, match="sums to 3 but the model has 2"):
        split_stages(model, "wan", 2, 0, [1, 2])
    with pytest.raises(ValueError, match="stage 1 would hold 0 layers"):
        split_stages(model, "wan", 2, 0, [2, 0])


def test_wan_stages_chained_reproduce_the_model():
    model = _wan(4, i2v=True)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 36, 2, 4, 6, generator=gen)
    t = torch.rand(2, generator=gen) * 1000
    ctx, img = torch.randn(2, 7, 32, generator=gen), torch.randn(2, 5, 32, generator=gen)
    target = torch.randn(2, 16, 2, 4, 6, generator=gen)
    ref = model(x, t, ctx, img)
    grid = (2, 2, 3)
    acts = (x, t, ctx, img)
    for st in sorted(_all_stages(model, "wan", 2, [[1, 1], [1, 1]]), key=lambda s: s.stage_index):
        out = st(*acts, grid=grid)
        if st.is_last:
            torch.testing.assert_close(out, ref, rtol=0, atol=0)
            loss = st(*acts, grid=grid, target=target)
            torch.testing.assert_close(loss, (ref - target).pow(2).sum())
        acts = out if isinstance(out, tuple) else (out,)


def test_qwen_stages_chained_reproduce_the_model(qwen_ids):
    model = _qwen(qwen_ids, tie=True)
    cfg = model.cfg
    gen = torch.Generator().manual_seed(3)
    img = [cfg.vision_start_token_id] + [cfg.image_token_id] * 8 + [cfg.vision_end_token_id]
    a = torch.tensor([torch.randint(0, 300, (3,), generator=gen).tolist() + img + [5, 6]])
    b = torch.randint(0, 300, (1, 6), generator=gen)
    grid = torch.tensor([[1, 4, 8]])
    pos = torch.cat([model.rope_index(a, grid)[0], model.rope_index(b)[0]], 2)  # (3, 1, 21)
    ids, cu = torch.cat([a, b], 1), [0, a.shape[1], a.shape[1] + b.shape[1]]
    media = dict(pixel_values=torch.randn(32, 3 * 2 * 14 * 14, generator=gen), image_grid_thw=grid)
    ref = model(ids, position_ids=pos, cu_seqlens=cu, return_hidden=True, **media)
    labels = ids.clone()
    labels[:, ::3] = -100
    keep = labels[:, 1:] != -100
    ref_loss = F.cross_entropy(
        model.language.lm_head(ref[:, :-1][keep]), labels[:, 1:][keep], reduction="sum"
    )
    kw = dict(position_ids=pos, cu_seqlens=cu, **media)
    acts = (ids,)
    for st in sorted(_all_stages(model, "qwen2_5_vl", 2, [[1, 1], [1, 1]]), key=lambda s: s.stage_index):
        out = st(*acts, **kw)
        if st.is_last:
            torch.testing.assert_close(out, ref, rtol=0, atol=0)
            torch.testing.assert_close(st(*acts, labels=labels, **kw), ref_loss)
        acts = (out,)


# ---- two processes ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "case, port, expect",
    [
        ("wan", 29747, ["wan-gpipe", "wan-1f1b", "wan-interleaved-i2v", "wan-uneven"]),
        ("qwen", 29748, ["qwen-1f1b-tied", "qwen-interleaved"]),
    ],
)
def test_pipeline_matches_single_device(case, port, expect):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
        str(WORKER), case,
    ]  # fmt: skip
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    res = subprocess.run(
        cmd, capture_output=True, text=True, timeout=240, env=env, cwd=REPO
    )  # a hang fails fast
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    for name in expect:
        for rank in (0, 1):
            assert f"PASS {name} rank {rank}:" in res.stdout, res.stdout[-3000:]
