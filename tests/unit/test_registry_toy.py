"""A toy family registered from outside mmkit gets config validation, a parallel plan, a converter round
trip (hf-to-mm, pre-split over tp x pp, mm-to-hf) and a pipeline load, with no shared file edited."""

import pytest
import torch
import toy_family
from safetensors.torch import load_file

import mmkit
from mmkit import registry
from mmkit.config import Config, ConfigError, validate
from mmkit.convert.ops import hf_to_mm, mm_to_hf
from mmkit.parallel.dims import ParallelDims
from mmkit.parallel.plans import parallelize


@pytest.fixture
def toy():
    registry.register(toy_family.SPEC)
    yield toy_family.SPEC
    registry.unregister("toy")


def _cfg(**model) -> Config:
    cfg = Config()
    cfg.model.family, cfg.model.task, cfg.model.flavor = "toy", "regress", "small"
    for k, v in model.items():
        setattr(cfg.model, k, v)
    return cfg


def test_config_validation(toy):
    assert validate(_cfg(), world_size=1).model.family == "toy"
    bad = _cfg(task="t2v", flavor="huge")
    bad.data.num_workers = 2
    with pytest.raises(ConfigError) as e:
        validate(bad, world_size=1)
    msg = str(e.value)
    assert "model.task='t2v': family 'toy' supports task regress" in msg
    assert "model.flavor='huge': unknown toy flavor; choose one of tiny, small" in msg
    assert "data.num_workers=2: the toy family loads no data" in msg  # the family's own rule


def test_plan_and_layout_rules(toy):
    cfg = validate(_cfg(), world_size=1)
    model = toy.build_model(toy.flavor("small"))

    class Task:
        def __init__(self, model):
            self.model = model

        def loss_fn(self, pred, y):
            return torch.nn.functional.mse_loss(pred, y, reduction="sum")

    plan = parallelize(Task(model), ParallelDims(world_size=1), None, cfg, fsdp=False)
    assert isinstance(plan, toy_family.ToyPlan)
    x, y = torch.randn(3, 8), torch.randn(3, 1)
    assert torch.equal(plan({"x": x, "y": y}), torch.nn.functional.mse_loss(model(x), y, reduction="sum"))
    from mmkit.parallel.dims import LayoutError, check_model_layout

    with pytest.raises(LayoutError, match="parallel.tp=4: larger than the model's 2 key/value heads"):
        check_model_layout("toy", toy.flavor("small"), tp=4)


def test_converter_round_trip_and_pipeline(toy, tmp_path):
    src = toy_family.write_folder(tmp_path / "toy-hf")
    assert registry.detect(src) is toy
    split = hf_to_mm(src, tmp_path / "mm", tp=2, pp=2, progress=False)
    back = mm_to_hf(split, tmp_path / "toy-back", progress=False)
    a, b = load_file(src / "model.safetensors"), load_file(back / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the tp split follows the spec's rule: colwise fc -> each tp rank holds half the rows
    from mmkit.checkpoint.mm import read_mm

    assert torch.equal(
        read_mm(split).state["blocks.1.fc.weight"], toy_family.from_hf(a)["blocks.1.fc.weight"]
    )
    pipe = mmkit.load_pipeline(back)
    x = torch.randn(2, 8)
    ref = toy_family.load_pipeline(src)
    assert torch.equal(pipe(x), ref(x))
