"""Attention backend auto-selection: does the runtime pick equal the fastest correct kernel?

For Wan2.1-1.3B self-attention shapes (12 heads, head dim 128) at a few token counts (or the ones given:
`--heads 4 --head-dim 32 --tokens 80` is the shapes model's self-attention at 64x64 px, 17 frames), times every
candidate that runs on this device (interleaved, best of --repeats), checks each against the math
kernel, and prints the runtime mode's pick next to the measured fastest. Times are noisy on a shared CPU.

Run: `.venv/bin/python benchmarks/attention_backends.py [--repeats 5] [--device cpu] [--heads H --head-dim D
--tokens S [S ...] --batch B]`
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from common import interleaved_best

from mmkit.models.common import attention_backends as ab


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--tokens", type=int, nargs="+", default=[520, 1560, 3120])
    ap.add_argument("--batch", type=int, default=1)
    a = ap.parse_args()
    os.environ["MMKIT_CACHE_DIR"] = tempfile.mkdtemp()  # a fresh choice, not a cached one
    dev, dtype = torch.device(a.device), getattr(torch, a.dtype)
    for s in a.tokens:
        q, k, v = (torch.randn(a.batch, a.heads, s, a.head_dim, device=dev, dtype=dtype) for _ in range(3))
        pick = ab.select_runtime(q, k, v)
        ref = ab.BACKENDS["math"].fn(q, k, v).float()
        fns, errs = {}, {}
        for b in ab.BACKENDS.values():
            if not ab.runs_on(b, dev):
                continue
            try:
                errs[b.name] = float((b.fn(q, k, v).float() - ref).abs().max())
            except Exception:
                continue
            fns[b.name] = lambda fn=b.fn, q=q, k=k, v=v: fn(q, k, v)
        best = interleaved_best(fns, repeats=a.repeats)
        fastest = min(best, key=best.get)
        line = ", ".join(f"{n} {best[n] * 1e3:.1f} ms (err {errs[n]:.1e})" for n in best)
        ratio = best[pick] / best[fastest]
        print(
            f"B={a.batch} H={a.heads} D={a.head_dim} S={s}: {line}\n  runtime pick {pick}, measured fastest {fastest} (pick/fastest time {ratio:.2f})"
        )


if __name__ == "__main__":
    main()
