"""mmkit training checkpoint -> HF folder (`mmkit convert mm-to-hf`): the folder loads in diffusers /
transformers and gives the outputs of the checkpoint's model; the bytes written are the converter's."""

from __future__ import annotations

import shutil

import pytest
import torch
from qwen2_5_vl_helpers import pixels, prompt
from safetensors.torch import load_file

import mmkit
from mmkit.checkpoint.dcp import export_model_state, load_checkpoint, read_checkpoint_info, save_checkpoint
from mmkit.checkpoint.hf import parse_size
from mmkit.cli.main import main
from mmkit.config import Config, parse_cli
from mmkit.convert.export import export_to_hf
from mmkit.data.synth import synth_shapes
from mmkit.models.common.hf_io import load_state_dict, read_json
from mmkit.models.qwen2_5_vl import hf as qwen_hf
from mmkit.models.qwen2_5_vl.load import load_model
from mmkit.models.qwen2_5_vl.model import Qwen2_5_VLModel
from mmkit.models.qwen2_5_vl.rope import token_type_ids
from mmkit.models.qwen2_5_vl.tiny import create_tiny_qwen2_5_vl, perturbed_init, tiny_config
from mmkit.models.wan import hf as wan_hf
from mmkit.models.wan.config import WanConfig
from mmkit.models.wan.load import load_transformer
from mmkit.models.wan.model import WanTransformer
from mmkit.models.wan.tiny import create_tiny_wan
from mmkit.train.trainer import Trainer


# ---------------------------------------------------------------------------------------------------
# Fixtures: a tiny Wan trained 2 steps through the Trainer (with EMA), a tiny Qwen checkpoint
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wan_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("wanexport")
    create_tiny_wan(root / "wan", task="t2v", seed=0)
    synth_shapes(root / "shapes", videos=2, num_frames=9, height=32, width=32, seed=0, progress=False)
    args = ["--config", "recipes/tiny/wan_t2v.toml", "--model.init_from", str(root / "wan")]
    args += ["--data.paths", f"[{root / 'shapes' / 'data.txt'}]", "--train.steps", "2"]
    args += ["--train.global_batch", "2", "--train.micro_batch", "2", "--optim.warmup_steps", "1"]
    args += ["--train.ema", "true", "--train.ema_decay", "0.5"]  # an EMA between init and trained weights
    args += ["--checkpoint.dir", str(root / "ckpt"), "--logging.progress_bar", "false"]
    args += ["--logging.log_interval", "100"]
    Trainer(parse_cli(args)).fit()
    return root


def _wan_from_ckpt(root) -> WanTransformer:
    """The trained DiT as mmkit resumes it (architecture from the init folder, weights from DCP)."""
    model = WanTransformer(WanConfig.from_dict(read_json(root / "wan" / "transformer" / "config.json")))
    load_checkpoint(root / "ckpt", model, load_rng=False)
    return model.eval()


def _dit_inputs(in_channels=16):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, in_channels, 3, 6, 10, generator=g)  # odd token grid 3x3x5
    return x, torch.tensor([613.0]), torch.randn(1, 9, 32, generator=g)


def _qwen_config(init_from=None) -> Config:
    cfg = Config()
    cfg.model.family, cfg.model.task, cfg.model.flavor = "qwen2_5_vl", "sft", "tiny"
    cfg.model.init_from = str(init_from) if init_from else None
    return cfg


@pytest.fixture(scope="module")
def qwen_ckpt(tmp_path_factory):
    """A Qwen checkpoint whose weights moved away from its init folder (as training would)."""
    root = tmp_path_factory.mktemp("qwenexport")
    folder = create_tiny_qwen2_5_vl(root / "qwen", seed=0)
    model = load_model(folder, device="cpu", dtype="fp32")
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(0.05 * p.detach().abs().mean() * torch.randn(p.shape, generator=g))
    save_checkpoint(root / "ckpt", 3, model, config=_qwen_config(folder))
    return root, model.eval()


def _qwen_logits_gap(ref, ours, seed=2) -> float:
    """max |logits| difference on a prompt with one image, transformers vs mmkit (fp32)."""
    cfg = ours.cfg
    g = torch.Generator().manual_seed(seed)
    grid = (1, 8, 12)
    ids = torch.tensor([prompt(cfg, g, [5, ("image", grid), 7])])
    vis = dict(pixel_values=pixels([grid], g), image_grid_thw=torch.tensor([grid]))
    types = token_type_ids(ids, cfg.image_token_id, cfg.video_token_id)
    with torch.no_grad():
        a = ref(input_ids=ids, mm_token_type_ids=types, **vis).logits
        b = ours(ids, **vis)
    assert a.abs().max() > 1.0  # non-degenerate logits
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------------
# Wan
# ---------------------------------------------------------------------------------------------------
def test_wan_export_loads_in_diffusers_with_the_trained_outputs(wan_ckpt, tmp_path):
    from diffusers import WanPipeline, WanTransformer3DModel

    out = export_to_hf(wan_ckpt / "ckpt", tmp_path / "out", progress=False)
    pipe = WanPipeline.from_pretrained(out)
    ours = _wan_from_ckpt(wan_ckpt)
    x, t, ctx = _dit_inputs()
    with torch.no_grad():
        want = ours(x, t, ctx)
        got = pipe.transformer.eval()(x, t, ctx, return_dict=False)[0]
        init = WanTransformer3DModel.from_pretrained(wan_ckpt / "wan" / "transformer")(
            x, t, ctx, return_dict=False
        )[0]
    assert want.abs().max() > 0.5
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (init - want).abs().max() > 1e-3  # training moved the weights: a copy of init would fail
    # the frozen parts are the init folder's, byte for byte
    for rel in ("vae/diffusion_pytorch_model.safetensors", "tokenizer/tokenizer.json", "model_index.json"):
        assert (out / rel).read_bytes() == (wan_ckpt / "wan" / rel).read_bytes(), rel
    # and mmkit's own pipeline loader reads the export, with the trained weights
    mm = mmkit.load_pipeline(out, task="t2v", device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(mm.transformer(x, t, ctx), want, atol=1e-5, rtol=0)


def test_wan_export_bytes_are_the_converter_output(wan_ckpt, tmp_path):
    out = export_to_hf(
        wan_ckpt / "ckpt" / "step_2", tmp_path / "out", max_shard_bytes=100_000, progress=False
    )
    want = wan_hf.to_hf(export_model_state(wan_ckpt / "ckpt"))
    index = read_json(out / "transformer" / "diffusion_pytorch_model.safetensors.index.json")
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / "transformer" / s).is_file() for s in shards)
    got = load_state_dict(out / "transformer")
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def test_wan_ema_export_via_cli(wan_ckpt, tmp_path, capsys):
    out = tmp_path / "ema"
    assert main(["convert", "mm-to-hf", str(wan_ckpt / "ckpt"), str(out), "--ema", "--quiet"]) == 0
    assert "EMA" in capsys.readouterr().out
    got = load_state_dict(out / "transformer")
    ema = wan_hf.to_hf(export_model_state(wan_ckpt / "ckpt", "ema"))
    trained = wan_hf.to_hf(export_model_state(wan_ckpt / "ckpt", "model"))
    assert all(torch.equal(got[k], ema[k]) for k in ema)
    assert not torch.equal(got["blocks.0.attn1.to_q.weight"], trained["blocks.0.attn1.to_q.weight"])


def test_wan_original_layout_and_bf16(wan_ckpt, tmp_path):
    out = export_to_hf(wan_ckpt / "ckpt", tmp_path / "orig", layout="original", progress=False)
    assert read_json(out / "config.json")["_class_name"] == "WanModel"
    assert not (out / "vae").exists()  # the DiT alone
    assert "blocks.0.self_attn.q.weight" in load_state_dict(out)
    ours, again = _wan_from_ckpt(wan_ckpt), load_transformer(out)
    x, t, ctx = _dit_inputs()
    with torch.no_grad():
        torch.testing.assert_close(again(x, t, ctx), ours(x, t, ctx), atol=1e-5, rtol=0)
    low = export_to_hf(wan_ckpt / "ckpt", tmp_path / "bf16", dtype="bf16", progress=False)
    sd = load_state_dict(low / "transformer")
    assert {v.dtype for v in sd.values()} == {torch.bfloat16}


def test_wan_i2v_export_has_image_components(tmp_path):
    """i2v without training: a checkpoint of the init DiT with moved weights, saved with the run config."""
    from diffusers import WanImageToVideoPipeline

    init = create_tiny_wan(tmp_path / "wan_i2v", task="i2v", seed=1)
    dit = load_transformer(init / "transformer")
    with torch.no_grad():
        dit.blocks[0].cross.k_img.weight.mul_(1.5)  # the image K/V path must survive the export
    cfg = Config()
    cfg.model.task, cfg.model.init_from = "i2v", str(init)
    save_checkpoint(tmp_path / "ckpt", 1, dit, config=cfg)
    out = export_to_hf(tmp_path / "ckpt", tmp_path / "out", progress=False)
    assert (out / "image_encoder").is_dir() and (
        out / "image_processor" / "preprocessor_config.json"
    ).is_file()
    pipe = WanImageToVideoPipeline.from_pretrained(out)
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(1, 36, 2, 4, 6, generator=g), torch.randn(1, 512, 32, generator=g)
    img = torch.randn(1, 17, 32, generator=g)  # CLIP tokens: 16 patches + CLS
    with torch.no_grad():
        want = dit(x, torch.tensor([300.0]), ctx, img)
        got = pipe.transformer(
            x, torch.tensor([300.0]), ctx, encoder_hidden_states_image=img, return_dict=False
        )
    torch.testing.assert_close(got[0], want, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------
# Qwen2.5-VL
# ---------------------------------------------------------------------------------------------------
def test_qwen_export_loads_in_transformers_with_the_same_logits(qwen_ckpt, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    root, ours = qwen_ckpt
    out = export_to_hf(root / "ckpt", tmp_path / "out", max_shard_bytes=200_000, progress=False)
    assert (out / "model.safetensors.index.json").is_file()
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "generation_config.json",
    ):
        assert (out / name).read_bytes() == (root / "qwen" / name).read_bytes(), name
    ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    assert _qwen_logits_gap(ref, ours) <= 1e-4
    init = Qwen2_5_VLForConditionalGeneration.from_pretrained(root / "qwen", dtype=torch.float32).eval()
    assert _qwen_logits_gap(init, ours) > 1e-2  # the init weights would not pass
    # bit-exact: the shards hold exactly the converter's output
    want = qwen_hf.to_hf(export_model_state(root / "ckpt"), ours.cfg)
    got = load_state_dict(out)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    model, processor = mmkit.load_vlm(out, device="cpu")  # mmkit reads its own export too
    assert processor is not None and torch.equal(model.language.norm.weight, ours.language.norm.weight)


def test_qwen_flavor_run_needs_and_takes_tokenizer_from(qwen_ckpt, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    root, _ = qwen_ckpt
    torch.manual_seed(0)
    model = Qwen2_5_VLModel(tiny_config())
    perturbed_init(model, seed=5)
    save_checkpoint(tmp_path / "ckpt", 1, model, config=_qwen_config(None))
    with pytest.raises(ValueError, match="--tokenizer-from"):
        export_to_hf(tmp_path / "ckpt", tmp_path / "no_tok", progress=False)
    assert not (tmp_path / "no_tok").exists()  # nothing written on error
    out = export_to_hf(
        tmp_path / "ckpt", tmp_path / "out", tokenizer_from=root / "qwen", dtype="bf16", progress=False
    )
    config = read_json(out / "config.json")
    assert config["dtype"] == "bfloat16" and config["text_config"]["num_hidden_layers"] == 2
    assert load_file(str(out / "model.safetensors"))["lm_head.weight"].dtype == torch.bfloat16
    ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    ours = model.eval().to(torch.bfloat16).float()  # the weights the bf16 export holds
    assert _qwen_logits_gap(ref, ours, seed=4) <= 1e-4
    assert (out / "tokenizer.json").is_file()


# ---------------------------------------------------------------------------------------------------
# Errors: raised before anything is written, naming the file / field and the fix
# ---------------------------------------------------------------------------------------------------
def test_not_a_checkpoint_names_what_is_missing(tmp_path, qwen_ckpt):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="train_state.json"):
        export_to_hf(tmp_path / "empty", tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        export_to_hf(tmp_path / "nope", tmp_path / "o")
    step = tmp_path / "step_3"
    shutil.copytree(qwen_ckpt[0] / "ckpt" / "step_3", step)
    (step / "config.toml").unlink()
    with pytest.raises(FileNotFoundError, match="config.toml"):
        export_to_hf(step, tmp_path / "o")
    shutil.copy2(qwen_ckpt[0] / "ckpt" / "step_3" / "config.toml", step / "config.toml")
    for f in (step / "dcp").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="no DCP tensor shards"):
        export_to_hf(step, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_bad_family_layout_ema_outdir_and_init_from(tmp_path, qwen_ckpt, capsys):
    step = tmp_path / "step_3"
    shutil.copytree(qwen_ckpt[0] / "ckpt" / "step_3", step)
    with pytest.raises(ValueError, match="no EMA weights"):
        export_to_hf(step, tmp_path / "o", which="ema")
    with pytest.raises(ValueError, match="layout='original' does not apply to model.family='qwen2_5_vl'"):
        export_to_hf(step, tmp_path / "o", layout="original")
    with pytest.raises(FileNotFoundError, match="--init-from"):
        export_to_hf(step, tmp_path / "o", init_from=tmp_path / "moved")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        export_to_hf(step, tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    toml = step / "config.toml"
    toml.write_text(toml.read_text().replace('family = "qwen2_5_vl"', 'family = "llama"'))
    with pytest.raises(ValueError, match="model.family='llama'"):
        read_checkpoint_info(step)
    # the CLI turns these into one line on stderr and exit code 2
    assert main(["convert", "mm-to-hf", str(step), str(tmp_path / "o"), "--quiet"]) == 2
    assert "mmkit convert: error:" in capsys.readouterr().err


def test_checkpoint_not_matching_the_config_is_refused(tmp_path, qwen_ckpt):
    """A run config pointing at a folder of another architecture: caught by name/shape, nothing written."""
    other = create_tiny_qwen2_5_vl(tmp_path / "wide", seed=0, cfg=tiny_config(intermediate_size=80))
    with pytest.raises(ValueError, match="shape.*differ from the config"):
        export_to_hf(qwen_ckpt[0] / "ckpt", tmp_path / "o", init_from=other, progress=False)
    assert not (tmp_path / "o").exists()


def test_shard_size_text():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("1024") == 1024
    with pytest.raises(ValueError, match="5GB"):
        parse_size("5 gigs")
