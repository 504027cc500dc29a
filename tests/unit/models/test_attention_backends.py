"""Attention backend selection (mmkit/models/common/attention_backends.py): runtime choice cached in a file,
static table, manual names, the environment override, and rejection of a wrong kernel."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F

from mmkit.models.common import attention_backends as ab
from mmkit.models.common.attention import attention


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("MMKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(ab.ENV_BACKEND, raising=False)
    saved = dict(ab.BACKENDS)
    ab.clear_choices(memory_only=True)
    yield tmp_path
    ab.BACKENDS.clear()
    ab.BACKENDS.update(saved)
    ab.clear_choices(memory_only=True)
    ab.configure(backend="sdpa", mode="runtime")


def qkv(seed=0, s=64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 2, s, 16, generator=g) for _ in range(3)]


def test_runtime_choice_is_correct_fastest_and_cached_in_a_file(isolated, monkeypatch):
    q, k, v = qkv()
    calls = []
    real = ab.select_runtime
    monkeypatch.setattr(ab, "select_runtime", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    out = attention(q, k, v, backend="auto")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)
    data = json.loads((isolated / ab.CACHE_FILE).read_text())
    ((key, entry),) = data.items()
    assert key == ab.key_of(q, k) and entry["backend"] in ab.BACKENDS
    assert entry["backend"] == min(entry["ms"], key=entry["ms"].get)  # the fastest timed candidate
    assert {"math", "sdpa", "flash"} <= set(entry["ms"]) and "cudnn" not in entry["ms"]  # CPU only
    attention(q, k, v, backend="auto")
    ab.clear_choices(memory_only=True)  # a new process: the file answers, nothing is timed again
    attention(q, k, v, backend="auto")
    assert len(calls) == 1
    attention(*qkv(s=32), backend="auto")  # another shape: timed once more
    assert len(calls) == 2 and len(json.loads((isolated / ab.CACHE_FILE).read_text())) == 2


def test_a_wrong_kernel_is_rejected_and_logged(caplog, isolated):
    used = []

    def wrong_but_fast(q, k, v, scale=None):
        used.append(1)
        return torch.zeros_like(q)  # fastest of all, and wrong

    def slightly_wrong(q, k, v, scale=None):
        return F.scaled_dot_product_attention(q, k, v, scale=scale) * 1.001

    ab.register_backend("wrong", wrong_but_fast)
    ab.register_backend("off_by_1e-3", slightly_wrong)
    q, k, v = qkv(1)
    with caplog.at_level(logging.WARNING, logger="mmkit.attention"):
        out = attention(q, k, v, backend="runtime")
    assert "attention backend wrong rejected" in caplog.text
    assert "attention backend off_by_1e-3 rejected" in caplog.text
    chosen = json.loads((isolated / ab.CACHE_FILE).read_text())[ab.key_of(q, k)]
    assert chosen["backend"] not in ("wrong", "off_by_1e-3") and "wrong" not in chosen["ms"]
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)
    n = len(used)
    attention(q, k, v, backend="wrong")  # manual: the user's choice is honoured
    assert len(used) == n + 1


def test_environment_override_static_table_and_errors(monkeypatch):
    q, k, v = qkv(2)
    seen = []
    ab.register_backend(
        "spy", lambda q, k, v, scale=None: seen.append(1) or F.scaled_dot_product_attention(q, k, v)
    )
    monkeypatch.setenv(ab.ENV_BACKEND, "spy")
    attention(q, k, v)  # the models' call (no backend) and an explicit one: both overridden
    attention(q, k, v, backend="math")
    assert len(seen) == 2
    monkeypatch.delenv(ab.ENV_BACKEND)
    attention(q, k, v)
    assert len(seen) == 2  # default again: PyTorch's dispatcher
    assert ab.select_static(torch.device("cpu"), torch.float32) == "flash"
    ab.configure(backend="auto", mode="static")
    assert ab.resolve(q, k, v, None, None) == "flash"
    with pytest.raises(ValueError, match="attention backend='nope'"):
        ab.configure(backend="nope")
    monkeypatch.setenv(ab.ENV_BACKEND, "nope")
    with pytest.raises(ValueError, match="MMKIT_ATTENTION_BACKEND"):
        attention(q, k, v)
