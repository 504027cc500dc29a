"""The family registry: built-in specs, detection from a folder's own files, and refusals."""

import json

import pytest
import torch

from mmkit import registry
from mmkit.config import Config, ConfigError, validate


def test_builtins_and_references_resolve():
    assert registry.names()[:2] == ["wan", "qwen2_5_vl"]
    for spec in registry.specs():
        for what in ("plan", "stages", "task", "data", "pipeline", "loss"):
            assert callable(spec.resolve(what)), (spec.name, what)
        hf = spec.resolve("hf")  # the HF adapter: reads and writes the family's folders
        assert callable(hf.read) and callable(hf.writer) and callable(hf.read_config)
        assert spec.tasks and spec.hf_layouts and spec.converter


def test_unknown_family_is_a_named_error():
    with pytest.raises(
        ValueError, match=r"model.family='nope': unknown model family; choose one of wan, qwen2_5_vl"
    ):
        registry.get("nope")
    cfg = Config()
    cfg.model.family = "nope"
    with pytest.raises(ConfigError, match=r"model.family='nope'"):
        validate(cfg, world_size=1)


def _folder(tmp_path, name, files: dict) -> object:
    d = tmp_path / name
    d.mkdir()
    for f, obj in files.items():
        (d / f).write_text(json.dumps(obj))
    return d


def test_detect_reads_each_familys_own_files(tmp_path):
    wan = _folder(tmp_path, "wan", {"model_index.json": {"_class_name": "WanImageToVideoPipeline"}})
    dit = _folder(tmp_path, "dit", {"config.json": {"_class_name": "WanModel"}})
    qwen = _folder(tmp_path, "qwen", {"config.json": {"model_type": "qwen2_5_vl"}})
    assert [registry.detect(p).name for p in (wan, dit, qwen)] == ["wan", "wan", "qwen2_5_vl"]


@pytest.mark.parametrize(
    "files, says",
    [
        ({"model_index.json": {"_class_name": "OpenSoraPipeline"}}, "OpenSoraPipeline"),
        ({"model_index.json": {"_class_name": "HunyuanVideoPipeline"}}, "HunyuanVideoPipeline"),
        ({"config.json": {"model_type": "llama"}}, "llama"),
    ],
)
def test_detect_refuses_other_families(tmp_path, files, says):
    """A diffusers folder is not Wan just because it has a model_index.json."""
    d = _folder(tmp_path, "other", files)
    with pytest.raises(ValueError, match=f"{says}.*is not a model family mmkit knows"):
        registry.detect(d)


def test_detect_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        registry.detect(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="neither model_index.json"):
        registry.detect(tmp_path)


@pytest.mark.parametrize("family, flavor", [("wan", "i2v-14B-480P"), ("qwen2_5_vl", "tiny")])
def test_tp_rules_cover_every_sharded_parameter(family, flavor):
    """Each 2-D block weight the plan shards has a dim; embeddings of the DiT and the ViT stay whole."""
    spec = registry.get(family)
    with torch.device("meta"):
        model = spec.build_model(spec.flavor(flavor))
    dims = {n: spec.tp_dim(n) for n, _ in model.named_parameters()}
    if family == "wan":
        assert dims["blocks.0.attn.q.weight"] == 0 and dims["blocks.0.attn.q.bias"] == 0
        assert dims["blocks.0.attn.out.weight"] == 1 and dims["blocks.0.attn.out.bias"] is None
        assert dims["blocks.0.cross.norm_k_img.weight"] == 0 and dims["patch_embed.weight"] is None
    else:
        assert dims["language.layers.0.mlp.down_proj.weight"] == 1
        assert dims["language.embed_tokens.weight"] == 0
        assert all(d is None for n, d in dims.items() if n.startswith("visual."))


def test_register_refuses_a_second_spec_under_one_name():
    spec = registry.get("wan")
    import dataclasses

    clone = dataclasses.replace(spec)
    with pytest.raises(ValueError, match="already registered"):
        registry.register(clone)
