"""`mmkit convert hf-to-mm / resplit / mm-to-hf` and the `mm-convert` converter-class syntax, end to end on tiny
real-layout folders: HF -> mm (tp2, pp2) -> resplit (tp1, pp1) -> HF is bit-exact with the input, and the
result loads in transformers / diffusers with identical outputs."""

from __future__ import annotations

import json
import re

import pytest
import torch
from qwen2_5_vl_helpers import pixels, prompt
from safetensors.torch import load_file

from mmkit.checkpoint.dcp import export_model_state, save_checkpoint
from mmkit.checkpoint.hf import read_hf
from mmkit.checkpoint.mm import load_mm_state
from mmkit.cli.main import main as mmkit_main
from mmkit.cli.mm_convert import main as mm_convert
from mmkit.config import Config
from mmkit.convert.export import export_to_hf
from mmkit.convert.ops import hf_to_mm, mm_to_hf, resplit
from mmkit.models.common.hf_io import load_state_dict, read_json
from mmkit.models.qwen2_5_vl import hf as qwen_hf
from mmkit.models.qwen2_5_vl.load import load_model
from mmkit.models.qwen2_5_vl.rope import token_type_ids
from mmkit.models.qwen2_5_vl.tiny import create_tiny_qwen2_5_vl, tiny_config
from mmkit.models.wan.tiny import create_tiny_wan

QWEN_SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
    "chat_template.json",
)


@pytest.fixture(scope="module")
def qwen_src(tmp_path_factory):
    return create_tiny_qwen2_5_vl(tmp_path_factory.mktemp("q") / "qwen", seed=0)  # 2 layers, 4 heads / 2 KV


@pytest.fixture(scope="module")
def wan_src(tmp_path_factory):
    return create_tiny_wan(tmp_path_factory.mktemp("w") / "wan", task="i2v", seed=0, vae="random")


def _same_tensors(a_dir, b_dir) -> None:
    a, b = load_state_dict(a_dir), load_state_dict(b_dir)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _qwen_logits(folder):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    cfg = tiny_config()
    g = torch.Generator().manual_seed(2)
    grid = (1, 4, 8)
    ids = torch.tensor([prompt(cfg, g, [4, ("image", grid), 6])])
    with torch.no_grad():
        return model(
            input_ids=ids,
            mm_token_type_ids=token_type_ids(ids, cfg.image_token_id, cfg.video_token_id),
            pixel_values=pixels([grid], g),
            image_grid_thw=torch.tensor([grid]),
        ).logits


def _wan_out(folder):
    from diffusers import WanTransformer3DModel

    dit = WanTransformer3DModel.from_pretrained(folder).eval()
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(1, 36, 2, 4, 6, generator=g), torch.randn(1, 7, 32, generator=g)
    img = torch.randn(1, 17, 32, generator=g)  # CLIP tokens
    with torch.no_grad():
        return dit(x, torch.tensor([300.0]), ctx, encoder_hidden_states_image=img, return_dict=False)[0]


# ---------------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------------
def test_qwen_tp2_pp2_then_unsplit_then_hf_is_bit_exact(qwen_src, tmp_path):
    split = hf_to_mm(qwen_src, tmp_path / "split", tp=2, pp_layers=[1, 1], progress=False)
    meta = read_json(split / "layout.json")
    assert (meta["format"], meta["tp"], meta["pp"], meta["stage_layers"]) == ("mmkit-mp-rank", 2, 2, [1, 1])
    assert meta["vit_pp_layers"] == [2, 0] and meta["names"] == "global"
    assert sorted(p.name for p in split.glob("mp_rank_*")) == [
        "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001",
    ]  # fmt: skip
    src = read_hf(qwen_src).state
    rank10, rank01 = (
        load_file(str(split / "mp_rank_01_000" / "model.safetensors")),
        load_state_dict(split / "mp_rank_00_001"),
    )
    q, o = "language.layers.0.attn.q_proj.weight", "language.layers.0.attn.o_proj.weight"
    assert torch.equal(rank10[q], src[q][32:]) and torch.equal(rank10[o], src[o][:, 32:])  # heads 2, 3
    assert "visual.merger.fc1.weight" in rank10 and not any(k.startswith("visual.") for k in rank01)
    assert (
        "language.layers.1.mlp.up_proj.weight" in rank01
        and "language.layers.0.attn_norm.weight" not in rank01
    )

    dcp = resplit(split, tmp_path / "dcp", progress=False)  # tp1 pp1: a training checkpoint
    assert (dcp / "latest").read_text().strip() == "step_0" and (dcp / "config.toml").is_file()
    trained_view = export_model_state(dcp)  # the trainer's reader
    assert all(torch.equal(trained_view[k], v) for k, v in src.items())

    out = tmp_path / "hf"
    assert mmkit_main(["convert", "mm-to-hf", str(dcp), str(out), "--quiet"]) == 0
    _same_tensors(qwen_src, out)
    for name in QWEN_SIDE_FILES:
        assert (out / name).read_bytes() == (qwen_src / name).read_bytes(), name
    assert torch.equal(_qwen_logits(out), _qwen_logits(qwen_src))
    # the trainer's exporter reads the converted checkpoint through its config.toml as well
    _same_tensors(qwen_src, export_to_hf(dcp / "step_0", tmp_path / "hf2", progress=False))
    # and the pre-split folder goes straight back too (merged first)
    _same_tensors(qwen_src, mm_to_hf(split, tmp_path / "hf3", progress=False))


def test_wan_i2v_tp2_pp2_then_unsplit_then_hf_is_bit_exact(wan_src, tmp_path):
    assert (
        mmkit_main(["convert", "hf-to-mm", str(wan_src), str(tmp_path / "split"), "--tp", "2", "--pp", "2"])
        == 0
    )
    meta = read_json(tmp_path / "split" / "layout.json")
    assert meta["source"] == str(wan_src.resolve()) and meta["stage_layers"] == [1, 1]
    assert meta["tensors"]["blocks.1.cross.k_img.weight"] == {
        "shape": [64, 64], "dtype": "float32", "tp_dim": 0, "stage": 1,
    }  # fmt: skip
    r11 = load_state_dict(tmp_path / "split" / "mp_rank_01_001")
    assert "head.proj.weight" in r11 and not any(k.startswith(("blocks.0.", "patch_embed")) for k in r11)
    assert mmkit_main(["convert", "resplit", str(tmp_path / "split"), str(tmp_path / "dcp"), "--quiet"]) == 0
    family, cfg, state = load_mm_state(tmp_path / "dcp")
    assert family == "wan" and cfg.image_dim == 32 and state["blocks.1.cross.v_img.weight"].shape == (64, 64)
    out = mm_to_hf(tmp_path / "dcp", tmp_path / "hf", progress=False)
    _same_tensors(wan_src / "transformer", out / "transformer")
    assert (out / "vae" / "config.json").read_bytes() == (wan_src / "vae" / "config.json").read_bytes()
    want = _wan_out(wan_src / "transformer")
    assert want.abs().max() > 0.1 and torch.equal(_wan_out(out / "transformer"), want)


def test_tied_embeddings_through_dcp(tmp_path):
    """A tied-embedding Qwen (as Qwen2.5-VL-3B): one tensor in HF, two names in mmkit, bit-exact back."""
    cfg = tiny_config()
    cfg.tie_word_embeddings = True
    src = create_tiny_qwen2_5_vl(tmp_path / "tied", seed=1, cfg=cfg)
    dcp = hf_to_mm(src, tmp_path / "dcp", progress=False)
    state = export_model_state(dcp)
    assert torch.equal(state["language.lm_head.weight"], state["language.embed_tokens.weight"])
    _same_tensors(src, mm_to_hf(dcp, tmp_path / "back", progress=False))
    split = resplit(dcp, tmp_path / "split", tp=2, pp=2, progress=False)
    _same_tensors(src, mm_to_hf(split, tmp_path / "back2", progress=False))


def test_training_checkpoint_resplits(qwen_src, tmp_path):
    """A checkpoint `mmkit train` wrote (DCP + the run's config.toml) -> pre-split -> HF."""
    model = load_model(qwen_src, device="cpu")
    with torch.no_grad():
        model.language.norm.weight.mul_(1.5)  # "training" moved a weight
    run = Config()
    run.model.family, run.model.task, run.model.init_from = "qwen2_5_vl", "sft", str(qwen_src)
    save_checkpoint(tmp_path / "ckpt", 3, model, config=run)
    trained = {k: v.detach() for k, v in model.state_dict().items()}
    split = resplit(tmp_path / "ckpt", tmp_path / "split", tp=2, pp_layers=[[1, 1]], progress=False)
    _, _, state = load_mm_state(split)
    assert sorted(state) == sorted(trained) and all(torch.equal(state[k], v) for k, v in trained.items())
    got = load_state_dict(mm_to_hf(split, tmp_path / "hf", progress=False))
    want = qwen_hf.to_hf(trained, model.cfg)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert not torch.equal(
        got["model.language_model.norm.weight"], load_state_dict(qwen_src)["model.language_model.norm.weight"]
    )


# ---------------------------------------------------------------------------------------------------
# mm-convert syntax
# ---------------------------------------------------------------------------------------------------
def test_mm_convert_qwen_syntax(qwen_src, tmp_path, capsys):
    mm, again, hf = tmp_path / "mm", tmp_path / "tp2", tmp_path / "hf"
    args = [
        "Qwen2_5_VLConverter",
        "hf_to_mm",
        "--cfg.mm_dir",
        str(mm),
        "--cfg.hf_config.hf_dir",
        str(qwen_src),
    ]
    args += [
        "--cfg.parallel_config.llm_pp_layers",
        "[[1,1]]",
        "--cfg.parallel_config.vit_pp_layers",
        "[[2,0]]",
    ]
    assert mm_convert(args + ["--cfg.parallel_config.tp_size", "1"]) == 0
    assert read_json(mm / "layout.json")["stage_layers"] == [1, 1]
    args = ["Qwen2_5_VLConverter", "resplit", f"--cfg.source_dir={mm}", f"--cfg.target_dir={again}"]
    args += [
        "--cfg.source_parallel_config.llm_pp_layers",
        "[[1,1]]",
        "--cfg.target_parallel_config.tp_size",
        "2",
    ]
    assert mm_convert(args) == 0
    assert read_json(again / "layout.json")["tp"] == 2
    args = ["Qwen2_5_VLConverter", "mm_to_hf", "--cfg.mm_dir", str(again), "--cfg.save_hf_dir", str(hf)]
    assert (
        mm_convert(args + ["--cfg.hf_config.hf_dir", str(qwen_src), "--cfg.parallel_config.tp_size", "2"])
        == 0
    )
    _same_tensors(qwen_src, hf)
    assert "wrote" in capsys.readouterr().out


def test_mm_convert_wan_syntax(wan_src, tmp_path):
    a, b, hf = tmp_path / "a", tmp_path / "b", tmp_path / "hf"
    base = ["WanConverter"]
    assert mm_convert(base + ["hf_to_mm", "--cfg.source_path", str(wan_src / "transformer"), "--cfg.target_path",
                              str(a), "--cfg.target_parallel_config.pp_layers", "[1,1]"]) == 0  # fmt: skip
    assert read_json(a / "layout.json")["source"] == str(
        wan_src.resolve()
    )  # the pipeline beside transformer/
    assert mm_convert(base + ["resplit", "--cfg.source_path", str(a), "--cfg.target_path", str(b),
                              "--cfg.target_parallel_config.tp_size", "2"]) == 0  # fmt: skip
    assert mm_convert(base + ["mm_to_hf", "--cfg.source_path", str(b), "--cfg.target_path", str(hf)]) == 0
    _same_tensors(wan_src / "transformer", hf / "transformer")


# ---------------------------------------------------------------------------------------------------
# Errors: one clear line, exit code 2, nothing written
# ---------------------------------------------------------------------------------------------------
def test_errors_name_the_field_and_the_fix(qwen_src, wan_src, tmp_path, capsys):
    q = [
        "Qwen2_5_VLConverter",
        "hf_to_mm",
        "--cfg.mm_dir",
        str(tmp_path / "o"),
        "--cfg.hf_config.hf_dir",
        str(qwen_src),
    ]
    cases = [
        (q + ["--cfg.parallel_config.tp_size", "3"], "cfg.parallel_config.tp_size=3: larger than the model's 2 key/value"),
        (q + ["--cfg.parallel_config.llm_pp_layers", "[1,2]"], "the stages hold 3 layers but the model has 2"),
        (q + ["--cfg.parallel_config.llm_pp_layers", "[[2,0]]"], "stage 1 has no layers"),
        (q + ["--cfg.parallel_config.llm_pp_layers", "[1,1]", "--cfg.parallel_config.vit_pp_layers", "[1,1]"],
         "cfg.parallel_config.vit_pp_layers=.*stage 0"),
        (q + ["--cfg.parallel_config.tp_sise", "2"], "unknown field cfg.parallel_config.tp_sise; did you mean 'parallel_config.tp_size'"),
        (["Qwen2VLConverter", "hf_to_mm"], "unknown converter 'Qwen2VLConverter'.*Qwen2_5_VLConverter, WanConverter"),
        (["WanConverter", "hf_to_hf"], "unknown action 'hf_to_hf'"),
        (["WanConverter", "hf_to_mm", "--cfg.source_path", str(qwen_src), "--cfg.target_path", str(tmp_path / "o")],
         "holds a qwen2_5_vl model, not wan"),
        (["Qwen2_5_VLConverter", "hf_to_mm", "--cfg.mm_dir", str(tmp_path / "o")], "cfg.hf_config.hf_dir is required"),
    ]  # fmt: skip
    for argv, msg in cases:
        assert mm_convert(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("mm-convert: error:") and re.search(msg, err), (msg, err)
    assert not (tmp_path / "o").exists()
    # the same checks behind `mmkit convert`, naming its flags
    assert mmkit_main(["convert", "hf-to-mm", str(wan_src), str(tmp_path / "o"), "--tp", "3"]) == 2
    assert "--tp=3: larger than the model's 2 key/value heads" in capsys.readouterr().err
    assert mmkit_main(["convert", "hf-to-mm", str(wan_src), str(tmp_path / "o"), "--pp-layers", "[3]"]) == 2
    assert "--pp-layers=[3]" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    assert mmkit_main(["convert", "hf-to-mm", str(wan_src), str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err and (tmp_path / "full" / "x").read_text() == "keep"


def test_stated_source_layout_must_match_the_checkpoint(qwen_src, tmp_path, capsys):
    split = hf_to_mm(qwen_src, tmp_path / "split", tp=2, progress=False)
    argv = [
        "Qwen2_5_VLConverter",
        "resplit",
        "--cfg.source_dir",
        str(split),
        "--cfg.target_dir",
        str(tmp_path / "t"),
    ]
    assert mm_convert(argv + ["--cfg.source_parallel_config.tp_size", "1"]) == 2
    assert "cfg.source_parallel_config.tp_size=1" in capsys.readouterr().err and not (tmp_path / "t").exists()
    assert json.loads((split / "layout.json").read_text())["tp"] == 2
