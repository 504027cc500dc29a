"""The tiny Wan2.1 folders: real diffusers layout, loadable by diffusers' pipelines, non-trivial weights."""

import hashlib
import json
import types

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mmkit.models.wan.tiny import SCHEDULER_CONFIG, create_tiny_wan

TASKS = ("t2v", "i2v")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_wan")
    return {task: create_tiny_wan(root / task, task=task, seed=0, original_layout=True) for task in TASKS}


def _json(path):
    return json.loads(path.read_text())


def _tensors(folder):
    """Every tensor of every safetensors file under `folder`, keyed by (file, name)."""
    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        out.update({(str(f.relative_to(folder)), k): v for k, v in load_file(str(f)).items()})
    return out


@pytest.fixture
def no_ftfy_needed(monkeypatch):
    """diffusers 0.42.1's i2v pipeline calls `ftfy.fix_text` without checking ftfy is installed (the t2v
    pipeline checks and skips it). Without ftfy, stand in the identity, which is what t2v does."""
    from diffusers.pipelines.wan import pipeline_wan_i2v
    from diffusers.utils import is_ftfy_available

    if not is_ftfy_available():
        monkeypatch.setattr(
            pipeline_wan_i2v, "ftfy", types.SimpleNamespace(fix_text=lambda s: s), raising=False
        )


@pytest.mark.parametrize("task", TASKS)
def test_folder_has_the_real_diffusers_layout(folders, task):
    root = folders[task]
    index = _json(root / "model_index.json")
    expected = {
        "_class_name": "WanPipeline" if task == "t2v" else "WanImageToVideoPipeline",
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    if task == "i2v":
        expected["image_encoder"] = ["transformers", "CLIPVisionModelWithProjection"]
        expected["image_processor"] = ["transformers", "CLIPImageProcessor"]
    assert {k: v for k, v in index.items() if k != "_diffusers_version"} == expected

    # The transformer and the text encoder are sharded, with an index naming every shard.
    for sub, stem in (("transformer", "diffusion_pytorch_model"), ("text_encoder", "model")):
        shard_index = _json(root / sub / f"{stem}.safetensors.index.json")
        shards = sorted(set(shard_index["weight_map"].values()))
        assert len(shards) >= 2, sub
        assert all((root / sub / s).is_file() for s in shards)
        on_disk = {k for s in shards for k in load_file(str(root / sub / s))}
        assert on_disk == set(shard_index["weight_map"])
    for rel in ("vae/diffusion_pytorch_model.safetensors", "tokenizer/tokenizer.json"):
        assert (root / rel).is_file(), rel
    tok_cfg = _json(root / "tokenizer" / "tokenizer_config.json")
    assert (
        tok_cfg["model_max_length"] == 512
        and tok_cfg["pad_token"] == "<pad>"
        and tok_cfg["eos_token"] == "</s>"
    )

    sched = _json(root / "scheduler" / "scheduler_config.json")
    assert sched["prediction_type"] == "flow_prediction" and sched["use_flow_sigmas"] is True
    assert sched["flow_shift"] == 3.0 and sched["solver_order"] == 2 and sched == SCHEDULER_CONFIG

    if task == "i2v":
        assert (root / "image_encoder" / "model.safetensors").is_file()
        proc = _json(root / "image_processor" / "preprocessor_config.json")
        size = _json(root / "image_encoder" / "config.json")["image_size"]
        assert proc["size"] == {"shortest_edge": size} and proc["crop_size"] == {
            "height": size,
            "width": size,
        }
    else:
        assert not (root / "image_encoder").exists() and not (root / "image_processor").exists()


@pytest.mark.parametrize("task", TASKS)
def test_component_configs_fit_together(folders, task):
    root = folders[task]
    dit = _json(root / "transformer" / "config.json")
    te = _json(root / "text_encoder" / "config.json")
    vae = _json(root / "vae" / "config.json")
    tok = _json(root / "tokenizer" / "tokenizer.json")
    assert dit["text_dim"] == te["d_model"]
    assert te["vocab_size"] == len(tok["model"]["vocab"])
    assert dit["out_channels"] == vae["z_dim"] == len(vae["latents_mean"]) == len(vae["latents_std"])
    assert not np.allclose(vae["latents_mean"], 0) and not np.allclose(vae["latents_std"], 1)
    assert dit["patch_size"] == [1, 2, 2]
    # 3-D RoPE: head_dim splits into t/h/w = head - 2*(2*(head//6)), 2*(head//6), 2*(head//6); keep t != h.
    head = dit["attention_head_dim"]
    assert head - 4 * (head // 6) != 2 * (head // 6)
    if task == "t2v":
        assert dit["in_channels"] == 16 and dit["image_dim"] is None and dit["added_kv_proj_dim"] is None
    else:
        clip = _json(root / "image_encoder" / "config.json")
        assert dit["in_channels"] == 36
        assert dit["image_dim"] == clip["hidden_size"]
        assert dit["added_kv_proj_dim"] == dit["num_attention_heads"] * head


@pytest.mark.parametrize("task", TASKS)
def test_every_weight_is_perturbed_off_its_init(folders, task):
    tensors = _tensors(folders[task])
    assert len(tensors) > 100
    for (file, name), t in tensors.items():
        t = t.float()
        assert torch.isfinite(t).all(), (file, name)
        # No constant tensor survives: zero biases and unit norm weights were all moved.
        assert t.numel() == 1 or t.std() > 1e-3, (file, name)
        if "norm" in name and name.endswith(("weight", "gamma")):
            assert (t - 1).abs().max() < 0.6, (file, name)  # norm scales stay near 1


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path, folders):
    def digests(root):
        return {
            str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(root.rglob("*"))
            if f.is_file()
        }

    again = create_tiny_wan(tmp_path / "again", task="t2v", seed=0, original_layout=True)
    assert digests(again) == digests(folders["t2v"])
    other = _tensors(create_tiny_wan(tmp_path / "other", task="t2v", seed=1) / "transformer")
    base = _tensors(folders["t2v"] / "transformer")
    assert other.keys() == base.keys()
    assert all(not torch.equal(other[k], base[k]) for k in base)


def test_tokenizer_loads_like_the_pipeline_loads_it(folders):
    from transformers import AutoTokenizer, T5TokenizerFast

    path = folders["t2v"] / "tokenizer"
    for cls in (AutoTokenizer, T5TokenizerFast):
        tok = cls.from_pretrained(path)
        assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
        assert tok.model_max_length == 512
        # The pipelines' call: pad to 512, truncate, add </s>.
        enc = tok(["a red cube", "a 日 cube"], padding="max_length", max_length=512, truncation=True,
                  add_special_tokens=True, return_attention_mask=True, return_tensors="pt")  # fmt: skip
        assert enc.input_ids.shape == (2, 512)
        assert enc.input_ids[0, :4].tolist()[-1] == 1 and enc.attention_mask[0].sum() == 4  # 3 words + </s>
        assert (enc.input_ids[0, 4:] == 0).all()
        assert 2 in enc.input_ids[1, :5].tolist()  # out-of-vocabulary character -> <unk>
    assert len(tok) == _json(folders["t2v"] / "text_encoder" / "config.json")["vocab_size"]


def _frames(pipe, **kw):
    kw = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 2, "output_type": "np", **kw}
    return pipe(generator=torch.Generator().manual_seed(0), **kw).frames


def test_diffusers_wan_pipeline_loads_and_generates(folders):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(folders["t2v"])
    video = _frames(pipe, prompt="a red cube spins slowly", negative_prompt="blurry")
    assert video.shape == (1, 5, 32, 32, 3) and np.isfinite(video).all()
    # A live picture, not a flat or fully saturated one (the fitted VAE draws black backgrounds, so
    # many pixels sit at 0), and the prompt reaches it.
    assert video.std() > 0.05 and ((video <= 0) | (video >= 1)).mean() < 0.9
    other = _frames(pipe, prompt="two blue spheres bounce", negative_prompt="blurry")
    assert np.abs(video - other).max() > 1e-3
    np.testing.assert_array_equal(
        video, _frames(pipe, prompt="a red cube spins slowly", negative_prompt="blurry")
    )


def test_diffusers_wan_i2v_pipeline_loads_and_generates(folders, no_ftfy_needed):
    from diffusers import WanImageToVideoPipeline

    pipe = WanImageToVideoPipeline.from_pretrained(folders["i2v"])
    rng = np.random.RandomState(0)
    image = Image.fromarray((rng.rand(32, 32, 3) * 255).astype(np.uint8))
    video = _frames(pipe, image=image, prompt="a red cube spins slowly")
    assert video.shape == (1, 5, 32, 32, 3) and np.isfinite(video).all()
    assert video.std() > 0.05 and ((video <= 0) | (video >= 1)).mean() < 0.9  # fitted VAE: black backgrounds
    other_image = Image.fromarray((rng.rand(32, 32, 3) * 255).astype(np.uint8))
    assert np.abs(video - _frames(pipe, image=other_image, prompt="a red cube spins slowly")).max() > 1e-2


@pytest.mark.parametrize("task", TASKS)
def test_original_layout_holds_the_same_dit_under_original_names(folders, task):
    root = folders[task]
    cfg = _json(root / "original" / "config.json")
    dit = _json(root / "transformer" / "config.json")
    assert cfg["model_type"] == task and cfg["in_dim"] == dit["in_channels"]
    assert cfg["dim"] == dit["num_attention_heads"] * dit["attention_head_dim"]
    assert (root / "original" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    orig = {k: v for (_, k), v in _tensors(root / "original").items()}
    hf = {k: v for (_, k), v in _tensors(root / "transformer").items()}
    assert len(orig) == len(hf)
    # Spot checks written out by hand from Wan2.1's wan/modules/model.py.
    pairs = {
        "blocks.1.self_attn.q.weight": "blocks.1.attn1.to_q.weight",
        "blocks.0.self_attn.o.bias": "blocks.0.attn1.to_out.0.bias",
        "blocks.0.self_attn.norm_k.weight": "blocks.0.attn1.norm_k.weight",
        "blocks.1.cross_attn.v.weight": "blocks.1.attn2.to_v.weight",
        "blocks.0.norm3.weight": "blocks.0.norm2.weight",
        "blocks.1.ffn.2.weight": "blocks.1.ffn.net.2.weight",
        "blocks.0.modulation": "blocks.0.scale_shift_table",
        "head.modulation": "scale_shift_table",
        "head.head.weight": "proj_out.weight",
        "time_projection.1.weight": "condition_embedder.time_proj.weight",
        "text_embedding.2.bias": "condition_embedder.text_embedder.linear_2.bias",
        "patch_embedding.weight": "patch_embedding.weight",
    }
    if task == "i2v":
        pairs["blocks.1.cross_attn.k_img.weight"] = "blocks.1.attn2.add_k_proj.weight"
        pairs["blocks.0.cross_attn.norm_k_img.weight"] = "blocks.0.attn2.norm_added_k.weight"
        pairs["img_emb.proj.4.bias"] = "condition_embedder.image_embedder.norm2.bias"
    for o, h in pairs.items():
        assert torch.equal(orig[o], hf[h]), (o, h)
    assert not any(k.startswith(("condition_embedder", "proj_out")) or ".attn" in k for k in orig)


def test_unknown_task_and_foreign_folder_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="task='v2v'"):
        create_tiny_wan(tmp_path / "x", task="v2v")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="mine"):
        create_tiny_wan(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
