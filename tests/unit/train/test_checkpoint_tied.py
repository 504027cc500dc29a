"""Tied embeddings (Qwen2.5-VL-3B style: LM head = token embedding) survive a checkpoint round trip:
DCP's safetensors storage cannot write one tensor under two names, so the alias is dropped on save
and re-tied on load."""

import torch

from mmkit.checkpoint.dcp import export_model_state, load_checkpoint, save_checkpoint
from mmkit.models.qwen2_5_vl.model import Qwen2_5_VLModel
from mmkit.models.qwen2_5_vl.tiny import perturbed_init, tiny_config


def test_tied_embeddings_save_and_load(tmp_path):
    cfg = tiny_config()
    cfg.tie_word_embeddings = True
    src, dst = Qwen2_5_VLModel(cfg), Qwen2_5_VLModel(cfg)
    perturbed_init(src, seed=1)
    assert src.language.lm_head.weight is src.language.embed_tokens.weight
    save_checkpoint(tmp_path, 1, src, torch.optim.AdamW(src.parameters()))
    load_checkpoint(tmp_path, dst, torch.optim.AdamW(dst.parameters()))
    assert dst.language.lm_head.weight is dst.language.embed_tokens.weight
    for (name, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), name
    assert "language.lm_head.weight" not in export_model_state(tmp_path)  # stored once
