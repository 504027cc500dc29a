"""Multi-process Wan2.1 inference: step time and bytes per step per rank for each layout, against theory.

Model: the Wan2.1-T2V-1.3B DiT's widths (dim 1536, 12 heads x 128, ffn 8960, text_dim 4096) with
`--layers` blocks (default 2), random weights (seed 0, identical on every rank), fp32. Input: a 480p-like
token grid scaled to fit this CPU: `--grid` latent frames x 30 x 52 patches (one latent frame of 480p is
30 x 52 = 1560 tokens; 81 frames would be 21 x 1560 = 32,760), a 512-token text context, guidance 5
(both CFG branches every step). One "step" = one velocity evaluation of the sampler (cond + uncond).

Layouts: one process with 2 threads and with 1 thread; 2 processes (1 thread each): ulysses2, ring2,
cfg2; 4 processes (oversubscribing 2 cores: their times are not speed-ups): ulysses2 x ring2, cfg2 x
ulysses2. Each layout runs `--steps` steps after one warm-up; reported: the best step (per step the
slowest rank) and the bytes one rank sends per step (`mmkit.tools.commstats.CommStats`; all_to_all and
all_gather count (n-1)/n x the full tensor, p2p the tensor sent).

Theory per rank and step (S = padded tokens, d = dim x 4 bytes, p = sequence-parallel degree,
u = Ulysses size, r = ring size, L = layers, F = DiT forwards per rank per step: 2, or 1 under cfg2):
- Ulysses all-to-all: 4 S d / p x (u-1)/u per attention layer (q, k, v in, out back; the issue's
  4 S d / p counts the whole all-to-all, (u-1)/u of it leaves the rank) -> x L x F;
- ring p2p: 2 S d / u x (r-1)/r per layer (k, v go r-1 hops) -> x L x F;
- the gather of the predicted tokens after the head: (p-1) x S/p x C_out x 4 patch x 4 bytes per forward;
- CFG: one latent-sized tensor (16 x T x 60 x 104 x 4 bytes) per step.
Printed ratios are measured / theory (1.000 = nothing else is sent).

VAE (`--vae`): the tiny fitted Wan VAE decoding a 33-frame 128 x 128 clip (a moving disc on a gradient,
encoded by the same VAE): untiled, spatial tiles (one process, `--vae-tiling`) and the time split over 2
processes (`--vae-parallel`, warm-up 1 and 3 latent frames); time and the difference to the untiled decode.

Run: `.venv/bin/python benchmarks/parallel_infer.py [--layers 2] [--grid 1] [--steps 2] [--vae]`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]

# name -> (processes, InferenceParallel kwargs, threads per process)
LAYOUTS = {
    "single_2threads": (1, {}, 2),
    "single_1thread": (1, {}, 1),
    "ulysses2": (2, {"ulysses": 2}, 1),
    "ring2": (2, {"ring": 2}, 1),
    "cfg2": (2, {"cfg": 2}, 1),
    "ulysses2_ring2": (4, {"ulysses": 2, "ring": 2}, 1),
    "cfg2_ulysses2": (4, {"cfg": 2, "ulysses": 2}, 1),
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, args: list[str], threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}  # fmt: skip
    if nproc == 1:
        cmd = [sys.executable, str(HERE), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(_port()), str(HERE), *args]  # fmt: skip
    subprocess.run(cmd, check=True, env=env)


# ---------------------------------------------------------------- worker (one layout, every rank)


def worker(name: str, a, out: Path) -> None:
    import torch
    import torch.distributed as dist

    from mmkit.infer.parallel import InferenceLayout, InferenceParallel
    from mmkit.infer.wan_parallel import WanSequenceParallel
    from mmkit.models.wan.config import FLAVORS
    from mmkit.models.wan.model import WanTransformer
    from mmkit.tools.commstats import CommStats

    nproc, kw, threads = LAYOUTS[name]
    torch.set_num_threads(threads)
    if nproc > 1:
        from mmkit.parallel.dims import process_group_timeout

        dist.init_process_group("gloo", timeout=process_group_timeout())
    p = InferenceParallel(**kw)
    layout = InferenceLayout(p)
    import dataclasses

    cfg = dataclasses.replace(FLAVORS["1.3B"], num_layers=a.layers)
    torch.manual_seed(0)
    model = WanTransformer(cfg).eval()
    dit = WanSequenceParallel.parallelize(model, layout, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, a.grid, 60, 104, generator=g)  # 480p latents: 60 x 104, patches 30 x 52
    ctx, neg = (torch.randn(1, 512, 4096, generator=g) for _ in range(2))
    velocity = layout.velocity(dit, 5.0, {"text_context": ctx}, {"text_context": neg})
    t = torch.tensor([500.0])
    times, comm = [], None
    with torch.no_grad():
        for i in range(a.steps + 1):
            if layout.world > 1:
                dist.barrier()
            cs = CommStats().install()
            t0 = time.perf_counter()
            v = velocity(x, t)
            dt = time.perf_counter() - t0
            cs.uninstall()
            if layout.world > 1:
                dt_t = torch.tensor([dt])
                dist.all_reduce(dt_t, op=dist.ReduceOp.MAX)  # a step ends when the slowest rank ends
                dt = dt_t.item()
            if i > 0:
                times.append(dt)
                comm = dict(cs.bytes)
    per_rank = [comm]
    if layout.world > 1:
        per_rank = [None] * layout.world
        dist.all_gather_object(per_rank, comm)
    if layout.rank == 0:
        S = a.grid * 30 * 52
        res = {"name": name, "world": layout.world, "kw": kw, "tokens": S, "dim": cfg.dim, "layers": cfg.num_layers,
               "step_s": min(times), "bytes": per_rank, "v_norm": float(v.norm())}  # fmt: skip
        out.write_text(json.dumps(res))
    if layout.world > 1:
        dist.barrier()
        dist.destroy_process_group()


def theory(res: dict) -> dict:
    """Bytes one rank sends per step by op kind, from the formulas in the module docstring."""
    kw, S, L = res["kw"], res["tokens"], res["layers"]
    u, r, c = kw.get("ulysses", 1), kw.get("ring", 1), kw.get("cfg", 1)
    p = u * r
    s_pad = -(-S // p) * p
    d = res["dim"] * 4
    forwards = 2 if c == 1 else 1
    out = {}
    if u > 1:
        out["all_to_all"] = 4 * s_pad * d // p * (u - 1) // u * L * forwards
    if r > 1:
        out["p2p"] = 2 * s_pad * d // u * (r - 1) // r * L * forwards
    gather = 0
    if p > 1:
        gather += (p - 1) * (s_pad // p) * 16 * 4 * 4 * forwards  # predicted tokens: C_out 16 x patch 4, fp32
    if c > 1:
        gather += 16 * (S // (30 * 52)) * 60 * 104 * 4  # one latent
    if gather:
        out["all_gather"] = gather
    return out


def report(results: list[dict]) -> None:
    base = {r["name"]: r["step_s"] for r in results}
    print(
        f"\nWan-1.3B widths, {results[0]['layers']} blocks, {results[0]['tokens']} tokens, fp32, gloo on this CPU"
    )
    print(
        f"{'layout':<18}{'procs':>6}{'step s':>9}{'vs 1p2t':>9}  bytes/step/rank (measured / theory = ratio)"
    )
    for r in results:
        th = theory(r)
        meas = r["bytes"][0] or {}
        kinds = sorted(set(th) | set(meas))
        cells = [f"{k} {meas.get(k, 0) / 2**20:.2f} MiB / {th.get(k, 0) / 2**20:.2f} = "
                 f"{meas.get(k, 0) / th[k] if th.get(k) else float('nan'):.3f}" for k in kinds]  # fmt: skip
        ratio = r["step_s"] / base["single_2threads"]
        print(f"{r['name']:<18}{r['world']:>6}{r['step_s']:>9.2f}{ratio:>9.2f}  " + ("; ".join(cells) or "-"))
    if "ulysses2" in base:
        print(f"\nulysses2 (2 processes x 1 thread) / one process with 2 threads: "
              f"{base['ulysses2'] / base['single_2threads']:.2f} (< 1: faster)")  # fmt: skip


# ---------------------------------------------------------------- VAE: untiled, tiled, parallel


def vae_worker(a, out: Path) -> None:
    import torch
    import torch.distributed as dist

    from mmkit.infer.parallel import tiled_decode
    from mmkit.infer.wan_parallel import parallel_decode
    from mmkit.models.wan.tiny import fitted_tiny_vae

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    vae = fitted_tiny_vae().eval()
    # a moving disc on a gradient, 33 x 128 x 128, encoded: latents of the kind of video the VAE was fitted on
    n, f = 128, 33
    yy, xx = torch.meshgrid(torch.arange(float(n)), torch.arange(float(n)), indexing="ij")
    frames = []
    for i in range(f):
        disc = ((yy - n / 2) ** 2 + (xx - 20 - 3 * i) ** 2 < 20**2).float()
        frames.append(torch.stack([disc, xx / (n - 1), 1 - yy / (n - 1)]) * 2 - 1)
    video = torch.stack(frames, dim=1)[None]  # (1, 3, 33, 128, 128) in [-1, 1]
    res = {}
    with torch.no_grad():
        z = vae.encode(video).latent_dist.mode()  # (1, 16, 9, 16, 16)

        def dec(zt):
            return vae.decode(zt, return_dict=False)[0]

        ref_path = out.parent / "vae_ref.pt"
        if world == 1:
            t0 = time.perf_counter()
            ref = dec(z)
            res["untiled"] = {"s": time.perf_counter() - t0}
            torch.save(ref, ref_path)
            for tile in (8, 12):  # 64 / 96 px tiles, overlap a quarter
                t0 = time.perf_counter()
                got = tiled_decode(dec, z, 8, tile, f)
                res[f"spatial tiles {tile * 8} px, 1 process"] = {"s": time.perf_counter() - t0, "got": got}
        else:
            for warm in (1, 3):
                dist.barrier()
                t0 = time.perf_counter()
                got = parallel_decode(vae, z, dist.group.WORLD, warm, 4)
                res[f"time split over {world} processes, warm-up {warm}"] = {
                    "s": time.perf_counter() - t0,
                    "got": got,
                }
    if world == 1 or dist.get_rank() == 0:
        ref = torch.load(ref_path, weights_only=True)
        for r in res.values():
            got = r.pop("got", None)
            if got is not None:
                r["maxabs"], r["meanabs"] = float((got - ref).abs().max()), float((got - ref).abs().mean())
        out.write_text(json.dumps(res))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--grid", type=int, default=1, help="latent frames (30 x 52 patches each)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--only", nargs="*", default=list(LAYOUTS))
    ap.add_argument("--vae", action="store_true", help="also the tiled / parallel VAE decode")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker == "vae":
        return vae_worker(a, Path(a.out))
    if a.worker:
        return worker(a.worker, a, Path(a.out))
    common = ["--layers", str(a.layers), "--grid", str(a.grid), "--steps", str(a.steps)]
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for name in a.only:
            nproc, _, threads = LAYOUTS[name]
            path = Path(tmp) / f"{name}.json"
            launch(nproc, ["--worker", name, "--out", str(path), *common], threads)
            results.append(json.loads(path.read_text()))
            print(f"{name}: {results[-1]['step_s']:.2f} s/step", flush=True)
        if results:
            report(results)
        if a.vae:
            one, two = Path(tmp) / "vae1.json", Path(tmp) / "vae2.json"
            launch(1, ["--worker", "vae", "--out", str(one)], 1)
            launch(2, ["--worker", "vae", "--out", str(two)], 1)
            rows = {**json.loads(one.read_text()), **json.loads(two.read_text())}
            print(
                "\nVAE decode, 33 x 128 x 128 (tiny fitted VAE), difference to the untiled decode (pixels in [-1, 1])"
            )
            for k, r in rows.items():
                err = (
                    f"max abs {r['maxabs']:.2e}, mean abs {r['meanabs']:.2e}"
                    if "maxabs" in r
                    else "reference"
                )
                print(f"  {k:<42} {r['s']:6.2f} s  {err}")


if __name__ == "__main__":
    main()
