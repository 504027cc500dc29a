"""ChatSession on a tiny Qwen2.5-VL folder: each turn is the prompt built by hand from the whole
conversation, streamed text adds up to the reply, and a failed turn leaves the conversation as it was."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mmkit.infer.chat import ChatSession, TextStream, user_message
from mmkit.infer.vlm import SamplingParams, generate
from mmkit.models.qwen2_5_vl.load import load_vlm
from mmkit.models.qwen2_5_vl.tiny import create_tiny_qwen2_5_vl


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    folder = create_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen") / "tiny", seed=1)
    return load_vlm(folder, device="cpu")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "img.png"
    Image.fromarray((np.random.RandomState(1).rand(60, 90, 3) * 255).astype(np.uint8)).save(path)
    return path


def _by_hand(model, processor, messages, images, params):
    batch = processor(processor.apply_chat_template(messages), images=images or None)
    return generate(model, batch, params).tokens[0]


def test_two_turns_equal_the_prompts_built_by_hand(vlm, image):
    model, processor = vlm
    chat = ChatSession(model, processor, SamplingParams(max_new_tokens=12))
    assert chat.params.eos_token_ids == tuple(model.cfg.eos_token_ids)
    pieces = []
    first = chat.ask("What is in this picture?", images=[image], on_text=pieces.append)
    msgs = [user_message("What is in this picture?", n_images=1)]
    assert first.token_ids == _by_hand(model, processor, msgs, [image], chat.params)
    assert first.text == processor.decode(first.token_ids, skip_special_tokens=True)
    assert "".join(pieces) == first.text and len(pieces) > 1
    second = chat.ask("And the colours?")
    msgs += [{"role": "assistant", "content": first.text}, user_message("And the colours?")]
    assert second.token_ids == _by_hand(model, processor, msgs, [image], chat.params)
    assert second.prompt_tokens > first.prompt_tokens + len(first.token_ids)  # the history is in it
    assert chat.messages == [*msgs, {"role": "assistant", "content": second.text}]
    assert chat.images == [image] and chat.videos == []
    chat.reset()
    assert chat.ask("What is in this picture?", images=[image]).token_ids == first.token_ids


def test_a_failed_turn_changes_nothing(vlm, image, tmp_path):
    model, processor = vlm
    chat = ChatSession(model, processor, SamplingParams(max_new_tokens=4))
    chat.ask("Hi", images=[image])
    before = (list(chat.messages), list(chat.images))
    with pytest.raises((FileNotFoundError, OSError, ValueError)):
        chat.ask("And this one?", images=[tmp_path / "missing.png"])
    assert (chat.messages, chat.images) == before


def test_text_stream_waits_for_complete_characters():
    table = {1: b"a", 2: b"\xc3", 3: b"\xa9", 4: b"b"}  # 2 + 3 = one two-byte character

    def decode(ids, skip_special_tokens=True):
        return b"".join(table[i] for i in ids).decode("utf-8", errors="replace")

    stream = TextStream(decode)
    assert [stream.push(t) for t in (1, 2, 3, 4)] == ["a", "", "\u00e9", "b"]
