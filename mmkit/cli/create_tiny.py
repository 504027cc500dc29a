"""`mmkit create-tiny KIND OUTDIR`: a small random model in the real Hugging Face layout.

Kinds: wan-t2v, wan-i2v (diffusers pipeline folders), qwen2_5_vl (a transformers folder).
Example: `mmkit create-tiny wan-t2v /tmp/wan-tiny && mmkit generate t2v --model /tmp/wan-tiny ...`
"""

from __future__ import annotations

KINDS = ("wan-t2v", "wan-i2v", "qwen2_5_vl")


def add_arguments(p) -> None:
    p.add_argument("kind", choices=KINDS)
    p.add_argument("outdir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--original-layout", action="store_true", help="wan: also write the DiT in the original Wan2.1 layout"
    )


def run(a) -> int:
    if a.kind.startswith("wan-"):
        from mmkit.models.wan.tiny import create_tiny_wan

        out = create_tiny_wan(a.outdir, task=a.kind[4:], seed=a.seed, original_layout=a.original_layout)
    else:
        from mmkit.models.qwen2_5_vl.tiny import create_tiny_qwen2_5_vl

        out = create_tiny_qwen2_5_vl(a.outdir, seed=a.seed)
    print(f"wrote {a.kind} to {out}")
    return 0
