"""OpenSoraPlan 1.3 DiT conversions through the generic converter code, driven by the family's spec: the
release layout (config.json + diffusion_pytorch_model.safetensors) to mmkit and back, tp x pp splits
(nested pp_layers = virtual stages), resplit merging the shards, `mm-convert OpenSoraPlanConverter
--version v1.3` and the layout checks against the model. Every round trip is bit-exact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmkit import registry
from mmkit.cli.mm_convert import main as mm_convert
from mmkit.convert import ops

FIX = Path(__file__).resolve().parents[2] / "fixtures" / "opensoraplan13"


def _release(tmp_path: Path, name: str = "t2v") -> Path:
    d = tmp_path / f"release_{name}"
    d.mkdir()
    shutil.copy(FIX / f"{name}_diffusers_config.json", d / "config.json")
    shutil.copy(FIX / f"{name}_weights.safetensors", d / "diffusion_pytorch_model.safetensors")
    return d


def _same_folder(a: Path, b: Path) -> None:
    sa, sb = (
        load_file(str(a / "diffusion_pytorch_model.safetensors")),
        load_file(str(b / "diffusion_pytorch_model.safetensors")),
    )
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


def test_detect_and_config(tmp_path):
    src = _release(tmp_path, "i2v")
    assert registry.detect(src).name == "opensoraplan"
    cfg, _ = registry.get("opensoraplan").resolve("hf").read_config(src)
    assert cfg.i2v and cfg.vae_scale_factor_t == 4 and cfg.num_layers == 4
    want = {
        k: v
        for k, v in json.loads((FIX / "i2v_diffusers_config.json").read_text()).items()
        if k != "_diffusers_version"
    }
    assert cfg.to_dict() == want  # every release field kept (unused ones verbatim)


@pytest.mark.parametrize("name", ["t2v", "i2v"])
def test_release_round_trip_bit_exact(tmp_path, name):
    src = _release(tmp_path, name)
    ops.hf_to_mm(src, tmp_path / "mm", family="opensoraplan", progress=False)
    ops.mm_to_hf(tmp_path / "mm", tmp_path / "back", family="opensoraplan", progress=False)
    _same_folder(src, tmp_path / "back")


def test_split_tp2_vpp_then_resplit_merges(tmp_path):
    src = _release(tmp_path)
    argv = ["OpenSoraPlanConverter", "--version", "v1.3", "hf_to_mm", "--cfg.source_path", str(src),
            "--cfg.target_path", str(tmp_path / "tp2pp2"), "--cfg.target_parallel_config.tp_size", "2",
            "--cfg.target_parallel_config.pp_layers", "[[1,1],[1,1]]"]  # fmt: skip
    assert mm_convert(argv) == 0
    layout = json.loads((tmp_path / "tp2pp2" / "layout.json").read_text())
    assert layout["tp"] == 2 and layout["pp"] == 2
    shard = load_file(str(next((tmp_path / "tp2pp2").glob("mp_rank_00_000/*.safetensors"))))
    assert shard["blocks.0.attn.q.weight"].shape == (24, 48)  # heads split over tp
    assert "head.proj.weight" not in shard and "text_embed.fc1.weight" in shard  # stage 0: embeddings
    assert mm_convert(["OpenSoraPlanConverter", "--version", "v1.3", "resplit", "--cfg.source_path",
                       str(tmp_path / "tp2pp2"), "--cfg.target_path", str(tmp_path / "tp1"),
                       "--cfg.target_parallel_config.tp_size", "1",
                       "--cfg.target_parallel_config.pp_layers", "[]"]) == 0  # fmt: skip
    assert mm_convert(["OpenSoraPlanConverter", "mm_to_hf", "--cfg.source_path", str(tmp_path / "tp1"),
                       "--cfg.target_path", str(tmp_path / "back")]) == 0  # fmt: skip
    _same_folder(src, tmp_path / "back")


def test_layout_validated_against_the_model(tmp_path, capsys):
    src = _release(tmp_path)
    bad = ["OpenSoraPlanConverter", "--version", "v1.3", "hf_to_mm", "--cfg.source_path", str(src),
           "--cfg.target_path", str(tmp_path / "x")]  # fmt: skip
    assert mm_convert([*bad, "--cfg.target_parallel_config.tp_size", "3"]) != 0  # 2 heads
    assert "tp" in capsys.readouterr().err
    assert mm_convert([*bad, "--cfg.target_parallel_config.pp_layers", "[2,1]"]) != 0  # 4 layers
    assert "pp_layers" in capsys.readouterr().err
    assert mm_convert(["OpenSoraPlanConverter", "--version", "v9", "hf_to_mm"]) != 0
    assert "v1.3" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_pipeline_folder_round_trip_keeps_frozen_parts(tmp_path):
    """A pipeline folder (model_index.json, the DiT under transformer/, frozen vae/): the DiT converts, the
    frozen parts are copied back from the source folder."""
    pipe = tmp_path / "pipe"
    shutil.copytree(_release(tmp_path), pipe / "transformer")
    (pipe / "vae").mkdir()
    (pipe / "vae" / "config.json").write_text('{"_class_name": "WFVAEModel"}')
    index = {"_class_name": "OpenSoraPlanPipeline", "transformer": ["diffusers", "OpenSoraT2V_v1_3"],
             "vae": ["mmkit", "WFVAEModel"]}  # fmt: skip
    (pipe / "model_index.json").write_text(json.dumps(index))
    assert registry.detect(pipe).name == "opensoraplan"
    ops.hf_to_mm(pipe, tmp_path / "mm", family="opensoraplan", tp=2, progress=False)
    ops.mm_to_hf(tmp_path / "mm", tmp_path / "back", family="opensoraplan", progress=False)
    _same_folder(pipe / "transformer", tmp_path / "back" / "transformer")
    assert (tmp_path / "back" / "vae" / "config.json").read_text() == '{"_class_name": "WFVAEModel"}'
    assert json.loads((tmp_path / "back" / "model_index.json").read_text()) == index
