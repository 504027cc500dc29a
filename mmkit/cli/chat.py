"""`mmkit chat`: one-shot (--prompt) or interactive chat with a Qwen2.5-VL folder about images/videos."""

from __future__ import annotations

import argparse
import json


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


def _user_message(text: str, n_images: int, n_videos: int) -> dict:
    parts = [{"type": "image"}] * n_images + [{"type": "video"}] * n_videos
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def _reply(model, processor, messages, images, videos, params, stream: bool):
    from mmkit.infer.vlm import generate

    batch = processor(processor.apply_chat_template(messages), images=images or None, videos=videos or None)
    seen, printed = [], ""

    def on_token(_row: int, tok: int) -> None:
        nonlocal printed
        seen.append(tok)
        text = processor.decode(seen, skip_special_tokens=True)
        if text.startswith(printed):  # print only the new suffix (byte-level BPE may complete a char later)
            print(text[len(printed) :], end="", flush=True)
            printed = text

    out = generate(model, batch, params, on_token=on_token if stream else None)
    return out, processor.decode(out.tokens[0], skip_special_tokens=True)


def run(args: argparse.Namespace) -> int:
    from mmkit.infer.vlm import SamplingParams
    from mmkit.models.qwen2_5_vl.load import load_vlm

    params = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    params.validate()  # before the (slow) model load
    model, processor = load_vlm(args.model, device=args.device, dtype=args.dtype)
    params.eos_token_ids = tuple(model.cfg.eos_token_ids)
    images, videos = list(args.image), list(args.video)
    if args.prompt is not None:
        msgs = [_user_message(args.prompt, len(images), len(videos))]
        out, text = _reply(model, processor, msgs, images, videos, params, stream=not args.json)
        if args.json:
            rec = {"text": text, "token_ids": out.tokens[0], "prompt_tokens": out.prompt_tokens[0]}
            print(json.dumps({**rec, "tokens_per_s": round(out.tokens_per_s, 3)}))
        else:
            print()
        return 0
    print("mmkit chat: type a message; '/image PATH' attaches an image to the next one; Ctrl-D quits.")
    messages, pending = [], list(images)
    all_images, all_videos, pending_videos = [], [], list(videos)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print()
            return 0
        if line.startswith("/image "):
            pending.append(line[len("/image ") :].strip())
            continue
        if not line:
            continue
        turn = [*messages, _user_message(line, len(pending), len(pending_videos))]
        try:
            _, text = _reply(
                model, processor, turn, all_images + pending, all_videos + pending_videos, params, True
            )
        except (ValueError, FileNotFoundError, OSError) as e:  # bad image path etc.: report, keep chatting
            print(f"error: {e}")
            pending, pending_videos = [], []
            continue
        print()
        messages = turn
        all_images, all_videos = all_images + pending, all_videos + pending_videos
        pending, pending_videos = [], []
        messages.append({"role": "assistant", "content": text})
