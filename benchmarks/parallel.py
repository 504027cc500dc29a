"""Step time and bytes communicated per step for each parallel layout of the tiny recipes, on this CPU.

Recipes: tiny Wan2.1 t2v (`recipes/tiny/wan_t2v.toml`, 2 blocks, 2 heads x 32, clips of 17 x 64 x 64
-> 5 x 4 x 4 = 80 video tokens per sample) and tiny Qwen2.5-VL SFT (`recipes/tiny/qwen2_5_vl_sft.toml`,
2 LLM layers, 4 query / 2 kv heads x 16, packed rows of 4 Q&A samples with a 112 px image each).
The tiny model folder and the synthetic data are written to a temporary folder first.

Layouts: one process (no communication); 2 processes: fsdp2, tp2 (+ sequence parallel), cp2 Ulysses,
cp2 ring, pp2 1F1B; 4 processes: cp4 hybrid (Ulysses 2 x ring 2), tp2 x fsdp2, pp2 x tp2, pp2 x cp2
Ulysses (pipeline stages with tensor / context parallelism inside). Every layout trains
`--steps` optimizer steps (same global batch as the recipe); the first is warm-up and not measured.
All layouts of one process count run in one launch (`_parallel_worker.py`; torchrun, gloo,
OMP_NUM_THREADS=1 per process, so 4 processes oversubscribe 2 cores).

Reported per layout: step time (best measured step; per step the slowest rank), and the bytes one rank
sends per step by op kind (mean over ranks and measured steps; "max" = the busiest rank) as counted by
`mmkit.tools.commstats.CommStats`: all_reduce 2(n-1)/n x size, all_gather (n-1)/n x output,
reduce_scatter (n-1)/n x input, all_to_all (n-1)/n x input, p2p the tensor sent (nccl-tests' bus
bandwidth convention; see that module).

Context-parallel attention, per attention call (one layer, one micro-batch of B sequences) and rank,
forward and backward measured apart (the counter `plan.cp_attn.bytes_sent` read around each forward
call; backward = the step's total minus the forwards), against the volumes the algorithms imply.
S = padded sequence length, p = cp degree = u (Ulysses) x r (ring), e = bytes per element,
d = Hq x D x e (q/out bytes per token), d_kv = Hkv x D x e (k or v bytes per token), per sequence:
- Ulysses forward:  all-to-all of q, k, v in and out back: (2 d + 2 d_kv) x S/p x (u-1)/u
                    = 4 S d / p x (p-1)/p without GQA (u = p); backward: the same (the transposed all-to-alls)
- ring forward:     k, v go r-1 hops: 2 S d_kv / u x (r-1)/r  (= 2 S d (p-1)/p for u = p, no GQA)
- ring backward:    k, v go round again, plus the dk/dv accumulators (fp32) r hops home:
                    2 S d_kv / u x (r-1)/r + 2 S Hkv D x 4 / u
The CommStats all-to-all + p2p bytes are checked against the counter too (the models send nothing
else that way; with pipeline stages, whose activations also travel p2p, only a Ulysses layout's
all-to-alls are compared).

Run: `.venv/bin/python benchmarks/parallel.py [--steps 4] [--which wan|qwen|all] [--out results.json]
[--audit]`. `--audit` also checks that no collective bypassed the counter (slow: timings meaningless).
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

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORKER = HERE / "_parallel_worker.py"

# (name, processes, extra CLI args)
LAYOUTS = [
    ("single", 1, []),
    ("fsdp2", 2, []),
    ("tp2_sp", 2, ["--parallel.tp", "2"]),
    ("cp2_ulysses", 2, ["--parallel.cp", "2", "--parallel.cp_algo", "ulysses"]),
    ("cp2_ring", 2, ["--parallel.cp", "2", "--parallel.cp_algo", "ring"]),
    ("pp2_1f1b", 2, ["--parallel.pp", "2", "--parallel.pp_schedule", "1f1b"]),
    (
        "cp4_hybrid_u2",
        4,
        ["--parallel.cp", "4", "--parallel.cp_algo", "hybrid", "--parallel.ulysses_degree", "2"],
    ),
    ("tp2_fsdp2", 4, ["--parallel.tp", "2", "--parallel.dp_shard", "2"]),
    ("pp2_tp2", 4, ["--parallel.pp", "2", "--parallel.tp", "2"]),
    ("pp2_cp2_ulysses", 4, ["--parallel.pp", "2", "--parallel.cp", "2", "--parallel.cp_algo", "ulysses"]),
]
KIND_COLS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "p2p")


# ---------------------------------------------------------------------------------------------------
# theory
# ---------------------------------------------------------------------------------------------------
def expected_attention_bytes(
    B: int, Hq: int, Hkv: int, L: int, D: int, elt: int, u: int, r: int
) -> tuple[float, float]:
    """(forward, backward) bytes one rank sends in one context-parallel attention call.

    q is (B, Hq, L, D) and k/v (B, Hkv, L, D) per rank (L = S/p local tokens, e = `elt` bytes), over
    u Ulysses ranks x r ring ranks (see the module docstring for the formulas).
    Example: `expected_attention_bytes(1, 2, 2, 40, 32, 4, 2, 1)` -> `(20480.0, 20480.0)`
    (Ulysses p = 2, S = 80, d = 256 B: 4 S d / p x (p-1)/p).
    """
    S = u * r * L
    uly = B * L * D * elt * (2 * Hq + 2 * Hkv) * (u - 1) / u
    ring_kv = 2 * B * S * Hkv * D * elt / u * (r - 1) / r
    ring_acc = 2 * B * S * Hkv * D * 4 / u if r > 1 else 0.0  # fp32 dk/dv accumulators, r hops
    return uly + ring_kv, uly + ring_kv + ring_acc


# ---------------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------------
def prepare(work: Path) -> None:
    """Tiny Wan t2v folder, 8 synthetic 17 x 64 x 64 clips and 32 image Q&A records under `work`."""
    from mmkit.data.synth import synth_shapes, synth_shapes_qa
    from mmkit.models.wan.tiny import create_tiny_wan

    create_tiny_wan(work / "wan", task="t2v", seed=0, vae="random")
    synth_shapes(work / "shapes", videos=8, num_frames=17, height=64, width=64, seed=0, progress=False)
    synth_shapes_qa(work / "qa", images=32, seed=0, progress=False)


def recipe_args(work: Path, steps: int) -> dict[str, list[str]]:
    """CLI arguments of the two recipes (without a layout)."""
    common = [
        "--train.steps", str(steps), "--optim.warmup_steps", "1", "--checkpoint.dir", "none",
        "--logging.log_interval", "1", "--logging.progress_bar", "false", "--logging.peak_tflops", "1",
    ]  # fmt: skip
    return {
        "wan": [
            "--config", str(REPO / "recipes/tiny/wan_t2v.toml"), "--model.init_from", str(work / "wan"),
            "--data.paths", f"[{work / 'shapes' / 'data.txt'}]", "--data.height", "64", "--data.width", "64",
            "--data.num_frames", "17", *common,
        ],
        "qwen": [
            "--config", str(REPO / "recipes/tiny/qwen2_5_vl_sft.toml"),
            "--data.paths", f"[{work / 'qa' / 'qa.json'}]", *common,
        ],
    }  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, runs: list[dict], out: Path, audit: bool, timeout: int = 900) -> None:
    """Run `runs` in one process (nproc 1) or one torchrun launch of `nproc` gloo processes."""
    spec = json.dumps({"runs": runs, "audit": audit})
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), str(out), spec]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(_free_port()), str(WORKER), str(out), spec]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", MMKIT_PG_TIMEOUT_S="300", PYTHONPATH=str(REPO))
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if res.returncode != 0:
        raise RuntimeError(f"{nproc}-process launch failed:\n{res.stdout[-2000:]}\n{res.stderr[-6000:]}")


# ---------------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------------
def summarize(folder: Path, procs: int) -> dict:
    """One layout's numbers from its rank<r>.json files (see the module docstring for the definitions).

    Example: `summarize(Path("out/wan/cp2_ring"), 2)["step_ms"]` -> e.g. `812.4`.
    """
    ranks = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(procs)]
    measured = [[s for s in rk["steps"] if s["step"] > 1] for rk in ranks]  # step 1 is warm-up
    n_steps = len(measured[0])
    step_ms = min(max(rk[i]["step_time_s"] for rk in measured) for i in range(n_steps)) * 1e3
    per_rank = []  # bytes per step by kind, per rank
    for rk in measured:
        tot: dict[str, float] = {}
        for s in rk:
            for k, v in s["comm"]["bytes"].items():
                tot[k] = tot.get(k, 0) + v / n_steps
        per_rank.append(tot)
    kinds = sorted({k for t in per_rank for k in t})
    out = {
        "procs": procs,
        "layout": ranks[0]["layout"],
        "step_ms": step_ms,
        "step_ms_all": [[round(s["step_time_s"] * 1e3, 1) for s in rk] for rk in measured],
        "bytes_per_step": {k: sum(t.get(k, 0) for t in per_rank) / procs for k in kinds},
        "bytes_per_step_per_rank": per_rank,
        "total_per_step": sum(sum(t.values()) for t in per_rank) / procs,
        "total_per_step_max_rank": max((sum(t.values()) for t in per_rank), default=0.0),
        "missed": {k: v for rk in ranks for k, v in rk["missed"].items()},
        "max_rel_diff_vs_single": parity(folder, folder.parent / "single"),
    }
    calls = [c for rk in measured for s in rk for c in s["attn"]]
    if calls:
        fwd = sum(c["fwd"] for c in calls)
        bwd = sum(s["cp_bytes"] - sum(c["fwd"] for c in s["attn"]) for rk in measured for s in rk)
        exp = [expected_attention_bytes(**{k: c[k] for k in ("B", "Hq", "Hkv", "L", "D", "elt", "u", "r")})
               for c in calls]  # fmt: skip
        seqs = sorted({c["u"] * c["r"] * c["L"] for c in calls})
        counter = sum(s["cp_bytes"] for rk in measured for s in rk)
        c0 = calls[0]
        # with pipeline stages p2p also carries the stage activations: compare Ulysses' all-to-alls only
        cp_kinds = (
            ("all_to_all", "p2p") if ranks[0]["layout"]["pp"] == 1 else ("all_to_all",) * (c0["r"] == 1)
        )
        via_stats = sum(s["comm"]["bytes"].get(k, 0) for rk in measured for s in rk for k in cp_kinds)
        out["attention"] = {
            "calls_per_rank": len(calls) / procs,
            "S": seqs,
            "B": c0["B"],
            "Hq": c0["Hq"],
            "Hkv": c0["Hkv"],
            "D": c0["D"],
            "elt": c0["elt"],
            "u": c0["u"],
            "r": c0["r"],
            "fwd_per_call": fwd / len(calls),
            "fwd_expected_per_call": sum(e[0] for e in exp) / len(calls),
            "bwd_per_call": bwd / len(calls),
            "bwd_expected_per_call": sum(e[1] for e in exp) / len(calls),
            "fwd_ratio": fwd / sum(e[0] for e in exp),
            "bwd_ratio": bwd / sum(e[1] for e in exp),
            "counter_vs_commstats": counter / via_stats if via_stats else None,
        }
    return out


def parity(folder: Path, ref: Path) -> float:
    """Largest relative difference of loss and grad norm from the single-process run over all steps
    (the layouts must train the same thing; the layout tests check this to 1e-5).

    Example: `parity(Path("out/wan/tp2_sp"), Path("out/wan/single"))` -> e.g. `3.1e-08`.
    """

    def rows(f: Path) -> list[dict]:
        return [json.loads(line) for line in (f / "metrics.jsonl").read_text().splitlines()]

    worst = 0.0
    for a, b in zip(rows(folder), rows(ref), strict=True):
        for key in ("loss", "grad_norm"):
            worst = max(worst, abs(a[key] - b[key]) / max(abs(b[key]), 1e-12))
    return worst


def _kib(v: float | None) -> str:
    """KiB with one decimal; amounts under 0.1 KiB in bytes (e.g. the loss statistics' all-reduce)."""
    if not v:
        return "-"
    return f"{v / 1024:.1f}" if v >= 102.4 else f"{v:.0f} B"


def print_tables(recipe: str, results: dict) -> None:
    """The layout table and the context-parallel attention table of one recipe."""
    title = {"wan": "Wan2.1 t2v (tiny)", "qwen": "Qwen2.5-VL SFT (tiny)"}[recipe]
    print(f"\n== {title}: per step, bytes sent per rank in KiB (mean over ranks; max = busiest rank)")
    head = f"{'layout':15s} {'procs':>5s} {'mb':>3s} {'step ms':>8s} " + " ".join(
        f"{k:>14s}" for k in KIND_COLS
    )
    print(head + f" {'total':>9s} {'max':>9s} {'vs 1 proc':>9s}")
    for name, r in results.items():
        b = r["bytes_per_step"]
        other = sum(v for k, v in b.items() if k not in KIND_COLS)
        line = f"{name:15s} {r['procs']:5d} {r['layout']['micro_batches']:3d} {r['step_ms']:8.1f} "
        line += " ".join(f"{_kib(b.get(k)):>14s}" for k in KIND_COLS)
        line += f" {_kib(r['total_per_step']):>9s} {_kib(r['total_per_step_max_rank']):>9s}"
        line += f" {r['max_rel_diff_vs_single']:9.1e}" if r["procs"] > 1 else f" {'-':>9s}"
        print(line + (f"  (+{_kib(other)} other)" if other else ""))
        if r["missed"]:
            print(f"{'':15s} NOT COUNTED (audit): {r['missed']}")
    cp = {n: r["attention"] for n, r in results.items() if "attention" in r}
    if not cp:
        return
    a0 = next(iter(cp.values()))
    d, dkv = a0["Hq"] * a0["D"] * a0["elt"], a0["Hkv"] * a0["D"] * a0["elt"]
    S = a0["S"]
    s_txt = str(S[0]) if len(S) == 1 else f"{S[0]}..{S[-1]} (packed rows, per call)"
    print(
        f"-- context-parallel attention, bytes per call (= 1 layer x 1 micro-batch of B={a0['B']}) per rank: "
        f"S = {s_txt}, d = Hq {a0['Hq']} x D {a0['D']} x {a0['elt']} B = {d} B, d_kv = {dkv} B"
    )
    print(
        f"{'layout':15s} {'u x r':>6s} {'calls':>6s} {'fwd':>10s} {'expected':>10s} {'ratio':>6s} "
        f"{'bwd':>10s} {'expected':>10s} {'ratio':>6s} {'counter/commstats':>18s}"
    )
    for name, a in cp.items():
        cmp = "-" if a["counter_vs_commstats"] is None else f"{a['counter_vs_commstats']:.3f}"
        print(
            f"{name:15s} {a['u']:>2d} x {a['r']:<2d} {a['calls_per_rank']:6.0f} {a['fwd_per_call']:10.0f} "
            f"{a['fwd_expected_per_call']:10.0f} {a['fwd_ratio']:6.3f} {a['bwd_per_call']:10.0f} "
            f"{a['bwd_expected_per_call']:10.0f} {a['bwd_ratio']:6.3f} {cmp:>18s}"
        )
    print(
        "   expected per sequence: Ulysses fwd = bwd = (2 d + 2 d_kv) S/p (u-1)/u "
        "[= 4 S d/p (p-1)/p without GQA];\n   ring fwd = 2 S d_kv/u (r-1)/r [= 2 S d (p-1)/p]; "
        "ring bwd = ring fwd + 2 S Hkv D x 4 B / u (the fp32 dk/dv accumulators)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per layout (the first is warm-up)")
    ap.add_argument("--which", choices=("wan", "qwen", "all"), default="all")
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    ap.add_argument(
        "--audit", action="store_true", help="check that no collective bypassed the counter (slow)"
    )
    ap.add_argument("--workdir", type=Path, default=None, help="keep data and per-rank records here")
    args = ap.parse_args()
    if args.steps < 2:
        ap.error(f"--steps={args.steps}: need >= 2 (the first step is warm-up)")
    from tqdm.auto import tqdm

    recipes = ["wan", "qwen"] if args.which == "all" else [args.which]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        prepare(work)
        base = recipe_args(work, args.steps)
        launches: dict[int, list[dict]] = {}
        for recipe in recipes:
            for name, procs, extra in LAYOUTS:
                launches.setdefault(procs, []).append(
                    {"name": f"{recipe}/{name}", "args": [*base[recipe], *extra]}
                )
        for procs in tqdm(sorted(launches), desc="launches", unit="launch"):
            launch(procs, launches[procs], work / "out", args.audit)
        results: dict[str, dict] = {}
        for recipe in recipes:
            results[recipe] = {
                name: summarize(work / "out" / recipe / name, procs) for name, procs, _ in LAYOUTS
            }
        wall = time.perf_counter() - t0
    import torch

    print(
        f"parallel layouts on CPU (gloo, {os.cpu_count()} cores, 1 thread per process, "
        f"torch {torch.__version__}); {args.steps} steps per layout, step 1 not measured; "
        "mb = micro-batches per step per rank"
        + ("; AUDIT MODE: step times include the audit's per-op overhead" if args.audit else "")
    )
    for recipe in recipes:
        print_tables(recipe, results[recipe])
    if args.audit and not any(r["missed"] for res in results.values() for r in res.values()):
        print("\naudit: every c10d / functional-collective op ran inside a counted call")
    print(f"\n(wall time {wall:.0f} s)")
    if args.out:
        args.out.write_text(
            json.dumps({"steps": args.steps, "audit": args.audit, "results": results}, indent=1)
        )
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
