"""Pretrain the shipped shapes model: a Wan2.1-architecture DiT on `mmkit data synth shapes` clips.

Stages, each skipped when its output already exists, so rerunning the same command resumes:
1. data: 64x64 px, 17-frame clips of every caption combination except `--heldout` held-out ones
   (`heldout_prompts.json`; never seen in training, used by `mmkit eval shapes`);
2. init: a diffusers-layout start folder (`create_tiny_wan` with `SHAPES_DIT`: random DiT, the fixed
   tiny umT5, the shipped fitted VAE);
3. features: VAE latents and umT5 features precomputed once (`mmkit.data.features`);
4. train: `recipes/tiny/wan_shapes.toml` through mmkit's Trainer (DCP checkpoints every 100 steps,
   resumed automatically; constant LR + EMA, so any checkpoint is usable);
5. export: the EMA weights of the latest checkpoint, bf16, one safetensors file with the DiT config,
   held-out prompts and step count in its metadata -> `mmkit/assets/shapes_wan_dit.safetensors`.

Run (long; on a shared machine, niced and in the background):
    nohup nice -n 10 python scripts/pretrain_shapes.py > outputs/pretrain_shapes.log 2>&1 &
Continue a stopped run: the same command (a larger --steps trains further). Export only what exists:
    python scripts/pretrain_shapes.py --export-only
Which caption words a trained model uses (its loss on 32 training clips with one word swapped; a word
whose swap costs nothing is ignored):
    python scripts/pretrain_shapes.py --diagnose DIR   # DIR from `mmkit create-tiny wan-shapes DIR`
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="outputs/pretrain_shapes", help="data, features, checkpoints")
    p.add_argument("--steps", type=int, default=9000)
    p.add_argument("--videos", type=int, default=1632, help="training clips (12 per seen combination)")
    p.add_argument("--heldout", type=int, default=32, help="caption combinations kept out of training")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "mmkit" / "assets" / "shapes_wan_dit.safetensors"))
    p.add_argument("--export-only", action="store_true", help="only write the asset from the latest ckpt")
    p.add_argument("--diagnose", metavar="DIR", help="print the caption-swap losses of the model in DIR")
    a = p.parse_args(argv)
    if a.diagnose:
        return diagnose(a.diagnose, Path(a.work).resolve() / "features", a.threads)

    import torch

    torch.set_num_threads(a.threads)
    from mmkit.config import parse_cli
    from mmkit.data.synth import synth_shapes
    from mmkit.models.wan.shapes import SHAPES_DIT, SHAPES_TEXT_LEN, save_shapes_asset
    from mmkit.models.wan.tiny import create_tiny_wan

    work = Path(a.work).resolve()
    data, init, feats, ckpt = work / "shapes", work / "init", work / "features", work / "ckpt"
    recipe = ROOT / "recipes" / "tiny" / "wan_shapes.toml"
    args = ["--config", str(recipe), "--model.init_from", str(init), "--data.paths", f"[{data / 'data.txt'}]"]
    args += ["--train.steps", str(a.steps)]
    args += ["--checkpoint.dir", str(ckpt), "--logging.metrics_file", str(ckpt / "metrics.jsonl")]
    with_feats = ["--data.precomputed_dir", str(feats)]  # validated only once it exists
    t0 = time.time()
    if not a.export_only:
        if not (data / "heldout_prompts.json").is_file():
            print(f"[1/5] data -> {data}", flush=True)
            synth_shapes(data, videos=a.videos, num_frames=17, height=64, width=64, seed=0, heldout=a.heldout)
        if not (init / "model_index.json").is_file():
            print(f"[2/5] start folder -> {init}", flush=True)
            create_tiny_wan(init, task="t2v", seed=0, dit=SHAPES_DIT)
            dit_json = init / "transformer" / "config.json"
            dit_cfg = json.loads(dit_json.read_text())
            dit_json.write_text(json.dumps({**dit_cfg, "text_len": SHAPES_TEXT_LEN}, indent=2) + "\n")
        if not (feats / "index.json").is_file():
            print(f"[3/5] features -> {feats}", flush=True)
            from mmkit.data.features import extract_features
            from mmkit.data.video import VideoDataset
            from mmkit.train.build import build_task

            cfg = parse_cli([*args, "--data.precomputed_dir", "null"])
            d = cfg.data
            ds = VideoDataset(d.paths, d.num_frames, d.height, d.width, d.train_fps, seed=cfg.train.seed)
            extract_features(build_task(cfg, torch.device("cpu")), ds, feats)
        print(f"[4/5] training to step {a.steps} -> {ckpt}", flush=True)
        from mmkit.train.trainer import Trainer

        with Trainer(parse_cli(args + with_feats)) as trainer:
            trainer.fit()
    print(f"[5/5] export -> {a.out}", flush=True)
    heldout = json.loads((data / "heldout_prompts.json").read_text())
    path, step = save_shapes_asset(ckpt, a.out, heldout)
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB, step {step}) in {time.time() - t0:.0f} s")
    return 0


def diagnose(model_dir: str, feats: Path, threads: int, clips: int = 32) -> int:
    """Print `caption_sensitivity` of the model in `model_dir` on the first `clips` training features."""
    import torch

    torch.set_num_threads(threads)
    from mmkit.checkpoint.files import load_safetensors
    from mmkit.infer.evaluate import caption_sensitivity
    from mmkit.infer.pipelines import load_pipeline

    samples = json.loads((feats / "index.json").read_text())["samples"][:clips]
    latents = torch.stack([load_safetensors(feats / s["file"])["latents"] for s in samples])
    table = caption_sensitivity(
        load_pipeline(model_dir, task="t2v"), latents, [s["caption"] for s in samples]
    )
    keys = list(next(iter(table.values())))
    print("flow loss on training clips; columns: the caption with that attribute swapped")
    print("sigma  " + "  ".join(f"{k:>10}" for k in keys))
    for sigma, row in table.items():
        print(f"{sigma:<6} " + "  ".join(f"{row[k]:>10.4f}" for k in keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
