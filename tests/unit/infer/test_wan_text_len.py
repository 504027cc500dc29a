"""The t2v pipeline pads prompts to the context length its DiT was trained with (`text_len`)."""

import json
import shutil
import warnings

import pytest
import torch

from mmkit.models.wan.config import WanConfig


def test_prompts_pad_to_the_dits_text_len(wan_train_root, tmp_path):
    from mmkit.infer.pipelines import load_pipeline

    folder = tmp_path / "wan"
    shutil.copytree(wan_train_root / "wan", folder)
    cfg_json = folder / "transformer" / "config.json"
    cfg_json.write_text(json.dumps({**json.loads(cfg_json.read_text()), "text_len": 12}))

    short = load_pipeline(str(folder), task="t2v")
    wan = load_pipeline(str(wan_train_root / "wan"), task="t2v")
    assert (short.transformer.cfg.text_len, wan.transformer.cfg.text_len) == (12, 512)
    prompt = "a red circle moves left on a black background"
    n = len(short.tokenizer(prompt).input_ids)
    a, b = short.encode_prompt([prompt]), wan.encode_prompt([prompt])
    assert a.shape[1] == 12 and b.shape[1] == 512
    # the same features of the prompt's tokens (umT5 masks the padding), zeros after them
    torch.testing.assert_close(a[:, :n], b[:, :n])
    assert not a[:, n:].any() and a[:, :n].abs().sum(-1).min() > 0
    with pytest.warns(UserWarning, match="the text encoder reads 12"):
        short.encode_prompt([prompt + " and a blue square moves up on a gray background"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        short.encode_prompt([prompt])


def test_only_a_non_default_text_len_is_written_to_the_diffusers_config():
    assert "text_len" not in WanConfig().to_dict()
    d = WanConfig(text_len=20).to_dict()
    assert d["text_len"] == 20 and WanConfig.from_dict(d).text_len == 20
