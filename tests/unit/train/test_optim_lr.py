import math

import pytest
import torch
from torch import nn

from mmkit.config import OptimConfig
from mmkit.train.ema import EMA
from mmkit.train.lr import build_lr_scheduler, lr_factor
from mmkit.train.optim import build_optimizer, clip_grad_norm_, param_groups


class MyRMSNorm(nn.Module):  # model code's own norm classes are recognised by name
    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, d))  # 2-D on purpose: excluded as a norm, not by shape


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.pos_embed = nn.Parameter(torch.randn(1, 4, 6))
        self.proj = nn.Linear(6, 6)
        self.ln = nn.LayerNorm(6)
        self.rms = MyRMSNorm(6)
        self.modulation = nn.Parameter(torch.randn(1, 6, 6))
        self.frozen = nn.Linear(6, 6)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.embed.weight  # tied: must appear once


def test_param_groups_split():
    decay, no_decay = param_groups(Net(), weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay["names"] == ["embed.weight", "proj.weight"]
    assert sorted(no_decay["names"]) == sorted(
        ["pos_embed", "modulation", "proj.bias", "ln.weight", "ln.bias", "rms.scale"]
    )


def test_adamw_decays_only_the_decay_group():
    torch.manual_seed(0)
    net = Net()
    opt = build_optimizer(net, OptimConfig(lr=0.5, weight_decay=0.1))
    assert len(opt.param_groups) == 2 and opt.defaults["betas"] == (0.9, 0.999)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.zeros_like(p)  # zero gradient: the Adam step is 0, only decoupled decay moves weights
    opt.step()
    torch.testing.assert_close(net.proj.weight, before["proj.weight"] * (1 - 0.5 * 0.1), rtol=0, atol=1e-7)
    torch.testing.assert_close(net.embed.weight, before["embed.weight"] * (1 - 0.5 * 0.1), rtol=0, atol=1e-7)
    for name in ("proj.bias", "ln.weight", "pos_embed", "modulation", "rms.scale", "frozen.weight"):
        assert torch.equal(dict(net.named_parameters())[name], before[name]), name


def test_optimizer_errors():
    net = nn.Linear(3, 3).to(torch.bfloat16)
    with pytest.raises(ValueError, match="'weight' is torch.bfloat16.*float32"):
        build_optimizer(net, OptimConfig())
    frozen = nn.Linear(3, 3).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(frozen, OptimConfig())


def _lrs(cfg, total, n):
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(2, 2))], lr=cfg.lr)
    sched = build_lr_scheduler(opt, cfg, total)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])  # the rate the step uses
        opt.step()
        sched.step()
    return out, opt, sched


def test_warmup_then_cosine_values():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr=0.1)
    lrs, _, _ = _lrs(cfg, total=14, n=16)
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)  # cosine starts at the peak
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # halfway: 0.55
    assert lrs[11] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.7)))
    assert lrs[14] == pytest.approx(0.1) and lrs[15] == pytest.approx(0.1)  # held at min_lr after train.steps
    assert lr_factor(0, warmup_steps=10, total_steps=100) == pytest.approx(0.1)


def test_constant_schedule_and_state_dict_resume():
    lrs, _, _ = _lrs(OptimConfig(lr=2e-3, warmup_steps=2, schedule="constant"), total=10, n=5)
    assert lrs == pytest.approx([1e-3, 2e-3, 2e-3, 2e-3, 2e-3])

    cfg = OptimConfig(lr=1.0, warmup_steps=3, min_lr=0.0)
    full, _, _ = _lrs(cfg, total=12, n=12)
    _, opt, sched = _lrs(cfg, total=12, n=5)
    state = sched.state_dict()
    opt2 = torch.optim.AdamW([nn.Parameter(torch.zeros(2, 2))], lr=cfg.lr)
    sched2 = build_lr_scheduler(opt2, cfg, 12)
    sched2.load_state_dict(state)
    opt2.param_groups[0]["lr"] = opt.param_groups[0]["lr"]  # the optimizer state carries the current lr
    rest = []
    for _ in range(7):
        rest.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert rest == full[5:]


def test_clip_grad_norm_and_ema():
    p, q = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(4))
    p.grad, q.grad = torch.full((3,), 2.0), torch.full((4,), 1.0)
    norm = clip_grad_norm_([p, q], max_norm=2.0)
    assert norm == pytest.approx(4.0)  # sqrt(3 * 4 + 4 * 1)
    torch.testing.assert_close(p.grad, torch.full((3,), 1.0))
    assert clip_grad_norm_([p, q], max_norm=0) == pytest.approx(2.0)  # 0 = report only

    net = nn.Linear(2, 2)
    ema = EMA(net, decay=0.75)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(4.0)
    ema.update(net)
    torch.testing.assert_close(ema.state_dict()["weight"], start + 1.0)  # 0.75 * w + 0.25 * (w + 4)
