"""Each loss against hand-computed values on fixed tiny batches, and v-prediction against the
OpenSoraPlan 1.3 reference tensors (diffusers DDPMScheduler, v_prediction, zero terminal SNR)."""

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmkit.train import losses as L

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "opensoraplan13" / "sched_io.safetensors"


def test_flow_matching_by_hand():
    x0 = torch.tensor([[1.0, -2.0]]).view(1, 2, 1, 1, 1)
    noise = torch.tensor([[3.0, 0.5]]).view(1, 2, 1, 1, 1)
    xt, target = L.flow_noisy(x0, noise, torch.tensor([0.25]))
    # x_t = 0.75 * x0 + 0.25 * noise ; target = noise - x0
    assert xt.flatten().tolist() == [1.5, -1.375]
    assert target.flatten().tolist() == [2.0, 2.5]
    pred = torch.tensor([[1.0, 3.0]]).view(1, 2, 1, 1, 1)
    total, n = L.mse_sum(pred, target)
    assert n == 2 and math.isclose(total.item(), (1.0**2 + 0.5**2))


def test_masked_weighted_mse_by_hand():
    pred = torch.zeros(2, 1, 1, 1, 2)
    target = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(2, 1, 1, 1, 2)
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]]).view(2, 1, 1, 2)
    total, n = L.mse_sum(pred, target, mask, weight=torch.tensor([2.0, 0.5]))
    assert math.isclose(total.item(), 2 * 1 + 0.5 * (9 + 16)) and n.item() == 3


def test_sigma_sampling_and_shift():
    g = torch.Generator().manual_seed(0)
    u = L.sample_flow_sigmas(20000, "uniform", 1.0, g)
    assert abs(u.mean().item() - 0.5) < 0.01 and u.min() > 0 and u.max() < 1
    ln = L.sample_flow_sigmas(20000, "logit_normal", 1.0, g)
    assert abs(ln.median().item() - 0.5) < 0.02 and ln.std() < u.std()  # mass pulled to the middle
    shifted = L.sample_flow_sigmas(20000, "uniform", 3.0, g)
    assert shifted.mean() > 0.6  # shift > 1 spends more steps at high noise
    assert L.shift_sigma(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)
    with pytest.raises(ValueError, match="timestep_sampling='gauss'"):
        L.sample_flow_sigmas(2, "gauss")


def test_v_prediction_zero_snr_matches_reference():
    ref = load_file(FIXTURE)
    ac = L.zero_snr_alphas_cumprod(1000, 1e-4, 0.02, "linear")
    torch.testing.assert_close(ac, ref["train_alphas_cumprod"], rtol=1e-5, atol=1e-6)
    assert ac[-1] == 0
    noisy, v = L.v_noisy(ref["loss_x0"], ref["loss_noise"], ref["loss_timesteps"], ac)
    torch.testing.assert_close(noisy, ref["loss_noisy"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v, ref["loss_v_target"], rtol=1e-5, atol=1e-6)
    s = L.snr(ref["loss_timesteps"], ac)
    torch.testing.assert_close(s, ref["loss_snr"], rtol=1e-5, atol=1e-6)
    w = L.min_snr_v_weights(s, 5.0)
    torch.testing.assert_close(w, ref["loss_weights_snr_gamma5"], rtol=1e-5, atol=1e-6)
    total, n = L.mse_sum(ref["loss_model_pred"], ref["loss_v_target"], ref["loss_attention_mask"], w)
    torch.testing.assert_close((total / n).view(1), ref["loss_value_masked"], rtol=1e-5, atol=1e-6)


def test_next_token_ce_by_hand():
    # one row, 3 positions, vocab 2; labels: only position 2 is a target -> predicted from position 1
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [5.0, 5.0]]])
    labels = torch.tensor([[-100, -100, 1]])
    total, n = L.next_token_ce_sum(logits, labels)
    assert n == 1
    assert total.item() == pytest.approx(-math.log(math.exp(0) / (math.exp(2) + math.exp(0))))


def test_ce_packed_equals_unpacked():
    g = torch.Generator().manual_seed(0)
    a_logits, b_logits = torch.randn(1, 5, 7, generator=g), torch.randn(1, 4, 7, generator=g)
    a_labels = torch.tensor([[-100, -100, 3, 4, 1]])
    b_labels = torch.tensor([[-100, 2, 2, 6]])
    sa, na = L.next_token_ce_sum(a_logits, a_labels)
    sb, nb = L.next_token_ce_sum(b_logits, b_labels)
    packed = L.next_token_ce_sum(torch.cat([a_logits, b_logits], 1), torch.cat([a_labels, b_labels], 1))
    torch.testing.assert_close(packed[0], sa + sb)
    assert packed[1] == na + nb
