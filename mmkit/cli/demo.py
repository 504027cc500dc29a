"""`mmkit demo` (behind `make demo`): the whole mission in about 3 minutes on 2 CPU cores, no downloads.

1. train: a tiny Wan2.1 DiT from scratch on synthetic shape clips (32x32, 9 frames) for a short run,
   export it to a diffusers folder, reload it through `load_pipeline`, generate one held-out prompt,
   and plot the loss curve: training works end to end (a short run gives soft coloured blobs);
2. shapes: the shipped shapes model (`mmkit create-tiny wan-shapes`, 64x64, 17 frames) generates
   held-out prompts (caption combinations never seen in training): an mp4 + PNG frame grid per prompt,
   one contact sheet with each prompt under its clip, and the detector's accuracy per attribute;
3. chat: the shipped shapes VLM (`mmkit create-tiny qwen-shapes`) answers a question about a held-out
   image; its answer and the truth are printed;
4. cache: the same held-out prompts again, uncached and with the adaptive step cache (calibrated on
   one other prompt), timed in turns; the speedup, the skipped block evaluations and the PSNR of the
   cached frames against the uncached ones are printed, and a contact sheet of the cached clips saved;
5. a summary of where each picture is (`summary.json` too).

Each step is a function `step(a, out, ctx) -> None` in `STEPS`; it reads what earlier steps left in
`ctx` (e.g. `ctx["shapes_pipe"]`, `ctx["shapes_eval"]`) and records its pictures in `ctx["pictures"]`,
so a new step is one function and one line in `STEPS`.
"""

from __future__ import annotations

import json
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("--out", default="outputs/demo")
    p.add_argument(
        "--steps", type=int, default=150, help="from-scratch training steps (~0.3 s each on 2 cores)"
    )
    p.add_argument("--videos", type=int, default=32)
    p.add_argument("--gen-steps", type=int, default=20, help="sampling steps for the from-scratch model")
    p.add_argument(
        "--shapes-prompts", type=int, default=4, help="held-out prompts for the shipped shapes model"
    )
    p.add_argument("--shapes-steps", type=int, default=50, help="sampling steps for the shipped shapes model")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an earlier demo's --out folder (never others)"
    )


def step_train(a, out: Path, ctx: dict) -> None:
    from mmkit.cli.plot import plot_metrics
    from mmkit.config import parse_cli
    from mmkit.convert.export import export_to_hf
    from mmkit.data.synth import synth_shapes
    from mmkit.infer.media import save_video
    from mmkit.infer.pipelines import load_pipeline
    from mmkit.models.wan.tiny import create_tiny_wan
    from mmkit.train.trainer import Trainer

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "tiny" / "wan_t2v.toml"
    shapes = synth_shapes(out / "shapes", videos=a.videos, num_frames=9, height=32, width=32, seed=0)
    create_tiny_wan(out / "wan-tiny", task="t2v", seed=0)
    ckpt, exported = out / "ckpt", out / "wan-trained"
    metrics = ckpt / "metrics.jsonl"
    cfg = parse_cli(
        [
            "--config",
            str(recipe),
            "--model.init_from",
            str(out / "wan-tiny"),
            "--data.paths",
            f"[{shapes.data_txt}]",
        ]
        + ["--train.steps", str(a.steps), "--checkpoint.dir", str(ckpt), "--checkpoint.interval", "50"]
        + ["--logging.metrics_file", str(metrics), "--optim.warmup_steps", str(min(10, a.steps))]
    )
    with Trainer(cfg) as trainer:
        losses = trainer.fit()
    export_to_hf(ckpt, exported)  # the trained checkpoint as a diffusers folder, reloaded below
    pipe = load_pipeline(exported, task="t2v", device="auto", dtype="fp32")
    prompt = shapes.heldout_prompts[0]
    res = pipe(prompt, height=32, width=32, num_frames=9, num_inference_steps=a.gen_steps, seed=0)
    for suffix in (".mp4", ".png"):
        save_video(res.frames[0], out / f"scratch_heldout{suffix}")
    (out / "scratch_heldout.txt").write_text(prompt + "\n")
    k = max(1, len(losses) // 10)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    print(f"loss (mean of first/last {k} steps): {first:.4f} -> {last:.4f}")
    ctx["train"] = {"steps": len(losses), "loss_first": first, "loss_last": last, "prompt": prompt}
    ctx["pictures"]["loss curve of the from-scratch run"] = plot_metrics(metrics, out / "loss.png", smooth=10)
    ctx["pictures"][f"from-scratch model, held-out '{prompt}' (frame grid)"] = out / "scratch_heldout.png"


def step_shapes(a, out: Path, ctx: dict) -> None:
    from mmkit.infer.evaluate import contact_sheet, eval_shapes
    from mmkit.infer.pipelines import load_pipeline
    from mmkit.models.wan.shapes import create_shapes_wan

    folder = create_shapes_wan(out / "wan-shapes")
    prompts = json.loads((folder / "heldout_prompts.json").read_text())[: a.shapes_prompts]
    pipe = load_pipeline(folder, task="t2v", device="auto", dtype="fp32")
    res = eval_shapes(pipe, prompts, steps=a.shapes_steps, out=out / "shapes_heldout")
    sheet = contact_sheet(res.clips, res.prompts, out / "contact_sheet.png")
    print(f"{len(prompts)} held-out prompts, {a.shapes_steps} steps, {res.seconds:.0f} s; detector accuracy:")
    for k, v in res.accuracy.items():
        print(f"  {k:<10} {v:6.1%}")
    ctx["shapes_pipe"], ctx["shapes_eval"] = pipe, res
    ctx["shapes"] = {"prompts": prompts, "accuracy": res.accuracy, "seconds": res.seconds}
    ctx["pictures"]["shipped shapes model, held-out prompts (contact sheet)"] = sheet
    ctx["pictures"]["... one mp4 + PNG frame grid per prompt"] = out / "shapes_heldout"


def step_chat(a, out: Path, ctx: dict) -> None:
    import tempfile

    from mmkit.infer.chat import ChatSession
    from mmkit.infer.evaluate import shapes_qa_items
    from mmkit.infer.vlm import SamplingParams
    from mmkit.models.qwen2_5_vl.load import load_vlm
    from mmkit.models.qwen2_5_vl.shapes import SHAPES_QA_EVAL_SEED, SHAPES_QA_SIZE, create_qwen_shapes

    folder = create_qwen_shapes(out / "qwen-shapes")
    model, processor = load_vlm(folder, device="auto", dtype="fp32")
    chat = ChatSession(model, processor, SamplingParams(max_new_tokens=16))
    with tempfile.TemporaryDirectory() as tmp:
        items = shapes_qa_items(1, SHAPES_QA_SIZE, SHAPES_QA_EVAL_SEED, tmp)
    items[0].image.save(out / "vlm_image.png")
    rows = []
    for item in items:  # one colour, shape, position and count question about the same held-out image
        chat.reset()
        answer = chat.ask(item.question, images=[item.image]).text.strip()
        rows.append({"question": item.question, "answer": answer, "truth": item.answer})
        print(f"  Q: {item.question}  A: {answer}  (truth: {item.answer})")
    ctx["chat"] = rows
    ctx["pictures"]["held-out image the VLM was asked about"] = out / "vlm_image.png"


def step_cache(a, out: Path, ctx: dict) -> None:
    import time

    import numpy as np

    from mmkit.infer.accel.cache import AdaptiveCacheConfig, apply_cache, cache_stats, remove_cache
    from mmkit.infer.accel.cache.adaptive import calibrate_adaptive
    from mmkit.infer.accel.quality import psnr
    from mmkit.infer.evaluate import contact_sheet
    from mmkit.models.wan.shapes import SHAPES_CALIB_PROMPT

    pipe, prompts = ctx["shapes_pipe"], ctx["shapes_eval"].prompts
    size = dict(height=64, width=64, num_frames=17, progress=False)
    print("  calibrating the cache on one prompt: a recorded generation, then 12 one-skip sensitivity probes")
    calib = calibrate_adaptive(pipe, SHAPES_CALIB_PROMPT, a.shapes_steps, seed=0, **size)
    kw = {**size, "num_inference_steps": a.shapes_steps}
    cfg = AdaptiveCacheConfig(calibration=calib)
    plain, cached, skipped, clips, scores = 0.0, 0.0, [], [], []
    for i, prompt in enumerate(prompts):  # uncached, then cached: both see the same machine load
        t0 = time.perf_counter()
        ref = pipe(prompt, seed=i, **kw).frames[0]
        plain += time.perf_counter() - t0
        apply_cache(pipe.transformer, cfg)
        try:
            t0 = time.perf_counter()
            frames = pipe(prompt, seed=i, **kw).frames[0]
            cached += time.perf_counter() - t0
            skipped.append(cache_stats(pipe.transformer).skipped_fraction)
        finally:
            remove_cache(pipe.transformer)
        scores.append(psnr(frames, ref))
        clips.append(frames)
    sheet = contact_sheet(clips, prompts, out / "contact_sheet_cached.png")
    result = {
        "speedup": plain / cached,
        "skipped": float(np.mean(skipped)),
        "psnr_mean": float(np.mean(scores)),
        "psnr_worst": float(np.min(scores)),
    }
    print(
        f"adaptive step cache: {result['speedup']:.2f}x on the whole generation, {result['skipped']:.0%} of the "
        f"DiT block evaluations skipped, PSNR vs uncached {result['psnr_mean']:.1f} dB (worst prompt "
        f"{result['psnr_worst']:.1f})"
    )
    ctx["cache"] = result
    ctx["pictures"]["the same prompts with the step cache (contact sheet)"] = sheet


STEPS = [
    ("train a tiny DiT from scratch, export, reload, generate, plot the loss", step_train),
    ("the shipped shapes model on held-out prompts", step_shapes),
    ("chat with the shipped shapes VLM about a held-out image", step_chat),
    ("the shipped shapes model with the adaptive step cache", step_cache),
]


def run(a) -> int:
    from mmkit.outputs import claim_output_dir

    out = claim_output_dir(a.out, "demo", a.overwrite)  # a fresh folder: nothing older is resumed or lost
    ctx: dict = {"pictures": {}}
    for i, (title, step) in enumerate(STEPS, start=1):
        print(f"[{i}/{len(STEPS)}] {title}")
        step(a, out, ctx)
    summary = {k: ctx[k] for k in ("train", "shapes", "chat", "cache") if k in ctx}
    summary["pictures"] = {k: str(v) for k, v in ctx["pictures"].items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print("demo outputs:")
    for what, path in ctx["pictures"].items():
        print(f"  {what}: {path}")
    return 0
