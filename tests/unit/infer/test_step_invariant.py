"""The step-invariant conditioning cache (mmkit/infer/accel/conditioning.py): the text embedding runs once
per guidance branch and generation, the result is bit-identical to running it every step, a changed input
runs the module again, and the block leaves the model as it was."""

from __future__ import annotations

import pytest
import torch
from wan_helpers import tiny_sampling_dit

from mmkit.infer.accel.conditioning import step_invariant_cache, step_invariant_modules
from mmkit.infer.samplers import FlowEulerScheduler, cfg_velocity, denoise
from mmkit.models.opensoraplan.model import OpenSoraPlanTransformer
from mmkit.models.wan.model import WanTransformer

STEPS = 6


@pytest.fixture(scope="module")
def model():
    return tiny_sampling_dit(layers=2)


def generate(model, cached: bool):
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 4, 2, 4, 4, generator=g)
    ctx, neg = torch.randn(1, 8, 16, generator=g), torch.randn(1, 8, 16, generator=g)
    fn = cfg_velocity(model, 4.0, {"text_context": ctx}, {"text_context": neg})
    calls = []
    counting = model.text_embed.fc2.register_forward_hook(lambda *_: calls.append(1))  # real evaluations
    try:
        with torch.no_grad():
            if not cached:
                return denoise(fn, noise, FlowEulerScheduler(shift=3.0), STEPS, progress=False), len(calls)
            with step_invariant_cache(model) as hooks:
                out = denoise(fn, noise, FlowEulerScheduler(shift=3.0), STEPS, progress=False)
            assert sum(h.calls for h in hooks) == len(calls)
            return out, len(calls)
    finally:
        counting.remove()


def test_text_embedding_runs_once_per_branch_and_the_result_is_bit_identical(model):
    ref, ref_calls = generate(model, cached=False)
    out, calls = generate(model, cached=True)
    assert ref_calls == 2 * STEPS  # cond + uncond at every step
    assert calls == 2  # once per branch
    assert torch.equal(out, ref)


def test_the_block_restores_the_model(model):
    before = dict(model.text_embed.__dict__)
    with step_invariant_cache(model):
        assert "_mmkit_hooks" in model.text_embed.__dict__
    assert model.text_embed.__dict__.keys() == before.keys()
    assert step_invariant_modules(model) == [model.text_embed]  # t2v: no image_embed


def test_a_changed_input_or_output_or_autograd_runs_the_module_again(model):
    x = torch.randn(1, 8, 16)
    with torch.no_grad(), step_invariant_cache(model) as (hook,):
        a = model.text_embed(x)
        assert model.text_embed(x) is a and hook.calls == 1
        x.mul_(2)  # in place: the version counter moves
        b = model.text_embed(x)
        assert hook.calls == 2 and not torch.equal(a, b)
        assert torch.equal(b, type(model.text_embed).forward(model.text_embed, x))
        b.add_(1)  # someone changed the stored output: not reused
        c = model.text_embed(x)
        assert hook.calls == 3 and c is not b
        assert model.text_embed(x.clone()) is not c and hook.calls == 4  # equal values, other tensor
    with step_invariant_cache(model) as (hook,):
        y = model.text_embed(x)
        model.text_embed(x)
        assert hook.calls == 2 and y.requires_grad  # autograd: always runs


def test_every_dit_family_names_its_conditioning_modules():
    assert WanTransformer._step_invariant == ("text_embed", "image_embed")
    assert OpenSoraPlanTransformer._step_invariant == ("text_embed",)


@pytest.mark.parametrize("family", ["wan", "opensoraplan"])
def test_the_pipelines_embed_the_prompt_once_per_branch(family, tmp_path):
    import mmkit

    if family == "wan":
        from mmkit.models.wan.tiny import create_tiny_wan as create
    else:
        from mmkit.models.opensoraplan.tiny import create_tiny_osp as create
    pipe = mmkit.load_pipeline(create(tmp_path / family, task="t2v"), task="t2v")
    calls = []
    pipe.transformer.text_embed.fc2.register_forward_hook(lambda *_: calls.append(1))
    pipe("a red cube", height=32, width=32, num_frames=5, num_inference_steps=3, seed=0, output_type="latent")
    assert len(calls) == 2  # cond + uncond, not 2 x 3 steps
    assert "_mmkit_hooks" not in pipe.transformer.text_embed.__dict__  # gone after the generation
