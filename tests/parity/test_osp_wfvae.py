"""mmkit WF-VAE == the OpenSoraPlan v1.3.1 `WFVAEModel` outputs in tests/fixtures/opensoraplan13/wfvae_io.

Tolerance rtol 1e-4, atol 2e-5 (the fixture README's for an fp32 re-implementation). The tiny config
(base 8, energy flow 4/8, layernorm, trilinear) loads the fixture weights strictly.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmkit.models.opensoraplan.wfvae import WFVAE, WFVAEConfig

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "opensoraplan13"
TOL = dict(rtol=1e-4, atol=2e-5)


@pytest.fixture(scope="module")
def vae():
    cfg = WFVAEConfig.from_dict(json.loads((FIX / "wfvae_diffusers_config.json").read_text()))
    model = WFVAE(cfg).eval()
    model.load_state_dict(load_file(FIX / "wfvae_weights.safetensors"), strict=True)
    return model


@pytest.fixture(scope="module")
def ref():
    return load_file(FIX / "wfvae_io.safetensors")


@pytest.mark.parametrize("p", ["video9", "image1"])
def test_encode_decode_match_reference(vae, ref, p):
    x = ref[f"{p}_in_video"]
    with torch.no_grad():
        torch.testing.assert_close(vae.wavelet(x), ref[f"{p}_wavelet3d_coeffs"], **TOL)
        post = vae.encode(x)
        torch.testing.assert_close(post.parameters, ref[f"{p}_enc_moments"], **TOL)
        torch.testing.assert_close(post.mode(), ref[f"{p}_enc_mode"], **TOL)
        coeffs = vae.decode_coeffs(ref[f"{p}_enc_mode"])
        torch.testing.assert_close(coeffs, ref[f"{p}_dec_coeffs"], **TOL)
        torch.testing.assert_close(vae.decode(ref[f"{p}_enc_mode"]), ref[f"{p}_dec_video"], **TOL)
    assert ref[f"{p}_dec_video"].abs().max() > 0.1  # a non-trivial output


def test_inverse_wavelet_and_sampling(vae, ref):
    with torch.no_grad():
        inv = vae.inverse_wavelet(ref["video9_wavelet3d_coeffs"])
        torch.testing.assert_close(inv, ref["video9_wavelet3d_inverse"], **TOL)
        post = vae.encode(ref["video9_in_video"])
        z = post.sample(noise=ref["video9_sample_eps"])
        torch.testing.assert_close(z, ref["video9_sample_z"], **TOL)
        torch.testing.assert_close(vae.scale_latents(z), ref["video9_sample_z_scaled_for_dit"], **TOL)
        torch.testing.assert_close(vae.unscale_latents(vae.scale_latents(z)), z)


def test_long_clip_tiled_equals_reference_and_untiled(vae, ref):
    x = ref["long25_in_video"]  # 25 frames -> 13 wavelet frames -> 7 latent frames
    calls = []
    for part in (vae.encoder, vae.decoder):
        part.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[2]))
    with torch.no_grad():
        full = vae.encode(x, tiled=False).parameters
        tiled = vae.encode(x, tiled=True).parameters
        assert calls == [13, 1, 12]  # one pass, then chunks of the first frame and 16 wavelet frames
        torch.testing.assert_close(full, ref["long25_enc_moments"], **TOL)
        torch.testing.assert_close(tiled, ref["long25_tiled_enc_moments"], **TOL)
        mode = ref["long25_enc_moments"][:, :8]
        dec_full = vae.decode(mode, tiled=False)
        dec_tiled = vae.decode(mode, tiled=True)
        assert calls[3:] == [7, 2, 5, 2]  # chunks [0,1) [1,5) [5,7), the first two with a look-ahead frame
    torch.testing.assert_close(dec_full, ref["long25_dec_video"], **TOL)
    torch.testing.assert_close(dec_tiled, ref["long25_tiled_dec_video"], **TOL)
    torch.testing.assert_close(dec_tiled, dec_full, **TOL)
    torch.testing.assert_close(tiled, full, **TOL)


def test_bad_input_and_config_are_clear_errors(vae):
    with pytest.raises(ValueError, match="frames must be 1 \\+ 4k"):
        vae.encode(torch.zeros(1, 3, 6, 16, 16))
    with pytest.raises(ValueError, match="l2_upsample_block='Spatial2x3DUpsample' is not supported"):
        WFVAEConfig.from_dict({"l2_upsample_block": "Spatial2x3DUpsample"})
    with pytest.raises(ValueError, match="unknown field"):
        WFVAEConfig.from_dict({"latent_dims": 8})


def test_parity_catches_nearest_temporal_upsampling(ref):
    """The check can fail: the release's one-word mistake (nearest instead of trilinear) costs ~8e-3."""
    d = json.loads((FIX / "wfvae_diffusers_config.json").read_text()) | {"t_interpolation": "nearest"}
    wrong = WFVAE(WFVAEConfig.from_dict(d)).eval()
    wrong.load_state_dict(load_file(FIX / "wfvae_weights.safetensors"))
    with torch.no_grad():
        diff = (wrong.decode(ref["video9_enc_mode"]) - ref["video9_dec_video"]).abs().max()
    assert diff > 1e-3
