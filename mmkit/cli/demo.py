"""`mmkit demo` (behind `make demo`): the whole train -> save -> reload -> generate path, no downloads.

1. synthesises a small set of moving-shape videos (MindSpeed layout);
2. writes a tiny Wan2.1 t2v folder (diffusers layout) and trains its DiT on the set, with a
   progress bar, metrics JSONL and sharded checkpoints;
3. exports the checkpoint back to a diffusers folder and reloads it through `load_pipeline`;
4. generates videos for two held-out prompts (mp4 + PNG frame grid each);
5. plots the loss curve.

Quality to expect (32 x 32 pixels, 9 frames): the tiny VAE is pre-fitted on shape clips
(`scripts/fit_tiny_vae.py`, ~27 dB reconstruction PSNR); after 400 steps the tiny DiT follows the
colours of a held-out prompt (shape colour and background), but shapes come out as soft blobs and the
direction of motion is not reliably followed. The demo proves the path a real checkpoint takes, not
prompt fidelity.
"""

from __future__ import annotations

import json
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--steps", type=int, default=400, help="training steps (about 0.3 s each on 2 cores)")
    p.add_argument("--videos", type=int, default=32)
    p.add_argument("--gen-steps", type=int, default=20, help="sampling steps per generated video")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an earlier demo's --out folder (never others)"
    )


def run(a) -> int:
    from mmkit.outputs import claim_output_dir

    out = claim_output_dir(a.out, "demo", a.overwrite)  # a fresh folder: nothing older is resumed or lost
    from mmkit.cli.plot import plot_metrics
    from mmkit.config import parse_cli
    from mmkit.convert.export import export_to_hf
    from mmkit.data.synth import synth_shapes
    from mmkit.infer.media import save_video
    from mmkit.infer.pipelines import load_pipeline
    from mmkit.models.wan.tiny import create_tiny_wan
    from mmkit.train.trainer import Trainer

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "tiny" / "wan_t2v.toml"
    print(f"[1/5] synthetic shapes -> {out / 'shapes'}")
    shapes = synth_shapes(out / "shapes", videos=a.videos, num_frames=9, height=32, width=32, seed=0)
    print(f"[2/5] tiny Wan2.1 t2v folder -> {out / 'wan-tiny'}; training {a.steps} steps")
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
    trainer = Trainer(cfg)
    try:
        losses = trainer.fit()
    finally:
        trainer.close()
    print(f"[3/5] export checkpoint -> {out / 'wan-trained'} (diffusers layout) and reload")
    export_to_hf(ckpt, exported)
    pipe = load_pipeline(exported, task="t2v", device="auto", dtype="fp32")
    print("[4/5] generating the held-out prompts")
    written = []
    for i, prompt in enumerate(shapes.heldout_prompts[:2]):
        res = pipe(prompt, height=32, width=32, num_frames=9, num_inference_steps=a.gen_steps, seed=i)
        for suffix in (".mp4", ".png"):
            written.append(save_video(res.frames[0], out / f"heldout_{i}{suffix}"))
        (out / f"heldout_{i}.txt").write_text(prompt + "\n")
    print("[5/5] loss curve")
    written.append(plot_metrics(metrics, out / "loss.png", smooth=10))
    k = max(1, len(losses) // 10)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    summary = {
        "steps": len(losses),
        "loss_first": first,
        "loss_last": last,
        "prompts": shapes.heldout_prompts[:2],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"loss (mean of first/last {k} steps): {first:.4f} -> {last:.4f}")
    print("demo outputs:")
    for p in written:
        print(f"  {p}")
    return 0
