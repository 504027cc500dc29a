"""OpenSoraPlan 1.3 DiT forward: Skiparse against the same layers run dense.

Config: the released width (2304, 24 heads x 96, caption 4096), 4 layers (0, 1 dense; 2 single-skip,
3 group-skip with k = 4), latents shaped like a 93x352x640 clip (24 x 44 x 80 latents) scaled down to
fit a CPU (default (1, 8, 6, 22, 40) -> 1320 tokens), 512 caption tokens, fp32. Prints for the
Skiparse model and for the same weights with every layer dense: the forward time (best of interleaved
runs), its matmul FLOPs and fraction of this machine's measured matmul peak (as benchmarks/wan_dit.py),
and the self-attention of one layer alone (time and FLOPs, dense vs Skiparse; theory: 1/k).

Run: `.venv/bin/python benchmarks/osp_dit.py [--latent 1 8 6 22 40] [--repeats 3]`
"""

from __future__ import annotations

import argparse

import torch
from common import interleaved_best, matmul_peak

from mmkit.models.opensoraplan.config import OSPConfig
from mmkit.models.opensoraplan.model import OpenSoraPlanTransformer, skiparse_attention


def forward_flops(cfg: OSPConfig, tokens: int, text: int, sparse_layers: int) -> tuple[float, float]:
    """(matmul FLOPs of one forward, of which self-attention scores + values), multiply-add = 2 FLOPs."""
    d, s, t, k = cfg.hidden, tokens, text, cfg.sparse_n
    dense_layers = cfg.num_layers - sparse_layers
    attn = 4 * s * s * d * (dense_layers + sparse_layers / k)
    per_layer = 2 * s * d * 3 * d + 2 * s * d * d + 2 * s * d * d + 2 * t * d * 2 * d + 4 * s * t * d
    per_layer += 2 * s * d * d + 2 * 2 * s * d * 4 * d  # cross out, MLP (4x)
    embed = 2 * s * cfg.in_channels * 4 * d + 2 * t * (cfg.caption_channels * d + d * d) + 2 * s * d * 32
    return cfg.num_layers * per_layer + attn + embed, attn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latent", type=int, nargs=5, default=[1, 8, 6, 22, 40])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--text", type=int, default=512)
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg = OSPConfig(num_layers=4)
    model = OpenSoraPlanTransformer(cfg).eval()
    modes = [b.attn.skiparse for b in model.blocks]
    B, C, T, H, W = args.latent
    x = torch.randn(B, C, T, H, W)
    t = torch.tensor([500.0] * B)
    cap = torch.randn(B, args.text, cfg.caption_channels)
    cap_mask = torch.ones(B, args.text)
    tokens = T * (H // 2) * (W // 2)
    sparse = sum(m is not None for m in modes)
    flops_sparse, attn_sparse = forward_flops(cfg, tokens, args.text, sparse)
    flops_dense, attn_dense = forward_flops(cfg, tokens, args.text, 0)
    peak = matmul_peak(torch.float32)
    print(
        f"OSP DiT forward: width {cfg.hidden}, {cfg.num_layers} layers {modes}, latent {tuple(args.latent)} -> "
        f"{tokens} tokens, {args.text} caption tokens, fp32, threads {torch.get_num_threads()}, "
        f"matmul peak {peak / 1e9:.0f} GFLOP/s"
    )

    def run(dense: bool):
        for b, m in zip(model.blocks, modes):
            b.attn.skiparse = None if dense else m
        return model(x, t, cap, caption_mask=cap_mask)

    with torch.no_grad():
        out: dict = {}
        best = interleaved_best(
            {
                "skiparse": lambda: out.__setitem__("s", run(False)),
                "dense": lambda: out.__setitem__("d", run(True)),
            },
            repeats=args.repeats,
        )
    for name, fl, at in (("skiparse", flops_sparse, attn_sparse), ("dense", flops_dense, attn_dense)):
        print(
            f"[{name:8s}] {best[name]:.3f}s  {fl / 1e9:.1f} GFLOP ({at / 1e9:.1f} in self-attention)  "
            f"{fl / best[name] / peak:.0%} of peak"
        )
    print(f"forward dense / skiparse time {best['dense'] / best['skiparse']:.3f}x")

    # one layer's self-attention alone: (B, 24, S, 96)
    q, k, v = (torch.randn(B, cfg.num_attention_heads, tokens, cfg.attention_head_dim) for _ in range(3))
    with torch.no_grad():
        att = interleaved_best(
            {mode or "dense": (lambda mode=mode: skiparse_attention(q, k, v, None, mode, cfg.sparse_n))
             for mode in (None, "single", "group")},
            repeats=args.repeats,
        )  # fmt: skip
    a_dense = 4 * tokens * tokens * cfg.hidden
    pad = -tokens % cfg.sparse_n**2
    a_sparse = 4 * (tokens + pad) ** 2 * cfg.hidden / cfg.sparse_n
    print(
        f"self-attention of one layer: dense {att['dense'] * 1e3:.1f} ms ({a_dense / 1e9:.2f} GFLOP), "
        f"single {att['single'] * 1e3:.1f} ms, group {att['group'] * 1e3:.1f} ms ({a_sparse / 1e9:.2f} GFLOP, "
        f"{a_sparse / a_dense:.3f} of dense; theory 1/k = {1 / cfg.sparse_n:.3f}); time ratio single/dense "
        f"{att['single'] / att['dense']:.3f}, group/dense {att['group'] / att['dense']:.3f}"
    )


if __name__ == "__main__":
    main()
