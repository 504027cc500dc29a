import pytest
import torch

from mmkit.infer.samplers import FlowEulerScheduler, denoise, make_scheduler, shift_sigmas


def test_euler_is_exact_on_a_straight_flow():
    # rectified flow x_t = (1 - s) x0 + s * noise has constant velocity noise - x0: Euler lands on x0
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 4, 2, 3, 3, generator=g), torch.randn(1, 4, 2, 3, 3, generator=g)
    out = denoise(lambda x, t: noise - x0, noise.clone(), FlowEulerScheduler(shift=3.0), 7, progress=False)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)


def test_euler_schedule_is_shifted_and_ends_at_zero():
    s = FlowEulerScheduler(shift=5.0)
    s.set_timesteps(4)
    assert s.sigmas[0] == 1.0 and s.sigmas[-1] == 0.0
    base = torch.linspace(1, 1 / 1000, 4, dtype=torch.float64)
    torch.testing.assert_close(s.sigmas[:-1].double(), shift_sigmas(base, 5.0), atol=1e-6, rtol=0)
    assert torch.all(s.timesteps[:-1] > s.timesteps[1:])


def test_scheduler_errors():
    with pytest.raises(ValueError, match="flow_shift=0"):
        FlowEulerScheduler(shift=0)
    with pytest.raises(ValueError, match="sampler='ddim'"):
        make_scheduler("ddim")
