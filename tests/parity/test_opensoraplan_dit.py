"""OpenSoraPlan 1.3 DiT against the outputs of the original v1.3.1 code (tests/fixtures/opensoraplan13).

The fixture weights load through the release adapter (`models/opensoraplan/hf.py`), as a user's
checkpoint does; inputs follow the fixture README's call conventions. Tolerances: the README's
rtol 1e-4, atol 1e-5 for DiT outputs and hooks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmkit.models.opensoraplan.hf import ADAPTER
from mmkit.models.opensoraplan.model import OpenSoraPlanTransformer

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "opensoraplan13"
TOL = dict(rtol=1e-4, atol=1e-5)


def release_folder(tmp_path: Path, name: str) -> Path:
    """The fixture as a release DiT folder: config.json + diffusion_pytorch_model.safetensors."""
    d = tmp_path / name
    d.mkdir()
    shutil.copy(FIX / f"{name}_diffusers_config.json", d / "config.json")
    shutil.copy(FIX / f"{name}_weights.safetensors", d / "diffusion_pytorch_model.safetensors")
    return d


def load_model(tmp_path: Path, name: str) -> OpenSoraPlanTransformer:
    m = ADAPTER.read(release_folder(tmp_path, name))
    model = OpenSoraPlanTransformer(m.cfg).eval()
    model.load_state_dict(m.state, strict=True)
    return model


def run_case(model, io, case: str, hooks: dict | None = None):
    """The DiT on `<case>_in_*`; `hooks` collects block outputs in the fixture's (N, B, D) layout."""
    handles = []
    if hooks is not None:
        for i, block in enumerate(model.blocks):
            handles.append(
                block.register_forward_hook(lambda m, a, out, i=i: hooks.__setitem__(i, out.transpose(0, 1)))
            )
    try:
        with torch.no_grad():
            return model(
                io[f"{case}_in_hidden_states"],
                io[f"{case}_in_timestep"],
                io[f"{case}_in_encoder_hidden_states"],
                video_mask=io[f"{case}_in_attention_mask"],
                caption_mask=io[f"{case}_in_encoder_attention_mask"],
            )
    finally:
        for h in handles:
            h.remove()


def check_hooks(model, io, case: str, blocks: dict) -> None:
    with torch.no_grad():
        x, temb, e, ctx = model.embed(
            io[f"{case}_in_hidden_states"], io[f"{case}_in_timestep"], io[f"{case}_in_encoder_hidden_states"]
        )
        if model.cfg.i2v:
            n = model.cfg.in_channels
            lat = io[f"{case}_in_hidden_states"]
            torch.testing.assert_close(model.patch_embed(lat[:, :n]), io[f"{case}_hook_pos_embed"], **TOL)
            torch.testing.assert_close(
                model.masked_embed(lat[:, n : 2 * n]),
                io[f"{case}_hook_pos_embed_masked_hidden_states"],
                **TOL,
            )
            torch.testing.assert_close(
                model.mask_embed(lat[:, 2 * n :]), io[f"{case}_hook_pos_embed_mask"], **TOL
            )
        else:
            torch.testing.assert_close(x, io[f"{case}_hook_pos_embed"], **TOL)
    torch.testing.assert_close(ctx, io[f"{case}_hook_caption_projection"][:, 0], **TOL)
    torch.testing.assert_close(e.flatten(1), io[f"{case}_hook_adaln_single_0"], **TOL)
    torch.testing.assert_close(temb, io[f"{case}_hook_adaln_single_1"], **TOL)
    for i, out in blocks.items():
        torch.testing.assert_close(
            out, io[f"{case}_hook_block{i}"], **TOL, msg=lambda m, i=i: f"block {i}: {m}"
        )


@pytest.fixture(scope="module")
def t2v(tmp_path_factory):
    return load_model(tmp_path_factory.mktemp("osp"), "t2v"), load_file(FIX / "t2v_io.safetensors")


@pytest.mark.parametrize("case", ["case1", "case2", "case3"])
def test_t2v_matches_original(t2v, case):
    model, io = t2v
    blocks = {}
    out = run_case(model, io, case, blocks if case != "case3" else None)
    torch.testing.assert_close(out, io[f"{case}_out_sample"], **TOL)
    if case != "case3":
        check_hooks(model, io, case, blocks)


def test_t2v_skiparse_mutations_fail(t2v):
    """Dense instead of Skiparse, or single and group swapped, must break parity (the README's costs)."""
    model, io = t2v
    want = io["case1_out_sample"]
    modes = [b.attn.skiparse for b in model.blocks]
    assert modes == [None, None, "single", "group"]
    try:
        for mutated in ([None] * 4, [None, None, "group", "single"]):
            for b, m in zip(model.blocks, mutated):
                b.attn.skiparse = m
            err = (run_case(model, io, "case1") - want).abs().max().item()
            assert err > 1e-2, f"Skiparse mutation {mutated} changed case1 by only {err}"
    finally:
        for b, m in zip(model.blocks, modes):
            b.attn.skiparse = m


def test_t2v32l_dense_sparse_rule(tmp_path):
    model = load_model(tmp_path, "t2v32l")
    io = load_file(FIX / "t2v32l_io.safetensors")
    flags = io["block_sparse1d_and_group_flags"]
    for i, block in enumerate(model.blocks):
        mode = block.attn.skiparse
        assert (mode is not None) == bool(flags[i, 0]), i
        if mode is not None:
            assert (mode == "group") == bool(flags[i, 1]), i
    torch.testing.assert_close(run_case(model, io, "case1"), io["case1_out_sample"], **TOL)


def test_i2v_matches_original(tmp_path):
    model = load_model(tmp_path, "i2v")
    io = load_file(FIX / "i2v_io.safetensors")
    assert (
        json.loads((FIX / "i2v_diffusers_config.json").read_text())["_class_name"] == "OpenSoraInpaint_v1_3"
    )
    blocks = {}
    out = run_case(model, io, "case1", blocks)
    torch.testing.assert_close(out, io["case1_out_sample"], **TOL)
    check_hooks(model, io, "case1", blocks)


@pytest.mark.parametrize("p", ["maskcomp", "maskcomp2"])
def test_mask_compressor_matches_original(p):
    from mmkit.models.opensoraplan.masks import compress_mask

    io = load_file(FIX / "i2v_io.safetensors")
    out = compress_mask(io[f"{p}_in_pixel_mask"], 4, 8, 8)
    torch.testing.assert_close(out, io[f"{p}_out_latent_mask"], **TOL)
    if p == "maskcomp":  # exactly the mask channels of the i2v DiT input
        torch.testing.assert_close(out, io["case1_in_hidden_states"][:, 16:], rtol=0, atol=0)
