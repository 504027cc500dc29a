"""`mmkit eval shapes|shapes-qa`: prompt fidelity of the shapes models, measured, per attribute.

Examples:
    mmkit create-tiny wan-shapes /tmp/wan-shapes && mmkit eval shapes --model /tmp/wan-shapes --prompts 32
    mmkit create-tiny qwen-shapes /tmp/qwen-shapes && mmkit eval shapes-qa --model /tmp/qwen-shapes
"""

from __future__ import annotations

import json
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("what", choices=["shapes", "shapes-qa"])
    p.add_argument("--model", required=True, help="shapes: a Wan t2v folder; shapes-qa: a Qwen2.5-VL folder")
    p.add_argument("--prompts", type=int, default=32, help="shapes: held-out prompts to generate")
    p.add_argument(
        "--prompts-file", help="shapes: JSON list of captions (default: MODEL/heldout_prompts.json)"
    )
    p.add_argument("--steps", type=int, default=50, help="shapes: sampling steps")
    p.add_argument("--guidance", type=float, default=5.0, help="shapes: classifier-free guidance scale")
    p.add_argument("--images", type=int, default=30, help="shapes-qa: held-out images (4 questions each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="shapes: folder for the clips (mp4 + PNG grid each) and a contact sheet")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="also print one JSON line with the accuracies")


def run(a) -> int:
    if a.steps < 1 or a.prompts < 1 or a.images < 1:
        raise ValueError(f"--steps {a.steps} / --prompts {a.prompts} / --images {a.images}: must be >= 1")
    if not Path(a.model).is_dir():
        raise FileNotFoundError(f"--model: folder not found: {a.model}")
    acc = _shapes(a) if a.what == "shapes" else _shapes_qa(a)
    for k, v in acc.items():
        print(f"  {k:<10} {v:6.1%}")
    if a.json:
        print(json.dumps(acc))
    return 0


def _shapes(a) -> dict:
    from mmkit.infer.evaluate import contact_sheet, eval_shapes, heldout_prompts, take_prompts
    from mmkit.infer.pipelines import load_pipeline

    if a.prompts_file:
        prompts = take_prompts(json.loads(Path(a.prompts_file).read_text()), a.prompts, a.prompts_file)
    else:
        prompts = heldout_prompts(a.model, a.prompts)
    pipe = load_pipeline(a.model, task="t2v", device=a.device, dtype="fp32")
    res = eval_shapes(pipe, prompts, steps=a.steps, guidance=a.guidance, seed=a.seed, out=a.out)
    print(f"{len(prompts)} held-out prompts, {a.steps} steps, {res.seconds:.0f} s; detector accuracy:")
    if a.out:
        print(
            f"clips and contact sheet -> {contact_sheet(res.clips, res.prompts, Path(a.out) / 'contact_sheet.png')}"
        )
    return res.accuracy


def _shapes_qa(a) -> dict:
    import tempfile

    from mmkit.infer.chat import ChatSession
    from mmkit.infer.evaluate import eval_shapes_qa, shapes_qa_items
    from mmkit.infer.vlm import SamplingParams
    from mmkit.models.qwen2_5_vl.load import load_vlm
    from mmkit.models.qwen2_5_vl.shapes import SHAPES_QA_EVAL_SEED, SHAPES_QA_SIZE

    model, processor = load_vlm(a.model, device=a.device, dtype="fp32")
    chat = ChatSession(model, processor, SamplingParams(max_new_tokens=16))
    with tempfile.TemporaryDirectory() as tmp:
        items = shapes_qa_items(a.images, SHAPES_QA_SIZE, SHAPES_QA_EVAL_SEED + a.seed, tmp)
        acc, _ = eval_shapes_qa(chat, items)
    print(f"{len(items)} questions on {a.images} held-out images; exact-match accuracy:")
    return acc
