"""Wan2.1 DiT forward: mmkit vs diffusers on the same weights, fp32 and bf16.

Config: Wan-1.3B widths (dim 1536, 12 heads, ffn 8960), 2 layers, latent (1, 16, 5, 30, 52),
512 text tokens. Prints per dtype: the time of each side (best of interleaved runs), the ratio
diffusers/mmkit (> 1 means mmkit is faster), the max abs difference, and each side's FLOP rate
as a fraction of this machine's measured matmul peak.

Run: `.venv/bin/python benchmarks/wan_dit.py [--repeats 3] [--layers 2]`
"""

from __future__ import annotations

import argparse

import torch
from common import interleaved_best, matmul_peak
from diffusers import WanTransformer3DModel

from mmkit.models.wan import hf
from mmkit.models.wan.config import WanConfig
from mmkit.models.wan.model import WanTransformer


def forward_flops(cfg: WanConfig, tokens: int, text: int) -> float:
    """Matmul FLOPs of one forward (multiply-add = 2 FLOPs)."""
    d, f, s, t = cfg.dim, cfg.ffn_dim, tokens, text
    per_layer = (
        2 * s * d * 3 * d  # fused qkv
        + 4 * s * s * d  # self-attention scores + values
        + 2 * s * d * d  # self out
        + 2 * s * d * d  # cross q
        + 2 * t * d * 2 * d  # cross kv
        + 4 * s * t * d  # cross attention
        + 2 * s * d * d  # cross out
        + 4 * s * d * f  # mlp
    )
    embed = (
        2 * s * cfg.in_channels * 4 * d
        + 2 * t * (cfg.text_dim * d + d * d)
        + 2 * s * d * cfg.out_channels * 4
    )
    return cfg.num_layers * per_layer + embed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--latent", type=int, nargs=5, default=[1, 16, 5, 30, 52])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    args = ap.parse_args()

    torch.manual_seed(0)
    ref = WanTransformer3DModel(
        num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=args.layers, text_dim=4096
    ).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    cfg = WanConfig.from_dict(dict(ref.config))
    ref_sd = {
        k: v.clone() for k, v in ref.state_dict().items()
    }  # fp32 master copy: each dtype starts from it
    ours = WanTransformer(cfg).eval()

    B, C, T, H, W = args.latent
    x = torch.randn(B, C, T, H, W)
    t = torch.tensor([500.0] * B)
    ctx = torch.randn(B, 512, 4096)
    tokens = T * (H // 2) * (W // 2)
    flops = forward_flops(cfg, tokens, 512)
    print(
        f"Wan DiT forward: dim {cfg.dim}, {args.layers} layers, latent {tuple(args.latent)} -> {tokens} tokens, "
        f"{flops / 1e9:.1f} GFLOP, threads {torch.get_num_threads()}"
    )
    with torch.no_grad():
        want32 = ref(x, t, ctx, return_dict=False)[0].float()
    ref.load_state_dict(ref_sd)
    for name in args.dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        # diffusers keeps its _keep_in_fp32_modules in fp32 when loaded with torch_dtype; mirror that
        ref.to(torch.float32).load_state_dict(ref_sd)
        ours.to_dtype(torch.float32).load_state_dict(hf.from_hf(ref_sd))
        ref_d = ref.to(dtype)
        if dtype != torch.float32:
            for n, m in ref_d.named_modules():
                if any(k in n.split(".") for k in ref_d._keep_in_fp32_modules):
                    m.float()
            ref_d.scale_shift_table.data = ref_d.scale_shift_table.data.float()
            for b in ref_d.blocks:
                b.scale_shift_table.data = b.scale_shift_table.data.float()
        ours.to_dtype(dtype)
        xd, ctxd = x.to(dtype), ctx.to(dtype)
        with torch.no_grad():
            out: dict = {}
            best = interleaved_best(
                {
                    "diffusers": lambda: out.__setitem__("d", ref_d(xd, t, ctxd, return_dict=False)[0]),  # noqa: B023
                    "mmkit": lambda: out.__setitem__("m", ours(xd, t, ctxd)),  # noqa: B023
                },
                repeats=args.repeats,
            )
        peak = matmul_peak(dtype)
        diff = (out["d"].float() - out["m"].float()).abs().max().item()
        err_d = (out["d"].float() - want32).abs().max().item()
        err_m = (out["m"].float() - want32).abs().max().item()
        rms = want32.pow(2).mean().sqrt()
        rel_d = ((out["d"].float() - want32).pow(2).mean().sqrt() / rms).item()
        rel_m = ((out["m"].float() - want32).pow(2).mean().sqrt() / rms).item()
        print(
            f"[{name}] diffusers {best['diffusers']:.3f}s ({flops / best['diffusers'] / peak:.0%} of peak)  "
            f"mmkit {best['mmkit']:.3f}s ({flops / best['mmkit'] / peak:.0%} of peak)  "
            f"ratio {best['diffusers'] / best['mmkit']:.3f}x  max|diff| {diff:.2e}  "
            f"err vs fp32 ref (max abs / rel RMS): diffusers {err_d:.2e} / {rel_d:.2e}, mmkit {err_m:.2e} / {rel_m:.2e}  "
            f"peak {peak / 1e9:.0f} GFLOP/s"
        )


if __name__ == "__main__":
    main()
