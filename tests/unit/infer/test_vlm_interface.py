"""The engine drives any `VLMModel`: Qwen2.5-VL implements it, the engine never imports a model family,
and a mock model whose next token depends on every cached token checks the cache, masks and positions."""

from __future__ import annotations

import ast
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import mmkit.infer.vlm as vlm
from mmkit.infer.vlm import SamplingParams, VLMModel, generate
from mmkit.models.qwen2_5_vl.model import Qwen2_5_VLModel
from mmkit.models.qwen2_5_vl.tiny import tiny_config

VOCAB = 97


class SumModel:
    """next token = (sum of the tokens it may attend to + position of the last one) % VOCAB.

    The token ids themselves are the cached keys, so a cache slot written twice, a slot skipped, a
    padded slot attended to or a wrong position all change the tokens.
    """

    def kv_cache_spec(self):
        return dict(layers=1, kv_heads=1, head_dim=1, dtype=torch.float64, device=torch.device("cpu"))

    def media_inputs(self, inputs):
        return {}

    def rope_positions(self, input_ids, attention_mask, media):
        pos = attention_mask.cumsum(1) - 1  # (B, L): left padding does not count
        return pos, pos[:, -1] + 1

    def _next(self, cache, ids, key_mask, position):
        keys, _ = cache.update(0, ids.double()[:, None, :, None], ids.double()[:, None, :, None])
        seen = keys[:, 0, :, 0]  # (B, K)
        if key_mask is not None:
            seen = seen * key_mask
        return F.one_hot((seen.sum(1).long() + position) % VOCAB, VOCAB).float()  # (B, V) logits

    def prefill(self, input_ids, positions, media, cache, attention_mask=None, return_hidden=False):
        assert not return_hidden
        return self._next(cache, input_ids, attention_mask, positions[:, -1])

    def decode_step(self, tokens, position, cache, key_mask=None, return_hidden=False):
        assert not return_hidden
        return self._next(cache, tokens[:, None], key_mask, position)

    def output_head(self):
        return nn.Linear(1, VOCAB)


def _reference(prompt: list[int], n: int) -> list[int]:
    seq, out = list(prompt), []
    for _ in range(n):
        out.append((sum(seq) + len(seq) - 1) % VOCAB)
        seq.append(out[-1])
    return out


def test_qwen_implements_the_interface():
    assert isinstance(Qwen2_5_VLModel(tiny_config()), VLMModel)
    assert isinstance(SumModel(), VLMModel)
    assert not isinstance(nn.Linear(2, 2), VLMModel)


def test_the_engine_imports_no_model_family():
    tree = ast.parse(Path(vlm.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert names and not [m for m in names if m.startswith("mmkit.models")]


def test_mock_model_left_padded_batch_with_eos():
    rows = [[5, 17, 3], [40, 2, 9, 11, 60, 8]]
    free = [_reference(r, 12) for r in rows]
    pad = 50  # padded slots would add 50 per slot to the sum if attended
    ids = torch.tensor([[pad] * (6 - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (6 - len(r)) + [1] * len(r) for r in rows])
    out = generate(
        SumModel(), {"input_ids": ids, "attention_mask": mask}, SamplingParams(12), screen_greedy=False
    )
    assert out.tokens == free and out.prompt_tokens == [3, 6]
    eos = free[0][4]
    stop = free[0].index(eos) + 1
    assert eos not in free[1][: stop + 1]
    params = SamplingParams(12, eos_token_ids=(eos,))
    out = generate(SumModel(), {"input_ids": ids, "attention_mask": mask}, params, screen_greedy=False)
    assert out.tokens[0] == free[0][:stop]
    cut = free[1].index(eos) + 1 if eos in free[1] else 12
    assert out.tokens[1] == free[1][:cut] and len(out.tokens[1]) > stop
