"""Which family an HF folder holds is the registry's answer: a diffusers folder of another pipeline is
refused with a clear error instead of being read as Wan."""

from __future__ import annotations

import json

import pytest

from mmkit.checkpoint.hf import read_hf, read_hf_config
from mmkit.cli.mm_convert import main as mm_convert
from mmkit.convert.ops import hf_to_mm


def _diffusers_folder(root, pipeline: str, transformer: str = "CogVideoXTransformer3DModel"):
    root.mkdir()
    (root / "model_index.json").write_text(
        json.dumps({"_class_name": pipeline, "transformer": ["diffusers", "X"]})
    )
    (root / "transformer").mkdir()
    (root / "transformer" / "config.json").write_text(json.dumps({"_class_name": transformer}))
    return root


def test_other_diffusers_pipeline_is_refused_not_read_as_wan(tmp_path, capsys):
    src = _diffusers_folder(tmp_path / "cog", "CogVideoXPipeline")
    msg = "_class_name='CogVideoXPipeline' is not a model family mmkit knows; known: wan"
    with pytest.raises(ValueError, match=msg):
        read_hf(src)
    with pytest.raises(ValueError, match=msg):
        read_hf_config(src, "wan")
    with pytest.raises(ValueError, match=msg):
        hf_to_mm(src, tmp_path / "out", progress=False)
    argv = [
        "WanConverter",
        "hf_to_mm",
        "--cfg.source_path",
        str(src),
        "--cfg.target_path",
        str(tmp_path / "o"),
    ]
    assert mm_convert(argv) == 2
    assert "CogVideoXPipeline" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def test_opensoraplan_pipeline_is_detected_by_its_transformer(tmp_path):
    from mmkit import registry

    src = _diffusers_folder(tmp_path / "osp", "OpenSoraPipeline", "OpenSoraT2V_v1_3")
    assert registry.detect(src).name == "opensoraplan"
    with pytest.raises(ValueError, match="holds a opensoraplan model, not wan"):
        read_hf_config(src, "wan")


def test_wan_pipeline_class_is_detected(tmp_path):
    src = _diffusers_folder(tmp_path / "wan", "WanPipeline")
    (src / "transformer" / "config.json").write_text(
        json.dumps({"_class_name": "WanTransformer3DModel", "num_layers": 1})
    )
    family, _ = read_hf_config(src)
    assert family == "wan"
    with pytest.raises(ValueError, match="holds a wan model, not qwen2_5_vl"):
        read_hf_config(src, "qwen2_5_vl")
