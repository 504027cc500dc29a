"""Training-step throughput and peak memory: mmkit against plain loops around the reference models.

VLM SFT (`--which vlm`): Qwen2.5-VL at 3B widths (LLM 2048 wide, 16/2 heads, MLP 11008, vocab 151936
tied; ViT 1280 wide) with 2 LLM layers and 2 vision layers (block 1 full attention), fp32 on CPU,
random weights from one seed, shared by both sides. Data: synthetic shape Q&A (`synth_shapes_qa`),
a mix of 112 px one-question and 224 px two-question records, so samples differ in length.
- mmkit: `VLMSFTTask` on `PackingCollator` batches (one packed row, per-sample causal attention, the
  LM head only at supervised positions, a sparse lookup gradient added in place into the tied head's),
  AdamW from `build_optimizer` (torch's fused AdamW: no per-parameter temporaries).
- reference: transformers' `Qwen2_5_VLForConditionalGeneration(**batch, labels=...)` on
  `SFTCollator` batches (right-padded to the longest sample), `.loss.backward()`, torch AdamW.
Both sides see the same samples in the same order; one step = forward + backward + AdamW step.
tokens/s counts real (non-padding) tokens. Each side runs in its own subprocess, so its peak RSS
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`: model, optimizer state and activations together) is
its own; the subprocesses alternate and the best step time of each side is kept. The first-step
losses of both sides are printed as a check that they train the same thing.

Run: `.venv/bin/python benchmarks/train_step.py [--which vlm|wan|all] [--repeats 2] [--steps 2]
[--batch 16] [--wan-layers 2]`. Goal (VLM): >= 1.5x tokens/s at <= 0.8x peak RSS.

Wan t2v (`--which wan`): the DiT at Wan2.1-1.3B widths (dim 1536, 12 heads, ffn 8960), `--wan-layers`
blocks, latent (1, 16, `--wan-frames`, 40, 60) (5 frames = 3000 tokens) + 512 text tokens, fp32, MSE to a fixed target,
AdamW (mmkit sides: `build_optimizer`, diffusers: torch's default); mmkit's `WanTransformer` (plain,
and with selective activation checkpointing: every 2nd block recomputed whole, and every block keeping
only what is costly to recompute, see `WanBlock.recompute_hidden`) against a plain loop around
diffusers' `WanTransformer3DModel` (no gradient checkpointing) on the same weights, each side in its
own subprocess. Goals: >= 1.0x the speed; with selective AC <= 0.6x the peak memory at <= 1.25x the
step time. At 2 layers the fixed part of the peak (weights, gradients and Adam's moments, 16 bytes per
parameter, about 1.8 GB, plus the interpreter) is most of it at 3000 tokens, so the memory goal needs
activation-heavy shapes (`--wan-frames 13`: 7800 tokens).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

# ---------------------------------------------------------------------------------------------------
# VLM SFT
# ---------------------------------------------------------------------------------------------------
VLM_MAX_PIXELS = 224 * 224  # the tokenizer folder's processor keeps 224 px images at 224 px


def vlm_prepare(workdir: Path, samples: int) -> None:
    """Tokenizer/processor folder + synthetic Q&A (two sizes, one and two turns) under `workdir`."""
    from mmkit.data.synth import synth_shapes_qa
    from mmkit.models.qwen2_5_vl.tokenizer import build_tiny_tokenizer

    ids = build_tiny_tokenizer(workdir / "tok", min_pixels=56 * 56, max_pixels=VLM_MAX_PIXELS)
    (workdir / "token_ids.json").write_text(json.dumps(ids))
    small = synth_shapes_qa(workdir / "qa112", images=samples, size=112, turns=1, seed=1, progress=False)
    big = synth_shapes_qa(workdir / "qa224", images=samples, size=224, turns=2, seed=2, progress=False)
    recs = []  # alternate the two kinds, so every batch mixes lengths
    for a, b in zip(json.loads(small.read_text()), json.loads(big.read_text())):
        a["images"] = [f"qa112/{p}" for p in a["images"]]
        b["images"] = [f"qa224/{p}" for p in b["images"]]
        recs += [a, b]
    (workdir / "qa.json").write_text(json.dumps(recs))


def vlm_config(workdir: Path, layers: int = 2, vision_layers: int = 2):
    """3B widths, few layers; token ids from the tokenizer folder (the vocabulary stays 151936)."""
    from mmkit.models.qwen2_5_vl.config import flavor

    cfg = flavor("3B")
    cfg.text.num_hidden_layers = layers
    cfg.vision.depth = vision_layers
    cfg.vision.fullatt_block_indexes = (vision_layers - 1,)
    for k, v in json.loads((workdir / "token_ids.json").read_text()).items():
        if k != "vocab_size" and hasattr(cfg, k):
            setattr(cfg, k, v)
    cfg.validate()
    return cfg


def vlm_model(cfg, seed: int = 0):
    """mmkit model with perturbed random weights (one copy in memory)."""
    from mmkit.models.qwen2_5_vl.model import Qwen2_5_VLModel
    from mmkit.models.qwen2_5_vl.tiny import perturbed_init

    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Qwen2_5_VLModel(cfg)
    model.to_empty(device="cpu")
    if cfg.tie_word_embeddings:  # to_empty from meta gives every module its own new parameter: re-tie
        model.language.lm_head.weight = model.language.embed_tokens.weight
    perturbed_init(model, seed)
    with torch.no_grad():  # keep 3B-width activations in a sane range
        model.language.embed_tokens.weight.mul_(0.05)
    return model.train()


def vlm_reference(cfg, seed: int = 0):
    """transformers' model holding exactly the mmkit model's tensors (no second copy)."""
    from common import transformers_qwen_twin

    return transformers_qwen_twin(vlm_model(cfg, seed), cfg).train()


def vlm_batches(workdir: Path, cfg, steps: int, batch: int, packed: bool) -> list[dict]:
    """`steps` batches of `batch` samples in dataset order, collated for one side."""
    from mmkit.data.sft import PackingCollator, SFTCollator, SFTDataset

    ds = SFTDataset(
        str(workdir / "qa.json"), str(workdir / "tok"), cutoff_len=4096, media_root=workdir, progress=False
    )
    collate = PackingCollator(ds.pad_token_id, max_len=4096) if packed else SFTCollator(ds.pad_token_id)
    n = len(ds)
    return [collate([ds[(s * batch + i) % n] for i in range(batch)]) for s in range(steps)]


def vlm_child(side: str, workdir: Path, steps: int, batch: int) -> dict:
    """Train `steps` + 1 steps (the first is warm-up) on one side; returns timings and peak RSS."""
    from mmkit.config import OptimConfig
    from mmkit.train.optim import build_optimizer
    from mmkit.train.tasks.qwen2_5_vl import VLMSFTTask

    cfg = vlm_config(workdir)
    batches = vlm_batches(workdir, cfg, steps + 1, batch, packed=side == "mmkit")
    optim = OptimConfig(lr=1e-5, weight_decay=0.0)
    if side == "mmkit":
        task = VLMSFTTask(vlm_model(cfg))
        opt = build_optimizer(task.model, optim)

        def step(b):
            out = task.loss(b)
            out.loss_sum.backward()
            for p in task.model.parameters():
                if p.grad is not None:
                    p.grad.div_(out.count)
            return out.loss_sum.item() / out.count
    else:
        ref = vlm_reference(cfg)
        opt = torch.optim.AdamW(ref.parameters(), lr=optim.lr, weight_decay=0.0)
        media = ("pixel_values", "image_grid_thw")

        def step(b):
            kw = {k: b[k] for k in media if k in b}
            out = ref(
                input_ids=b["input_ids"],
                attention_mask=b["attention_mask"],
                mm_token_type_ids=b["mm_token_type_ids"],
                labels=b["labels"],
                **kw,
            )
            out.loss.backward()
            return out.loss.item()

    times, losses = [], []
    for b in batches:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        losses.append(step(b))
        opt.step()
        times.append(time.perf_counter() - t0)
    tokens = [int(b["attention_mask"].sum()) for b in batches]
    padded = [b["attention_mask"].numel() for b in batches]
    best = min(range(1, len(times)), key=lambda i: times[i] / tokens[i])
    return {
        "side": side,
        "tokens_per_s": tokens[best] / times[best],
        "step_s": times[best],
        "tokens": tokens[best],
        "padded_tokens": padded[best],
        "first_loss": losses[0],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_vlm(args) -> None:
    """Prepare data once, alternate mmkit / transformers subprocesses, print both and the ratios."""
    with tempfile.TemporaryDirectory(prefix="mmkit-bench-vlm-") as tmp:
        work = Path(tmp)
        vlm_prepare(work, samples=max(args.batch * (args.steps + 1) // 2 + 1, 4))
        best: dict[str, dict] = {}
        for r in range(args.repeats):
            for side in ("mmkit", "transformers"):
                cmd = [sys.executable, str(Path(__file__).resolve()), "--child", f"vlm-{side}"]
                cmd += ["--workdir", str(work), "--steps", str(args.steps), "--batch", str(args.batch)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=HERE)
                res = json.loads(out.stdout.strip().splitlines()[-1])
                print(
                    f"  round {r + 1} {side:12s}: {res['tokens_per_s']:7.1f} tokens/s "
                    f"({res['tokens']} tokens, {res['padded_tokens']} with padding, {res['step_s']:.1f} s/step), "
                    f"peak RSS {res['peak_rss_mb']:.0f} MB, first loss {res['first_loss']:.5f}",
                    flush=True,
                )
                prev = best.get(side)
                if prev is None or res["tokens_per_s"] > prev["tokens_per_s"]:
                    best[side] = {**res, "peak_rss_mb": min(res["peak_rss_mb"], (prev or res)["peak_rss_mb"])}
                else:
                    prev["peak_rss_mb"] = min(prev["peak_rss_mb"], res["peak_rss_mb"])
    m, t = best["mmkit"], best["transformers"]
    print(
        f"VLM SFT step (3B widths, 2+2 layers, {args.batch} samples/step, fp32, "
        f"{torch.get_num_threads()} threads, best of {args.repeats}):"
    )
    print(f"  tokens/s: mmkit {m['tokens_per_s']:.1f}, transformers {t['tokens_per_s']:.1f}")
    print(f"  peak RSS: mmkit {m['peak_rss_mb']:.0f} MB, transformers {t['peak_rss_mb']:.0f} MB")
    print(
        f"  ratio tokens/s (mmkit / transformers): {m['tokens_per_s'] / t['tokens_per_s']:.2f}x  (goal >= 1.5x)"
    )
    print(
        f"  ratio peak RSS (mmkit / transformers): {m['peak_rss_mb'] / t['peak_rss_mb']:.2f}x  (goal <= 0.8x)"
    )
    print(f"  first-step loss: mmkit {m['first_loss']:.6f}, transformers {t['first_loss']:.6f}")


# ---------------------------------------------------------------------------------------------------
# Wan t2v DiT training step
# ---------------------------------------------------------------------------------------------------
WAN_LATENT = [1, 16, 5, 40, 60]  # 5 x 20 x 30 = 3000 video tokens after the (1, 2, 2) patch (--wan-frames)


def wan_child(side: str, args) -> dict:
    """One side of the Wan step benchmark in its own process: mmkit | mmkit-ac | diffusers."""
    from diffusers import WanTransformer3DModel

    from mmkit.config import OptimConfig
    from mmkit.models.wan import hf
    from mmkit.models.wan.config import WanConfig
    from mmkit.models.wan.model import WanTransformer
    from mmkit.parallel.ac import apply_ac
    from mmkit.train.optim import build_optimizer

    torch.manual_seed(0)
    ref = WanTransformer3DModel(
        num_attention_heads=12,
        attention_head_dim=128,
        ffn_dim=8960,
        num_layers=args.wan_layers,
        text_dim=4096,
    )
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    if side == "diffusers":
        model = ref.train()

        def forward(x, t, ctx):
            return model(x, t, ctx, return_dict=False)[0]
    else:
        model = WanTransformer(WanConfig.from_dict(dict(ref.config)))
        model.load_state_dict(hf.from_hf(ref.state_dict()))
        del ref
        model.train()
        if side == "mmkit-ac":
            apply_ac(model, "selective", every_k=2)

        def forward(x, t, ctx):
            return model(x, t, ctx)

    g = torch.Generator().manual_seed(1)
    WAN_LATENT[2], steps = args.wan_frames, args.steps
    x, target = torch.randn(WAN_LATENT, generator=g), torch.randn(WAN_LATENT, generator=g)
    ctx, t = torch.randn(1, 512, 4096, generator=g), torch.tensor([500.0])
    if side == "diffusers":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    else:
        opt = build_optimizer(model, OptimConfig(lr=1e-5, weight_decay=0.0))
    times, losses = [], []
    for _ in range(steps + 1):  # the first step is warm-up (and allocates the optimizer state)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = (forward(x, t, ctx) - target).pow(2).mean()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return {
        "side": side,
        "step_s": min(times[1:]),
        "first_loss": losses[0],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_wan(args) -> None:
    """Alternate the three sides in subprocesses; print step times, peak RSS and the ratios."""
    layers = args.wan_layers
    best: dict[str, dict] = {}
    for r in range(args.repeats):
        for side in ("mmkit", "mmkit-ac", "diffusers"):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", f"wan-{side}"]
            cmd += [
                "--steps",
                str(args.steps),
                "--wan-layers",
                str(layers),
                "--wan-frames",
                str(args.wan_frames),
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=HERE)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"  round {r + 1} {side:10s}: {res['step_s']:.2f} s/step, peak RSS {res['peak_rss_mb']:.0f} MB, "
                f"first loss {res['first_loss']:.6f}",
                flush=True,
            )
            prev = best.get(side)
            best[side] = {
                "step_s": min(res["step_s"], prev["step_s"]) if prev else res["step_s"],
                "peak_rss_mb": min(res["peak_rss_mb"], prev["peak_rss_mb"]) if prev else res["peak_rss_mb"],
                "first_loss": res["first_loss"],
            }
    m, a, d = best["mmkit"], best["mmkit-ac"], best["diffusers"]
    WAN_LATENT[2] = args.wan_frames
    tokens = WAN_LATENT[2] * (WAN_LATENT[3] // 2) * (WAN_LATENT[4] // 2)
    print(
        f"Wan t2v DiT step (1.3B widths, {layers} layers, latent {tuple(WAN_LATENT)} = {tokens} tokens, 512 text "
        f"tokens, fp32, AdamW, {torch.get_num_threads()} threads, best of {args.repeats}):"
    )
    print(
        f"  step time: mmkit {m['step_s']:.2f} s, mmkit+selective AC {a['step_s']:.2f} s, diffusers {d['step_s']:.2f} s"
    )
    print(
        f"  peak RSS:  mmkit {m['peak_rss_mb']:.0f} MB, mmkit+selective AC {a['peak_rss_mb']:.0f} MB, diffusers {d['peak_rss_mb']:.0f} MB"
    )
    print(f"  speed (diffusers time / mmkit time): {d['step_s'] / m['step_s']:.2f}x  (goal >= 1.0x)")
    print(
        f"  selective AC: memory {a['peak_rss_mb'] / d['peak_rss_mb']:.2f}x of diffusers (goal <= 0.6x), "
        f"time {a['step_s'] / d['step_s']:.2f}x (goal <= 1.25x)"
    )
    print(f"  first-step loss: mmkit {m['first_loss']:.6f}, diffusers {d['first_loss']:.6f}")


# ---------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------
CHILDREN = {
    "vlm-mmkit": ("mmkit", vlm_child),
    "vlm-transformers": ("transformers", vlm_child),
    "wan-mmkit": ("mmkit", wan_child),
    "wan-mmkit-ac": ("mmkit-ac", wan_child),
    "wan-diffusers": ("diffusers", wan_child),
}
SECTIONS = {"vlm": run_vlm, "wan": run_wan}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--which", choices=["vlm", "wan", "all"], default="all")
    ap.add_argument("--repeats", type=int, default=2, help="alternating rounds per side; best is kept")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per subprocess (after 1 warm-up)")
    ap.add_argument("--batch", type=int, default=16, help="VLM: samples per step")
    ap.add_argument("--wan-layers", type=int, default=2, help="Wan: DiT layers (1.3B widths)")
    ap.add_argument("--wan-frames", type=int, default=5, help="Wan: latent frames (x 20 x 30 tokens each)")
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        side, fn = CHILDREN[args.child]
        if args.child.startswith("wan"):
            print(json.dumps(fn(side, args)))
        else:
            print(json.dumps(fn(side, Path(args.workdir), args.steps, args.batch)))
        return
    which = list(SECTIONS) if args.which == "all" else [args.which]
    for name in which:
        if name not in SECTIONS:
            print(f"{name}: no benchmark section yet")
            continue
        SECTIONS[name](args)


if __name__ == "__main__":
    main()
