"""Wan2.1 VAE original release layout <-> diffusers AutoencoderKLWan (mmkit.convert.vae, `mmkit convert vae-convert`)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from safetensors.torch import load_file, save_file

from mmkit.cli.main import main
from mmkit.convert.vae import config_from_original, convert_vae, load_original, to_diffusers, to_original
from mmkit.models.common.hf_io import load_state_dict
from mmkit.models.wan.tiny import TINY_VAE, random_tiny_vae


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae") / "vae"
    random_tiny_vae(seed=3).save_pretrained(out)
    return out


def _video(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 3, 5, 16, 16, generator=g)  # 4k+1 frames, 8x spatial stride


def test_diffusers_original_diffusers_is_bit_exact_and_decodes_the_same(vae_dir, tmp_path):
    orig = convert_vae(vae_dir, tmp_path / "orig", to="original", progress=False)
    assert orig.name == "Wan2.1_VAE.safetensors"
    sd = load_file(str(orig))
    assert "encoder.downsamples.0.residual.0.gamma" in sd and "decoder.upsamples.2.resample.1.weight" in sd
    back = convert_vae(orig, tmp_path / "back", to="diffusers", progress=False)
    a, b = load_state_dict(vae_dir), load_state_dict(back)
    assert sorted(a) == sorted(b)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    # the config survives (latent statistics included: they ride in the file's metadata)
    want, got = (
        json.loads((vae_dir / "config.json").read_text()),
        json.loads((back / "config.json").read_text()),
    )
    for key in ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "temperal_downsample", "latents_mean"):
        assert got[key] == want[key], key
    ref, ours = (
        AutoencoderKLWan.from_pretrained(vae_dir).eval(),
        AutoencoderKLWan.from_pretrained(back).eval(),
    )
    z = torch.randn(1, TINY_VAE["z_dim"], 2, 2, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dec_ref, dec = ref.decode(z).sample, ours.decode(z).sample
        enc_ref, enc = ref.encode(_video()).latent_dist.mean, ours.encode(_video()).latent_dist.mean
    assert dec_ref.abs().max() > 0.01
    assert torch.equal(dec, dec_ref) and torch.equal(enc, enc_ref)


def test_names_agree_with_diffusers_own_converter():
    """diffusers' single-file loader maps the released VAE (2 residual blocks per level) independently."""
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**dict(TINY_VAE, num_res_blocks=2))
    sd, cfg = vae.state_dict(), dict(vae.config)
    orig = to_original(sd, cfg)
    ref = convert_wan_vae_to_diffusers(dict(orig))
    assert sorted(ref) == sorted(sd)
    assert all(torch.equal(ref[k], sd[k]) for k in sd)
    # and the structure is recovered from the original tensors alone (the release file has no config)
    inferred = config_from_original(orig)
    for key in ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "temperal_downsample"):
        assert inferred[key] == cfg[key], key
    assert sorted(to_diffusers(orig, inferred)) == sorted(sd)


def test_release_pth_is_read_with_weights_only(vae_dir, tmp_path):
    orig = to_original(load_state_dict(vae_dir), json.loads((vae_dir / "config.json").read_text()))
    pth = tmp_path / "Wan2.1_VAE.pth"
    torch.save(orig, pth)  # what the release ships: a plain dict of tensors
    sd, cfg = load_original(tmp_path)  # a folder holding the release file
    assert cfg is None and sorted(sd) == sorted(orig)
    assert (
        main(["convert", "vae-convert", str(pth), str(tmp_path / "d"), "--to", "diffusers", "--quiet"]) == 0
    )
    out = json.loads((tmp_path / "d" / "config.json").read_text())
    assert out["_class_name"] == "AutoencoderKLWan" and out["base_dim"] == TINY_VAE["base_dim"]
    got = load_state_dict(tmp_path / "d")
    assert all(torch.equal(got[k], v) for k, v in load_state_dict(vae_dir).items())
    torch.save({"x": torch.nn.Linear(1, 1)}, tmp_path / "evil.pth")  # a pickled object: refused, not built
    with pytest.raises(ValueError, match="weights_only"):
        load_original(tmp_path / "evil.pth")


def test_errors(vae_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match="safetensors only"):
        convert_vae(vae_dir, tmp_path / "x.pth", to="original")
    with pytest.raises(ValueError, match="lacks encoder.conv1.weight"):
        config_from_original({"foo.weight": torch.zeros(1)})
    save_file({"encoder.conv1.weight": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="lacks conv2.weight"):
        convert_vae(tmp_path / "bad.safetensors", tmp_path / "o", to="diffusers")
    with pytest.raises(ValueError, match="Wan2.2"):
        to_original({}, {"is_residual": True})
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no Wan2.1_VAE.safetensors"):
        load_original(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="VAE checkpoint not found"):
        load_original(tmp_path / "missing.pth")
    assert main(["convert", "vae-convert", str(tmp_path), str(tmp_path / "o"), "--to", "diffusers"]) == 2
    assert "mmkit convert: error:" in capsys.readouterr().err
