"""Layout rules: every impossible layout is an error naming the field, the value and the fix, raised
before any compute (parallel/dims.py for model-dependent rules, config.validate for the rest)."""

import pytest

from mmkit.config import ConfigError, parse_cli
from mmkit.models.qwen2_5_vl.tiny import tiny_config
from mmkit.models.wan.config import FLAVORS
from mmkit.parallel.dims import LayoutError, ParallelDims, check_model_layout, padded_len, stage_layers


def test_valid_layouts_pass():
    assert check_model_layout("wan", FLAVORS["14B"], tp=8, cp=5, cp_algo="ulysses").heads == 40
    check_model_layout("wan", FLAVORS["1.3B"], tp=2, cp=4, cp_algo="ring", pp=2, pp_layers=[14, 16])
    check_model_layout("qwen2_5_vl", tiny_config(), tp=2, cp=2, cp_algo="hybrid", ulysses_degree=1)


@pytest.mark.parametrize(
    "kw, field, fix",
    [
        (dict(tp=4), "parallel.tp=4", "key/value heads"),  # tiny Qwen has 2 KV heads
        (dict(tp=3), "parallel.tp=3", "use tp"),
        (dict(cp=4, cp_algo="ulysses"), "parallel.cp=4", "cp_algo='ring'"),
        (dict(cp=4, cp_algo="hybrid", ulysses_degree=4), "parallel.ulysses_degree=4", "ring"),
        (dict(pp=2, pp_layers=[1, 2]), "pp_layers=[1, 2]", "sum"),
        (dict(pp=2, pp_layers=[2, 0]), "stage 1 has no layers", "at least one"),
        (dict(pp=2, pp_layers=[2]), "1 entries but parallel.pp=2", "one layer count per stage"),
        (dict(pp=2, pp_layers=[[1, 1], [1]]), "one entry per pipeline stage", "Example"),
        (dict(pp=3, pp_layers=[1, 1]), "parallel.pp=3 stages but the model has 2 layers", "at most 2"),
    ],
)
def test_impossible_layouts_name_field_and_fix(kw, field, fix):
    with pytest.raises(LayoutError) as e:
        check_model_layout("qwen2_5_vl", tiny_config(), **kw)
    assert field in str(e.value) and fix in str(e.value), str(e.value)


def test_vision_tower_sits_on_stage_zero():
    with pytest.raises(LayoutError, match=r"vit_pp_layers.*\[\[2, 0\]\]"):
        check_model_layout("qwen2_5_vl", tiny_config(), pp=2, pp_layers=[1, 1], vit_pp_layers=[[1, 1]])


def test_stage_layers_and_padding():
    with pytest.raises(LayoutError, match=r"e\.g\. \[2, 3, 3\]"):  # the suggestion is itself valid
        stage_layers(3, 8, [4, 4])
    assert stage_layers(3, 8, [2, 3, 3]) == [2, 3, 3]
    assert stage_layers(2, 5) == [2, 3]  # stage 0 also holds the embeddings: the last stages take the rest
    assert stage_layers(2, 28, [[6, 8], [7, 7]]) == [6, 8, 7, 7]
    assert stage_layers(2, 28, [[12, 16]]) == [12, 16]
    assert padded_len(27, 2) == 28 and padded_len(16, 4) == 16


def test_world_product_checked():
    with pytest.raises(LayoutError, match=r"= 4 != world size 8"):
        ParallelDims(dp_shard=2, tp=2, world_size=8).check()


def _cli(*extra, world=2):
    import os

    old = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(world)
    try:
        return parse_cli(["--config", "recipes/tiny/qwen2_5_vl_sft.toml", *extra])
    finally:
        if old is None:
            del os.environ["WORLD_SIZE"]
        else:
            os.environ["WORLD_SIZE"] = old


@pytest.mark.parametrize(
    "extra, world, needle",
    [
        (["--parallel.cp", "4", "--parallel.cp_algo", "ring", "--parallel.ring_window", "3"], 4,
         "parallel.ring_window=3"),
        (["--parallel.cp", "2", "--parallel.ring_window", "2"], 2, "only applies to cp_algo ring or hybrid"),
        (["--data.packing", "false"], 2, "data.packing=False"),
        (["--parallel.tp", "2", "--parallel.dp_shard", "2"], 2, "!= world size 2"),
        (["--parallel.cp", "4", "--parallel.cp_algo", "hybrid", "--parallel.ulysses_degree", "3"], 4,
         "parallel.ulysses_degree=3"),
    ],
)  # fmt: skip
def test_config_layout_errors(extra, world, needle):
    with pytest.raises(ConfigError) as e:
        _cli(*extra, world=world)
    assert needle in str(e.value), str(e.value)
