"""OpenSoraPlan WF-VAE: release `.ckpt` <-> diffusers layout, bit-exact both ways, through the Python API,
`mm-convert OpenSoraPlanConverter --version v1.3 vae_convert` and `mmkit convert vae-convert`."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmkit.cli.main import main as mmkit_main
from mmkit.cli.mm_convert import main as mm_convert
from mmkit.convert.opensoraplan_vae import convert_vae
from mmkit.models.opensoraplan import vae_io

FIX = Path(__file__).resolve().parents[2] / "fixtures" / "opensoraplan13"


@pytest.fixture(scope="module")
def weights():
    return load_file(FIX / "wfvae_weights.safetensors")


def _release(folder: Path, sd: dict, kind: str) -> Path:
    """A release VAE folder: config.json + a .ckpt in one of the layouts the release loader reads."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text((FIX / "wfvae_config.json").read_text())
    if kind == "ema":  # EMA weights under DDP names, plus a (different) raw state_dict that must be ignored
        obj = {"ema_state_dict": {"module." + k: v for k, v in sd.items()}, "state_dict": {}}
    else:
        obj = {"state_dict": {"gen_model": dict(sd)}}
    torch.save(obj, folder / "checkpoint.ckpt")
    return folder


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("kind", ["ema", "gen_model"])
def test_release_to_diffusers_and_back_bit_exact(tmp_path, weights, kind):
    src = _release(tmp_path / "vae", weights, kind)
    out = convert_vae(src, tmp_path / "diffusers", to="auto", progress=False)
    _same(load_file(out / "diffusion_pytorch_model.safetensors"), weights)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["_class_name"] == "WFVAEModel" and cfg["base_channels"] == 8
    back = convert_vae(out, tmp_path / "release", to="auto", progress=False)
    assert back.name == "merged.ckpt"
    _same(vae_io.read_ckpt(back), weights)
    # the written .ckpt is what the release loader expects: EMA weights with the DDP prefix
    raw = torch.load(back, weights_only=True)
    assert set(raw) == {"ema_state_dict"} and all(k.startswith("module.") for k in raw["ema_state_dict"])
    vae = vae_io.load_vae(tmp_path / "release")  # both layouts load strictly into the model
    _same({k: v for k, v in vae.state_dict().items()}, weights)


def test_mm_convert_and_mmkit_convert_commands(tmp_path, weights, capsys):
    src = _release(tmp_path / "vae", weights, "ema")
    rc = mm_convert(
        ["OpenSoraPlanConverter", "--version", "v1.3", "vae_convert"]
        + ["--cfg.source_path", str(src / "checkpoint.ckpt"), "--cfg.target_path", str(tmp_path / "d")]
    )
    assert rc == 0
    _same(load_file(tmp_path / "d" / "diffusion_pytorch_model.safetensors"), weights)
    argv = ["convert", "vae-convert", str(tmp_path / "d"), str(tmp_path / "o"), "--to", "original"]
    assert mmkit_main(argv + ["--family", "opensoraplan", "--quiet"]) == 0
    _same(vae_io.read_ckpt(tmp_path / "o" / "merged.ckpt"), weights)
    assert mm_convert(["OpenSoraPlanConverter", "--version", "v2.0", "vae_convert"]) == 2
    assert re.search(r"--version 'v2.0': choose one of v1\.3", capsys.readouterr().err)


def test_bad_checkpoints_are_clear_errors(tmp_path, weights):
    src = _release(tmp_path / "vae", {k: v for k, v in weights.items() if "conv_out" not in k}, "ema")
    with pytest.raises(ValueError, match="missing: decoder.conv_out.bias"):
        convert_vae(src, tmp_path / "o", to="diffusers", progress=False)
    pickled = tmp_path / "p"
    pickled.mkdir()
    (pickled / "config.json").write_text((FIX / "wfvae_config.json").read_text())
    torch.save({"state_dict": {"x": torch.zeros(1)}, "opt": object()}, pickled / "a.ckpt")
    with pytest.raises(ValueError, match="weights_only=True refused it"):
        convert_vae(pickled, tmp_path / "o2", to="diffusers", progress=False)
    with pytest.raises(ValueError, match="is not empty"):
        convert_vae(src, src, to="diffusers", progress=False)
