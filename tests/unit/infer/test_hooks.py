"""Hooks installed from outside: composition order, replaced forwards, exact removal, per-branch state,
and the generation-start reset in a tiny Wan pipeline."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mmkit
from mmkit.infer.accel.hooks import (
    BranchState,
    HookRegistry,
    ModelHook,
    TokenShards,
    call_as,
    reset_all,
    token_shards,
    token_sums,
)
from mmkit.infer.guidance import cfg_branch, current_cfg_branch
from mmkit.infer.samplers import cfg_velocity
from mmkit.models.wan.tiny import create_tiny_wan


class Affine(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x, scale=1.0):
        return self.lin(x) * scale


class Log(ModelHook):
    """Records the order of its calls in a shared list; adds `add` to the input and to the output."""

    def __init__(self, tag, log, add=0.0):
        self.tag, self.log, self.add = tag, log, add

    def pre_forward(self, module, x, **kwargs):
        self.log.append(f"pre {self.tag}")
        return (x + self.add,), kwargs

    def post_forward(self, module, output):
        self.log.append(f"post {self.tag}")
        return output + self.add


class Memo(ModelHook):
    """Replaces the call: runs the module once per branch, then returns the stored output."""

    def init_state(self):
        return {"out": None, "computed": 0}

    def new_forward(self, module, *args, **kwargs):
        if self.state["out"] is None:
            self.state["out"] = self.call_inner(*args, **kwargs)
            self.state["computed"] += 1
        return self.state["out"]


class CountByBranch(ModelHook):
    def init_state(self):
        return {"calls": 0}

    def pre_forward(self, module, *args, **kwargs):
        self.state["calls"] += 1
        return args, kwargs


@pytest.fixture
def mod():
    torch.manual_seed(0)
    return Affine()


def test_hooks_compose_in_registration_order(mod):
    x = torch.randn(2, 3)
    log = []
    reg = HookRegistry.get_or_create(mod)
    reg.register_hook(Log("a", log, add=1.0), "a")
    reg.register_hook(Log("b", log, add=10.0), "b")
    out = mod(x, scale=2.0)
    assert log == ["pre a", "pre b", "post b", "post a"]
    # a's input rewrite is seen by b; the module sees x + 11, b's output rewrite is seen by a
    torch.testing.assert_close(out, mod.lin(x + 11.0) * 2.0 + 11.0)
    assert HookRegistry.get_or_create(mod) is reg and reg.get_hook("b").tag == "b"


def test_remove_restores_the_original_forward_exactly(mod):
    x = torch.randn(2, 3)
    want = mod(x)
    reg = HookRegistry.get_or_create(mod)
    reg.register_hook(Log("a", [], add=1.0), "a")
    reg.register_hook(Log("b", [], add=2.0), "b")
    assert "forward" in mod.__dict__
    reg.remove_hook("a")
    torch.testing.assert_close(mod(x), mod.lin(x + 2.0) + 2.0)  # b alone still works
    reg.remove_hook("b")
    assert "forward" not in mod.__dict__ and "_mmkit_hooks" not in mod.__dict__
    assert mod.forward.__func__ is Affine.forward
    torch.testing.assert_close(mod(x), want)
    with pytest.raises(KeyError, match="no hook named 'b'"):
        reg.remove_hook("b")


def test_an_instance_level_forward_is_kept_and_restored(mod):
    own = mod.forward  # e.g. another library's wrapper put on the instance
    mod.forward = lambda x: own(x) * 0 + 5
    mine = mod.__dict__["forward"]
    reg = HookRegistry.get_or_create(mod)
    reg.register_hook(Log("a", [], add=1.0), "a")
    assert torch.equal(mod(torch.zeros(1, 3)), torch.full((1, 3), 6.0))
    reg.remove_hook("a")
    assert mod.__dict__["forward"] is mine


def test_new_forward_replaces_the_call_and_state_is_per_branch(mod):
    x = torch.randn(2, 3)
    hook = Memo()
    HookRegistry.get_or_create(mod).register_hook(hook, "memo")
    with cfg_branch("cond"):
        a = mod(x)
        assert torch.equal(mod(x * 3), a)  # served from the cond state
    with cfg_branch("uncond"):
        b = mod(x * 2)
    torch.testing.assert_close(b, mod.lin(x * 2))
    assert hook.state_for("cond")["computed"] == 1 and hook.state_for("uncond")["computed"] == 1
    reset_all(nn.Sequential(mod))  # reaches hooks on submodules
    with cfg_branch("cond"):
        torch.testing.assert_close(mod(x * 3), mod.lin(x * 3))


def test_call_as_runs_the_hooks_around_a_stand_in_forward(mod):
    """A wrapper computing the module's call another way keeps its hooks; without hooks it is the plain
    call, and the module's own forward is back after the call."""
    x = torch.randn(2, 3)

    def stand_in(x, scale=1.0):  # e.g. the same function computed on shards by several processes
        log.append("stand-in")
        return x * 100 * scale

    log = []
    assert torch.equal(call_as(mod, stand_in, x, scale=2.0), x * 200)
    HookRegistry.get_or_create(mod).register_hook(Log("a", log, add=1.0), "a")
    out = call_as(mod, stand_in, x, scale=2.0)
    assert log == ["stand-in", "pre a", "stand-in", "post a"]
    torch.testing.assert_close(out, (x + 1.0) * 200 + 1.0)
    torch.testing.assert_close(mod(x), mod.lin(x + 1.0) + 1.0)  # the module's own forward again


def test_token_sums_skip_padding_and_match_the_whole_sequence():
    torch.manual_seed(0)
    x, y = torch.randn(2, 6, 4), torch.randn(2, 6, 4)
    want = [float(t.sum(-1).double().sum()) for t in (x, y.abs())]  # per-token fp32, then float64
    assert token_sums(x, y.abs()) == pytest.approx(want, rel=1e-12)
    # one process holding tokens 0..3 of a sequence padded with 2 garbage tokens: those do not count
    padded = torch.cat([x[:, :4], torch.full((2, 2, 4), 1e3)], dim=1)
    with token_shards(TokenShards(None, torch.tensor([True] * 4 + [False] * 2))):
        (got,) = token_sums(padded)
    assert got == pytest.approx(float(x[:, :4].sum(-1).double().sum()), rel=1e-12)


def test_registration_errors(mod):
    reg = HookRegistry.get_or_create(mod)
    hook = Log("a", [])
    reg.register_hook(hook, "a")
    with pytest.raises(ValueError, match="already registered on Affine"):
        reg.register_hook(Log("b", []), "a")
    with pytest.raises(ValueError, match="already registered; make one per module"):
        HookRegistry.get_or_create(Affine()).register_hook(hook, "again")
    with pytest.raises(ValueError, match="cfg_branch\\('both'\\)"):
        with cfg_branch("both"):
            pass


def test_branch_state_and_mark():
    s = BranchState(lambda: [])
    assert current_cfg_branch() is None
    s.current().append("none")
    with cfg_branch("uncond"):
        assert current_cfg_branch() == "uncond"
        s.current().append("u")
    assert current_cfg_branch() is None
    assert s.branches() == {None: ["none"], "uncond": ["u"]}
    s.reset()
    assert s.branches() == {}


def test_cfg_velocity_marks_each_call():
    seen = []

    def model(x, t, ctx):
        seen.append((current_cfg_branch(), ctx))
        return x * ctx

    x = torch.ones(1)
    v = cfg_velocity(model, 3.0, {"ctx": 2.0}, {"ctx": 1.0})(x, torch.zeros(1))
    assert seen == [("cond", 2.0), ("uncond", 1.0)] and float(v) == 1.0 + 3.0 * (2.0 - 1.0)
    cfg_velocity(model, 1.0, {"ctx": 2.0}, None)(x, torch.zeros(1))
    assert seen[-1] == ("cond", 2.0)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = create_tiny_wan(tmp_path_factory.mktemp("wan") / "t2v", task="t2v", seed=3)
    return mmkit.load_pipeline(folder, task="t2v", device="cpu")


def test_a_wan_generation_counts_calls_per_branch_and_resets(pipe):
    hook = CountByBranch()
    block = pipe.transformer.blocks[1]
    HookRegistry.get_or_create(block).register_hook(hook, "count")
    args = dict(height=32, width=32, num_frames=5, seed=0, output_type="latent", progress=False)
    try:
        hooked = pipe("a cube", num_inference_steps=3, guidance_scale=5.0, **args).frames
        assert {b: s["calls"] for b, s in hook.branch_states().items()} == {"cond": 3, "uncond": 3}
        pipe("a cube", num_inference_steps=2, guidance_scale=5.0, **args)  # reset at the start
        assert hook.state_for("cond")["calls"] == 2 and hook.state_for("uncond")["calls"] == 2
        pipe("a cube", num_inference_steps=2, guidance_scale=1.0, **args)  # no guidance: cond only
        assert {b: s["calls"] for b, s in hook.branch_states().items()} == {"cond": 2}
    finally:
        HookRegistry.get_or_create(block).remove_hook("count")
    assert "forward" not in block.__dict__
    plain = pipe("a cube", num_inference_steps=3, guidance_scale=5.0, **args).frames
    assert torch.equal(hooked, plain)  # a hook that only observes changes nothing
