"""`mmkit create-tiny KIND OUTDIR`: a small random model in the real Hugging Face layout.

Kinds come from the model families' registry entries (`FamilySpec.tiny`): wan-t2v, wan-i2v, wan-shapes
(diffusers pipeline folders), qwen2_5_vl, qwen-shapes (transformers folders), osp-t2v, osp-i2v
(OpenSoraPlan 1.3 release layout).
Example: `mmkit create-tiny wan-t2v /tmp/wan-tiny && mmkit generate t2v --model /tmp/wan-tiny ...`
"""

from __future__ import annotations

from mmkit import registry


def add_arguments(p) -> None:
    p.add_argument("kind", choices=list(registry.tiny_kinds()))
    p.add_argument("outdir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--original-layout", action="store_true", help="wan: also write the DiT in the original Wan2.1 layout"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a folder an earlier create-tiny wrote (never others)",
    )


def run(a) -> int:
    from mmkit.outputs import check_output_dir

    # every family's writer claims its folder too; checked here first, so no writer can skip it
    check_output_dir(a.outdir, f"create-tiny {a.kind}", a.overwrite)
    out = registry.tiny_kinds()[a.kind](
        a.outdir, seed=a.seed, original_layout=a.original_layout, overwrite=a.overwrite
    )
    print(f"wrote {a.kind} to {out}")
    return 0
