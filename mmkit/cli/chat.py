"""`mmkit chat`: one-shot (--prompt) or interactive chat with a Qwen2.5-VL folder about images/videos.

A thin entry: the conversation (messages, chat template, streamed text) is `infer.chat.ChatSession`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="transformers-layout Qwen2.5-VL folder")
    p.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    p.add_argument("--video", action="append", default=[], help="video file (repeatable)")
    p.add_argument("--prompt", help="question; without it an interactive chat starts")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON line (text, token_ids, prompt_tokens, tokens_per_s)",
    )
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|npu|mps")
    p.add_argument("--dtype", default="fp32", help="fp32|bf16|fp16")


def precheck(args: argparse.Namespace) -> None:
    """Every flag, the images and videos, the weight files and the memory, before the model loads.

    Caps --max-new-tokens to the model's context (with a warning); refuses a chat whose weights + KV
    cache exceed the device's free memory.
    """
    from mmkit.device import resolve_device
    from mmkit.infer.budget import check_memory
    from mmkit.infer.media import load_image
    from mmkit.infer.qwen2_5_vl import chat_budget
    from mmkit.infer.vlm import SamplingParams

    device = resolve_device(args.device)
    SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.seed).validate()
    if args.prompt is not None and not args.prompt.strip():
        raise ValueError("--prompt: is empty; ask a question (or leave --prompt out for an interactive chat)")
    for path in args.image:
        load_image(path)  # decodable now: a corrupt file is named before the weights load
    for path in args.video:
        _check_video(path)
    guess = 256 + 1024 * (len(args.image) + len(args.video))  # the processor has not run yet
    args.max_new_tokens, need = chat_budget(args.model, args.max_new_tokens, args.dtype, prompt_tokens=guess)
    check_memory(need, device, "this chat", "lower --max-new-tokens or use --dtype bf16")


def _check_video(path: str) -> None:
    import av

    if not Path(path).is_file():
        raise FileNotFoundError(f"--video: file not found: {path}")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            next(container.decode(video=0))  # the first frame decodes (StopIteration: none)
    except Exception as e:  # any container/decoder error is this file's
        raise ValueError(f"--video {path}: not a readable video ({e})") from e


def _print_piece(piece: str) -> None:
    print(piece, end="", flush=True)


def run(args: argparse.Namespace) -> int:
    from mmkit.infer.chat import ChatSession
    from mmkit.infer.vlm import SamplingParams
    from mmkit.models.qwen2_5_vl.load import load_vlm

    precheck(args)  # before the (slow) model load
    params = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    model, processor = load_vlm(args.model, device=args.device, dtype=args.dtype)
    chat = ChatSession(model, processor, params)
    images, videos = list(args.image), list(args.video)
    if args.prompt is not None:
        reply = chat.ask(args.prompt, images, videos, on_text=None if args.json else _print_piece)
        if args.json:
            rec = {"text": reply.text, "token_ids": reply.token_ids, "prompt_tokens": reply.prompt_tokens}
            print(json.dumps({**rec, "tokens_per_s": round(reply.generation.tokens_per_s, 3)}))
        else:
            print()
        return 0
    print("mmkit chat: type a message; '/image PATH' attaches an image to the next one; Ctrl-D quits.")
    while True:  # --image / --video go with the first message
        try:
            line = input("> ").strip()
        except EOFError:
            print()
            return 0
        if line.startswith("/image "):
            images.append(line[len("/image ") :].strip())
            continue
        if not line:
            continue
        try:
            chat.ask(line, images, videos, on_text=_print_piece)
        except (ValueError, FileNotFoundError, OSError) as e:  # bad image path etc.: report, keep chatting
            print(f"error: {e}")
        else:
            print()
        images, videos = [], []
