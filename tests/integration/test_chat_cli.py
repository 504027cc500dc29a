"""`mmkit chat --temperature 0 --json` (through the real console entry point) on a tiny folder gives
transformers' greedy `generate` token ids."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from mmkit.cli.main import main
from mmkit.models.qwen2_5_vl.tiny import create_tiny_qwen2_5_vl

PROMPT = "What is in this picture?"


def _reference_greedy(folder, image_path, max_new_tokens):
    """transformers only: its tokenizer + chat template, its Pillow image processor, its generate()."""
    tok = AutoTokenizer.from_pretrained(folder)
    images = AutoImageProcessor.from_pretrained(folder)(images=[Image.open(image_path)], return_tensors="pt")
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    n = int(images["image_grid_thw"].prod()) // 4
    enc = tok(text.replace("<|image_pad|>", "<|image_pad|>" * n), return_tensors="pt")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    types = (enc["input_ids"] == model.config.image_token_id).int()
    out = model.generate(
        **enc, **images, mm_token_type_ids=types, max_new_tokens=max_new_tokens, do_sample=False
    )
    return out[0, enc["input_ids"].shape[1] :].tolist(), enc["input_ids"].shape[1]


def test_chat_json_greedy_matches_transformers_generate(tmp_path, capsys):
    folder = create_tiny_qwen2_5_vl(tmp_path / "tiny", seed=0)
    image = tmp_path / "img.png"
    Image.fromarray((np.random.RandomState(0).rand(100, 150, 3) * 255).astype(np.uint8)).save(image)
    argv = [
        "chat",
        "--model",
        str(folder),
        "--image",
        str(image),
        "--prompt",
        PROMPT,
        "--max-new-tokens",
        "16",
    ]
    assert main([*argv, "--temperature", "0", "--json", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    got = json.loads(lines[0])
    assert set(got) == {"text", "token_ids", "prompt_tokens", "tokens_per_s"}
    want, prompt_len = _reference_greedy(folder, image, 16)
    assert got["token_ids"] == want
    assert len(want) >= 4 and got["prompt_tokens"] == prompt_len


def test_interactive_chat_keeps_history_and_survives_a_bad_image(tmp_path, capsys, monkeypatch):
    from mmkit.infer.chat import ChatSession
    from mmkit.infer.vlm import SamplingParams
    from mmkit.models.qwen2_5_vl.load import load_vlm

    folder = create_tiny_qwen2_5_vl(tmp_path / "tiny", seed=2)
    image = tmp_path / "img.png"
    Image.fromarray((np.random.RandomState(2).rand(60, 80, 3) * 255).astype(np.uint8)).save(image)
    lines = iter([f"/image {image}", PROMPT, f"/image {tmp_path / 'missing.png'}", "bad", "", "And now?"])

    def fake_input(_prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    argv = ["chat", "--model", str(folder), "--max-new-tokens", "8", "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out

    # the same conversation through ChatSession: the failed turn and its image left no trace
    chat = ChatSession(*load_vlm(folder, device="cpu"), SamplingParams(8, seed=0))
    first, second = [], []
    chat.ask(PROMPT, images=[image], on_text=first.append)
    chat.ask("And now?", on_text=second.append)
    banner = out.splitlines()[0]
    assert banner.startswith("mmkit chat:")
    assert out.startswith(f"{banner}\n{''.join(first)}\nerror: ")
    assert "missing.png" in out and out.endswith(f"\n{''.join(second)}\n\n")
    assert len(chat.messages) == 4 and first and second
