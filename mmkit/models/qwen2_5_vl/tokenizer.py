"""A tiny Qwen2.5-VL tokenizer + processor folder, built locally for tests and demos.

`build_tiny_tokenizer(outdir)` trains a small byte-level BPE (a few hundred tokens) on an in-code
corpus with the `tokenizers` library, appends Qwen2.5-VL's special tokens in their real order, and
writes the files a real Qwen2.5-VL-Instruct folder has (tokenizer.json, vocab.json, merges.txt,
tokenizer_config.json with the real chat template, chat_template.json, special_tokens_map.json,
preprocessor_config.json). transformers' AutoTokenizer / AutoProcessor and mmkit's own
`Qwen2_5_VLProcessor` load the folder through the same code path as a real checkpoint.

It holds no model weights and no config.json (the tiny model folder writer adds those).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

# Qwen2's pre-tokenizer split (the same regex the real tokenizer.json carries).
PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# Added tokens in the real Qwen2.5-VL order (ids 151643.. there; base_vocab.. here). special=False for
# the tool/fim tokens, as in the real added_tokens_decoder.
ADDED_TOKENS: list[tuple[str, bool]] = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
]
ADDITIONAL_SPECIAL_TOKENS = [t for t, special in ADDED_TOKENS[1:14] if special]

# The chat template shipped with Qwen2.5-VL-*-Instruct (chat_template.json), verbatim.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# CLIP normalisation constants used by every Qwen2-VL / Qwen2.5-VL checkpoint.
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]

# Test-sized pixel budgets: 56*56 is the real minimum (4 patches of 28); 28*28*16 caps an image at
# 64 patches = 16 merged LLM tokens, which keeps tiny-model tests fast.
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 28 * 28 * 16

_CORPUS = """\
You are a helpful assistant. Describe the image in detail.
What is in this picture? The picture shows a red square on a white background.
A cat is sitting on the table next to a cup of coffee and a small green plant.
The video shows a person walking along the beach at sunset while the waves roll in.
How many objects are there? There are three objects: a ball, a box and a blue bottle.
Question: what colour is the sky? Answer: the sky is blue with a few white clouds.
Please answer the question using a single word or phrase.
The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ?
User asks the assistant to read the text in the image and summarise the main points.
In the first frame a dog runs to the left; in the last frame it stops near the tree.
It's a sunny day, we're outside, they've gone home, I'm here, you'll see, he'd know.
Hello world! This is a tiny tokenizer for tests of the multimodal toolkit mmkit.
"""


def _train_bpe(vocab_size: int) -> Tokenizer:
    """Byte-level BPE with Qwen2's normaliser/pre-tokenizer/decoder, trained on `_CORPUS`."""
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # A ByteLevel post-processor with trim_offsets=False is what the real tokenizer.json has.
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    lines = _CORPUS.splitlines(keepends=True)
    tok.train_from_iterator(lines * 4, trainer=trainer)
    return tok


def build_tiny_tokenizer(
    outdir: str | Path,
    vocab_size: int = 384,
    min_pixels: int = TINY_MIN_PIXELS,
    max_pixels: int = TINY_MAX_PIXELS,
    video_min_pixels: int | None = None,
    video_max_pixels: int | None = None,
    fps: float = 2.0,
    patch_size: int = 14,
) -> dict[str, int]:
    """Write a tiny Qwen2.5-VL tokenizer + preprocessor folder and return its token ids.

    The BPE part has `vocab_size` tokens (ids 0..vocab_size-1); the 22 Qwen2.5-VL added tokens follow
    in their real order. The returned dict uses config.json field names, so a tiny model config can
    be updated with it: vocab_size (= len(tokenizer)), bos_token_id, eos_token_id, pad_token_id,
    vision_start_token_id, vision_end_token_id, vision_token_id, image_token_id, video_token_id.

    Example:
        >>> ids = build_tiny_tokenizer("/tmp/tiny_qwen", min_pixels=56 * 56, max_pixels=28 * 28 * 16)
        >>> ids["image_token_id"] == ids["vocab_size"] - 10
        True
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    tok = _train_bpe(vocab_size)
    base = tok.get_vocab_size()
    if base != vocab_size:
        raise ValueError(
            f"build_tiny_tokenizer: corpus too small for vocab_size={vocab_size} (got {base}); lower it"
        )
    for content, special in ADDED_TOKENS:
        tok.add_tokens([AddedToken(content, special=special, normalized=False)])
    tok.save(str(outdir / "tokenizer.json"))

    # vocab.json + merges.txt: the slow-tokenizer files real folders also carry.
    data = json.loads((outdir / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    (outdir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    (outdir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")

    ids = {content: base + i for i, (content, _) in enumerate(ADDED_TOKENS)}
    added_decoder = {
        str(ids[c]): {
            "content": c,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for c, special in ADDED_TOKENS
    }
    tokenizer_config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_decoder,
        "additional_special_tokens": ADDITIONAL_SPECIAL_TOKENS,
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    _write_json(outdir / "tokenizer_config.json", tokenizer_config)
    _write_json(
        outdir / "special_tokens_map.json",
        {
            "additional_special_tokens": ADDITIONAL_SPECIAL_TOKENS,
            "eos_token": _token_entry("<|im_end|>"),
            "pad_token": _token_entry("<|endoftext|>"),
        },
    )
    _write_json(outdir / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    write_preprocessor_config(
        outdir, min_pixels, max_pixels, video_min_pixels, video_max_pixels, fps, patch_size
    )

    return {
        "vocab_size": base + len(ADDED_TOKENS),
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
    }


def write_preprocessor_config(
    outdir: str | Path,
    min_pixels: int = TINY_MIN_PIXELS,
    max_pixels: int = TINY_MAX_PIXELS,
    video_min_pixels: int | None = None,
    video_max_pixels: int | None = None,
    fps: float = 2.0,
    patch_size: int = 14,
) -> None:
    """Write preprocessor_config.json (images) and video_preprocessor_config.json (videos).

    The image file has the real Qwen2.5-VL fields (Qwen2VLImageProcessor, patch 14 unless given, merge 2,
    temporal patch 2, CLIP mean/std) with the given pixel budget; the video file adds the fps
    sampling fields. Video budgets default to the image ones. `patch_size` must equal the vision
    tower's (config.json `vision_config.patch_size`): the processor cuts the patches the model embeds.

    Example:
        >>> write_preprocessor_config("/tmp/tiny_qwen", min_pixels=56 * 56, max_pixels=112 * 112)
    """
    if not 0 < min_pixels <= max_pixels:
        raise ValueError(
            f"min_pixels={min_pixels}, max_pixels={max_pixels}: need 0 < min_pixels <= max_pixels"
        )
    outdir = Path(outdir)
    common = {
        "patch_size": patch_size,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": IMAGE_MEAN,
        "image_std": IMAGE_STD,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_resize": True,
        "do_convert_rgb": True,
        "resample": 3,  # PIL bicubic
        "processor_class": "Qwen2_5_VLProcessor",
    }
    image_cfg = {
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        "image_processor_type": "Qwen2VLImageProcessor",
        **common,
    }
    vmin = min_pixels if video_min_pixels is None else video_min_pixels
    vmax = max_pixels if video_max_pixels is None else video_max_pixels
    video_cfg = {
        "min_pixels": vmin,
        "max_pixels": vmax,
        "size": {"shortest_edge": vmin, "longest_edge": vmax},
        "fps": fps,
        "min_frames": 4,
        "max_frames": 768,
        "do_sample_frames": True,
        "video_processor_type": "Qwen2VLVideoProcessor",
        **common,
    }
    _write_json(outdir / "preprocessor_config.json", image_cfg)
    _write_json(outdir / "video_preprocessor_config.json", video_cfg)


def _token_entry(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
