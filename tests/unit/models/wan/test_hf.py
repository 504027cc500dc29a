"""Wan checkpoint maps: diffusers / original release <-> mmkit, bit-exact, with clear key errors."""

import json

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from wan_helpers import perturbed_reference

from mmkit.models.common.hf_io import load_state_dict, save_state_dict
from mmkit.models.wan import hf
from mmkit.models.wan.load import load_transformer, save_transformer


def _equal(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v"])
def test_original_to_mm_to_diffusers_to_mm_bit_exact(i2v):
    ref_sd = perturbed_reference(i2v).state_dict()
    mm = hf.from_hf(ref_sd)
    original = hf.to_original(mm)
    assert "blocks.0.self_attn.q.weight" in original and "blocks.1.norm3.weight" in original
    # an independent reference for the original key names: diffusers' own single-file converter
    theirs = convert_wan_transformer_to_diffusers({k: v.clone() for k, v in original.items()})
    _equal(theirs, ref_sd)
    mm2 = hf.from_original(original)
    diffusers_sd = hf.to_hf(mm2)
    _equal(diffusers_sd, ref_sd)
    _equal(hf.from_hf(diffusers_sd), mm)


def test_sharded_diffusers_folder_loads_and_exports(tmp_path):
    ref = perturbed_reference(False)
    ref.save_pretrained(tmp_path / "in", max_shard_size="20KB")
    assert (tmp_path / "in" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    model = load_transformer(tmp_path / "in")
    x, ctx = torch.randn(1, 16, 2, 4, 6), torch.randn(1, 5, 32)
    with torch.no_grad():
        want = ref(x, torch.tensor([300.0]), ctx, return_dict=False)[0]
        torch.testing.assert_close(model(x, 300.0, ctx), want, atol=1e-5, rtol=0)
    # written back in the diffusers layout, diffusers loads it and gives the same output
    save_transformer(model, tmp_path / "out", max_shard_bytes=30_000)
    back = WanTransformer3DModel.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(
            back(x, torch.tensor([300.0]), ctx, return_dict=False)[0], want, atol=1e-5, rtol=0
        )
    _equal(load_state_dict(tmp_path / "out"), ref.state_dict())


def test_original_release_folder_loads(tmp_path):
    ref = perturbed_reference(True)
    model = load_transformer_from_ref(ref, tmp_path)
    save_transformer(model, tmp_path / "orig", layout="original", max_shard_bytes=50_000)
    cfg = json.loads((tmp_path / "orig" / "config.json").read_text())
    assert cfg["_class_name"] == "WanModel" and cfg["model_type"] == "i2v"
    again = load_transformer(tmp_path / "orig")
    _equal(again.state_dict(), model.state_dict())


def load_transformer_from_ref(ref, tmp_path):
    ref.save_pretrained(tmp_path / "ref")
    return load_transformer(tmp_path / "ref")


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    ref = perturbed_reference(False)
    ref.save_pretrained(tmp_path / "m")
    sd = load_state_dict(tmp_path / "m")
    del sd["blocks.1.ffn.net.2.weight"]
    save_state_dict(sd, tmp_path / "m", "diffusion_pytorch_model")
    with pytest.raises(ValueError, match="1 missing: blocks.1.mlp.fc2.weight"):
        load_transformer(tmp_path / "m")
    sd["blocks.0.attn1.mystery.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected key.*blocks.0.attn1.mystery.weight"):
        hf.from_hf(sd)


def test_pickled_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    torch.save({"a": torch.zeros(1)}, tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="never unpickles"):
        load_transformer(tmp_path)
