"""The OpenSoraPlan text encoder: mT5 (or a T5 checkpoint) through transformers, 512 tokens, with the mask."""

import pytest
import torch
from transformers import MT5Config, MT5EncoderModel, T5Config, T5EncoderModel

from mmkit.models.opensoraplan.text import MAX_LENGTH, MT5TextEncoder
from mmkit.models.opensoraplan.tiny import TINY_MT5
from mmkit.models.wan.tiny import _write_tokenizer, build_tokenizer


@pytest.mark.parametrize("kind", ["mt5", "t5"])
def test_features_and_mask_match_a_direct_call(tmp_path, kind):
    tok = build_tokenizer()
    _write_tokenizer(tok, tmp_path / "tokenizer")
    torch.manual_seed(0)
    cfg_cls, model_cls = (MT5Config, MT5EncoderModel) if kind == "mt5" else (T5Config, T5EncoderModel)
    model_cls(cfg_cls(vocab_size=tok.get_vocab_size(), **TINY_MT5)).save_pretrained(tmp_path / "text_encoder")
    enc = MT5TextEncoder.from_folder(tmp_path)
    assert type(enc.model) is model_cls
    long = " ".join(["a red cube moves left"] * 200)  # > 512 tokens: truncated, mask all ones
    feats, mask = enc(["a red cube", long])
    assert feats.shape == (2, MAX_LENGTH, 32) and mask.dtype == torch.int64
    n = int(mask[0].sum())
    assert 2 < n < 10 and mask[0, :n].all() and not mask[0, n:].any() and mask[1].all()
    ids = torch.tensor([tok.encode("a red cube").ids])
    with torch.no_grad():
        want = enc.model(ids).last_hidden_state  # the real tokens alone
    torch.testing.assert_close(feats[:1, :n], want, rtol=1e-5, atol=1e-5)


def test_missing_or_wrong_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="mT5 text encoder folder is missing"):
        MT5TextEncoder.from_folder(tmp_path)
