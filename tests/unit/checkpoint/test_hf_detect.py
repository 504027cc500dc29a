"""Which family an HF folder holds is the registry's answer: a diffusers folder of another pipeline is
refused with a clear error instead of being read as Wan."""

from __future__ import annotations

import json

import pytest

from mmkit.checkpoint.hf import read_hf, read_hf_config
from mmkit.cli.mm_convert import main as mm_convert
from mmkit.convert.ops import hf_to_mm


def _diffusers_folder(root, pipeline: str):
    root.mkdir()
    (root / "model_index.json").write_text(
        json.dumps({"_class_name": pipeline, "transformer": ["diffusers", "X"]})
    )
    (root / "transformer").mkdir()
    (root / "transformer" / "config.json").write_text(
        json.dumps({"_class_name": "HunyuanVideoTransformer3DModel"})
    )
    return root


def test_other_diffusers_pipeline_is_refused_not_read_as_wan(tmp_path, capsys):
    src = _diffusers_folder(tmp_path / "hv", "HunyuanVideoPipeline")
    msg = "_class_name='HunyuanVideoPipeline' is not a model family mmkit knows; known: wan"
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
    assert "HunyuanVideoPipeline" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def test_wan_pipeline_class_is_detected(tmp_path):
    src = _diffusers_folder(tmp_path / "wan", "WanPipeline")
    (src / "transformer" / "config.json").write_text(
        json.dumps({"_class_name": "WanTransformer3DModel", "num_layers": 1})
    )
    family, _ = read_hf_config(src)
    assert family == "wan"
    with pytest.raises(ValueError, match="holds a wan model, not qwen2_5_vl"):
        read_hf_config(src, "qwen2_5_vl")
