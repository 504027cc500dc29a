"""Every parallel layout reproduces the single-process run, for the tiny Wan t2v and tiny Qwen2.5-VL SFT
recipes (same global batch and seed): the loss (relative 1e-5) and gradient norm at each of 4 steps, and per
tensor (`layout_helpers.compare`: error relative to the tensor's own scale) every parameter's gradient as
the optimizer sees it at step 1, the AdamW moments and the weights after step 4.

Each layout also proves it was applied (a plan that silently left modules replicated, or ignored tp, cp or
activation checkpointing, would reproduce one process exactly): every parameter's DTensor placement over
tp is the split `mmkit.checkpoint.layouts.tp_dim` names, FSDP2 shards every parameter, the first block sees
S / (cp x tp with sequence parallelism) tokens per rank, the collectives each dimension needs carry bytes
in step 1 (`CommStats`), and checkpointed blocks run forward twice per micro-batch (selective AC: its lean
path in every block).

Each torchrun launch (gloo, 2 or 4 processes, a subprocess timeout so a hang fails fast) trains several
layouts one after another (`_layout_worker.py`); the single-process references run in this process.
Also covered: save under fsdp2 then resume under tp2, save under pp2 then resume under fsdp2 (the curve
continues), a sequence that does not divide by the context-parallel degree, OpenSoraPlan batches of clips
of different sizes (padded latents masked) and Skiparse under cp 3 (not a divisor of k = 4), and a VLM
step where only one data-parallel rank has an image (every rank must issue the same collectives, or the step hangs).
"""

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from layout_helpers import Recorder, compare, load_ranks, merged

from mmkit.checkpoint.dcp import export_model_state, find_latest
from mmkit.checkpoint.layouts import tp_dim
from mmkit.config import parse_cli
from mmkit.parallel.dims import padded_len
from mmkit.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_layout_worker.py")
STEPS = 4
RTOL = 1e-5
# (gradients, AdamW moments, weights): per tensor, max |error| / max |reference|, ~3x the worst fp32
# reduction-order noise measured over these layouts (`pytest -s` prints it per layout). Wan: 7e-4 / 1.7e-4 /
# 9e-4, all from the tiny cross-attention gradients (|g| ~1e-4 next to ~1 elsewhere), worst under cp4 hybrid;
# Qwen: 1.1e-6 / 2.1e-5 / 7.3e-4. Weights after 4 AdamW steps carry Adam's g / sqrt(v) amplification of that
# noise. A wrong reduction (a gradient x2 or x0.5, a missing sum) is an error of order 1. OpenSoraPlan (its
# structurally zero gradients left out, `ZERO_GRAD`): 9.9e-7 / 1.2e-6 / 1.3e-5 over its layouts.
TOLS = {"wan": (2e-3, 5e-4, 2e-3), "qwen2_5_vl": (1e-5, 6e-5, 2e-3), "opensoraplan": (1e-5, 1e-5, 1e-4)}
DITS = ("wan", "opensoraplan")
# Parameters whose gradient is zero in exact arithmetic, so every layout holds only float noise there (and
# AdamW turns that noise into updates of size lr): OpenSoraPlan's cross-attention key bias adds q.b to every
# score of a row (no norm after k), which the softmax cancels. Checked to be noise, left out of the per-tensor
# comparisons.
ZERO_GRAD = {"opensoraplan": r"blocks\.\d+\.cross\.k\.bias"}


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _single(args: list[str], out: Path) -> dict:
    """The single-process reference run (no WORLD_SIZE in the environment): its `Recorder` state (gradients
    of every step) plus "metrics"."""
    env = {k: os.environ.pop(k) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK") if k in os.environ}
    try:
        cfg = parse_cli([*args, "--checkpoint.dir", str(out), "--logging.metrics_file", str(out / "m.jsonl")])
        trainer = Trainer(cfg)
        rec = Recorder(trainer, all_steps=True)
        rec.fit()
        trainer.close()
    finally:
        os.environ.update(env)
    rec.save(out / "rank0.pt")  # for a look after a failure (`layout_helpers.load_ranks(out)`)
    return {**rec.state(), "metrics": _metrics(out / "m.jsonl")}


def _free_port() -> int:
    """A TCP port nobody listens on now (fixed ports collide when test runs share a machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(nproc: int, base: list[str], layouts: list[dict], out: Path) -> None:
    spec = json.dumps({"base": base, "layouts": layouts})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(_free_port()), str(WORKER), str(out), spec]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MMKIT_PG_TIMEOUT_S": "120", "PYTHONPATH": str(REPO)}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-6000:]


def _assert_same(ref: list[dict], got: list[dict], name: str, steps=None) -> None:
    got_by_step = {r["step"]: r for r in got}
    assert got, name
    for r in ref:
        if steps is not None and r["step"] not in steps:
            continue
        g = got_by_step[r["step"]]
        for key in ("loss", "grad_norm"):
            assert g[key] == pytest.approx(r[key], rel=RTOL, abs=1e-7), (name, r["step"], key, r[key], g[key])


def _common(steps: int = STEPS) -> list[str]:
    return [
        "--train.steps", str(steps), "--optim.warmup_steps", "1", "--checkpoint.interval", "0",
        "--logging.log_interval", "1", "--logging.progress_bar", "false",
    ]  # fmt: skip


def _opt(args: list[str], key: str, default):
    """The last value of `--key` in a CLI list (later flags win, as in parse_cli)."""
    vals = [args[i + 1] for i, a in enumerate(args[:-1]) if a == f"--{key}"]
    return type(default)(vals[-1]) if vals else default


def _assert_applied(
    ref: dict, states: list[dict], args: list[str], nproc: int, family: str, name: str
) -> None:
    """The evidence that the layout in `args` was applied (see the module docstring)."""
    tp, cp, pp = _opt(args, "parallel.tp", 1), _opt(args, "parallel.cp", 1), _opt(args, "parallel.pp", 1)
    sp = tp > 1 and _opt(args, "parallel.sequence_parallel", "true") == "true"
    algo, ac = _opt(args, "parallel.cp_algo", "ulysses"), _opt(args, "model.activation_checkpointing", "none")
    dp = nproc // (tp * cp * pp)
    fsdp = dp * cp > 1  # FSDP2 shards over dp_shard_cp
    # shards: every parameter split by tp exactly as the convert rules say, and sharded by FSDP2
    for r, st in enumerate(states):
        for n, pl in st["placements"].items():
            want = tp_dim(family, n) if tp > 1 else None
            got = None
            if "tp" in pl["mesh"]:
                p = pl["placements"][pl["mesh"].index("tp")]
                got = int(p[2:-1]) if p.startswith("S(") else None
            assert got == want, f"{name} rank {r}: {n} split over tp on dim {got}, layouts.tp_dim says {want}"
            if fsdp:
                dp_dims = [pl["placements"][i] for i, m in enumerate(pl["mesh"]) if m.startswith("dp")]
                # Shard(0), or _StridedShard(0) "_S(0, tp)" over a tensor tp already split on dim 0
                assert any(p in ("S(0)", f"_S(0, {tp})") for p in dp_dims), (
                    f"{name} rank {r}: {n} not FSDP2-sharded ({pl})"
                )
            elif want is not None:  # tp only: the local piece is this rank's share of the tensor
                g = list(pl["global"])
                g[want] = -(-g[want] // tp)
                assert pl["local"] == tuple(g), (
                    f"{name} rank {r}: {n} local {pl['local']}, global {pl['global']}"
                )
    if tp > 1:
        q = "blocks.0.attn.q.weight" if family in DITS else "language.layers.0.attn.q_proj.weight"
        shapes = {st["placements"][q]["local"] for st in states if q in st["placements"]}
        glob = ref["placements"][q]["global"]
        assert shapes == {(glob[0] // tp, glob[1])} or fsdp, (name, q, shapes)
    # tokens per rank entering the first block (the first micro-batch; pp: the first stage's ranks)
    seen = {st["seq_len"] for st in states if st["seq_len"] is not None}
    shards = cp * (tp if sp else 1)
    if pp == 1 and (family in DITS or dp == 1):  # the first micro-batch is the reference's
        pad_to = shards  # opensoraplan under cp: each cp rank holds whole k^2 = 16-token Skiparse blocks
        if family == "opensoraplan" and cp > 1:
            pad_to = math.lcm(shards, 16 * cp)
        want = padded_len(ref["seq_len"], pad_to) // shards
        assert seen == {want}, (
            f"{name}: the first block sees {seen} tokens per rank, want {want} of {ref['seq_len']}"
        )
    elif pp == 1 and shards > 1:
        assert max(seen) < ref["seq_len"], (name, seen, ref["seq_len"])
    # collectives each dimension needs, with bytes in step 1 (pp: on the ranks that run the stages)
    comm = {k for st in states for k, v in st["comm"].items() if v > 0}
    need = set()
    if fsdp:
        need |= {"all_gather", "reduce_scatter"}
    if tp > 1:
        need |= {"all_reduce"} | ({"all_gather", "reduce_scatter"} if sp else set())
    if cp > 1:
        need |= {"ulysses": {"all_to_all"}, "ring": {"p2p"}, "hybrid": {"all_to_all", "p2p"}}[algo]
    if pp > 1:
        need |= {"p2p"}
    assert need <= comm, f"{name}: no bytes through {sorted(need - comm)} in step 1 (saw {sorted(comm)})"
    if pp == 1:  # activation checkpointing: forward runs per micro-batch, +1 for a recomputed block
        every = 1 if ac == "full" else _opt(args, "model.ac_every_k", 1)
        for st in states:
            m = st["micro_steps"]
            want = [m * (2 if ac != "none" and i % every == 0 else 1) for i in range(len(st["block_calls"]))]
            assert st["block_calls"] == want, (
                f"{name}: forward calls per block {st['block_calls']}, want {want}"
            )
            if family == "wan":  # selective AC: every block on its lean path
                lean = [c if ac == "selective" else 0 for c in want]
                assert st["lean_calls"] == lean, f"{name}: lean-path calls {st['lean_calls']}, want {lean}"


def check_layout(ref: dict, out: Path, lay: dict, nproc: int, family: str, steps=None) -> str:
    """Loss curve, per-tensor gradients / moments / weights and the applied-layout evidence of one layout
    against its single-process reference; returns the measured errors (printed with `pytest -s`)."""
    name = lay["name"]
    _assert_same(ref["metrics"], _metrics(out / name / "metrics.jsonl"), name, steps)
    states = load_ranks(out / name)
    first = states[0]["first_step"]
    assert first == (min(steps) if steps else 1), (name, first)
    tg, tm, tw = TOLS[family]
    grads = merged(states, "grads", first)
    keep = set(ref["grads"][first])
    if family in ZERO_GRAD:
        zero = {n for n in keep if re.fullmatch(ZERO_GRAD[family], n)}
        scale = max(float(t.abs().max()) for t in ref["grads"][first].values())
        for n in zero:
            assert (
                max(float(ref["grads"][first][n].abs().max()), float(grads[n].abs().max())) < 1e-5 * scale
            ), n
        keep -= zero
    g = compare(ref["grads"][first], grads, tg, f"{name}: grads at step {first}", keep)
    m = compare(ref["moments"], merged(states, "moments"), tm, f"{name}: AdamW moments", keep)
    w = compare(ref["weights"], merged(states, "weights"), tw, f"{name}: weights", keep)
    if steps is None:  # a resumed run's own layout is checked where it ran from the start
        _assert_applied(ref, states, lay["args"], nproc, family, name)
    msg = f"{name}: grad {g:.1e} moments {m:.1e} weights {w:.1e}"
    print(msg)
    return msg


# ---------------------------------------------------------------------------------------------------
# Wan2.1 t2v
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wan4(wan_train_root, tmp_path_factory):
    """The tiny Wan folder with a 4-layer DiT (pp2 x virtual 2 needs 4 stages of >= 1 layer)."""
    from diffusers import WanTransformer3DModel

    out = tmp_path_factory.mktemp("wan4") / "wan"
    shutil.copytree(wan_train_root / "wan", out)
    cfg = json.loads((out / "transformer" / "config.json").read_text())
    cfg["num_layers"] = 4
    torch.manual_seed(3)
    model = WanTransformer3DModel.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():  # off the zero / one init, so parity can fail
            p.add_(0.05 * torch.randn_like(p))
    shutil.rmtree(out / "transformer")
    model.save_pretrained(out / "transformer")
    return out


def _wan_base(root: Path, wan_dir: Path) -> list[str]:
    return [
        "--config", str(REPO / "recipes/tiny/wan_t2v.toml"), "--model.init_from", str(wan_dir),
        "--data.paths", f"[{root / 'shapes' / 'data.txt'}]", *_common(),
    ]  # fmt: skip


def test_wan_layouts_two_processes(wan_train_root, wan4, tmp_path):
    from mmkit.models.wan.tiny import create_tiny_wan

    root = wan_train_root
    base = _wan_base(root, root / "wan")
    i2v = [
        "--model.task",
        "i2v",
        "--model.init_from",
        str(create_tiny_wan(tmp_path / "i2v", "i2v", vae="random")),
    ]
    ref_i2v = _single([*base, *i2v], tmp_path / "ref_i2v")
    big = ["--data.height", "48", "--data.width", "48"]  # 3 x 3 x 3 = 27 tokens: cp 2 does not divide
    ref = _single(base, tmp_path / "ref")
    ref4 = _single([*_wan_base(root, wan4), "--train.micro_batch", "1"], tmp_path / "ref4")
    ref_big = _single([*base, *big], tmp_path / "ref_big")
    resume_dir = str(tmp_path / "out" / "fsdp2")
    layouts = [
        {"name": "fsdp2", "args": ["--checkpoint.interval", "2"]},
        # save under fsdp2 at step 2, then resume from that checkpoint under tp2 to step 4
        {"name": "resume_b", "args": ["--parallel.tp", "2", "--checkpoint.resume", f"{resume_dir}/step_2"]},
        {"name": "tp2", "args": ["--parallel.tp", "2"]},
        {"name": "tp2_no_sp", "args": ["--parallel.tp", "2", "--parallel.sequence_parallel", "false"]},
        {"name": "cp2_ulysses", "args": ["--parallel.cp", "2", "--parallel.cp_algo", "ulysses"]},
        {"name": "cp2_ring", "args": ["--parallel.cp", "2", "--parallel.cp_algo", "ring"]},
        # selective AC: block 0 recomputed whole, every block keeping only its cheap-to-recompute inputs
        # (WanBlock.recompute_hidden) on FSDP2's gathered weights
        {"name": "fsdp2_selective_ac", "args": ["--model.activation_checkpointing", "selective",
                                                "--model.ac_every_k", "2"]},
        {"name": "tp2_full_ac", "args": ["--parallel.tp", "2", "--model.activation_checkpointing", "full"]},
        # the lean block path on tensor-parallel shards (partial gradients summed by DTensor / finalize_grads)
        {"name": "tp2_selective_ac", "args": ["--parallel.tp", "2", "--model.activation_checkpointing",
                                              "selective", "--model.ac_every_k", "2"]},
        {"name": "tp2_no_sp_selective_ac", "args": ["--parallel.tp", "2", "--parallel.sequence_parallel",
                                                    "false", "--model.activation_checkpointing", "selective"]},
        {"name": "cp2_ring_27_tokens", "args": ["--parallel.cp", "2", "--parallel.cp_algo", "ring", *big]},
        {"name": "i2v_tp2", "args": [*i2v, "--parallel.tp", "2"]},  # + image K/V and its head-sharded norm
        {"name": "pp2_1f1b", "args": ["--parallel.pp", "2", "--parallel.pp_schedule", "1f1b",
                                      "--checkpoint.interval", "2"]},
        # the pipeline's step-2 checkpoint (each rank saved its stages) resumed under fsdp2
        {"name": "pp_to_fsdp2", "args": ["--checkpoint.resume", str(tmp_path / "out" / "pp2_1f1b" / "step_2")]},
        {"name": "pp2_v2_interleaved", "args": [
            "--model.init_from", str(wan4), "--train.micro_batch", "1", "--parallel.pp", "2",
            "--parallel.pp_schedule", "interleaved_1f1b", "--parallel.pp_layers", "[[1,1],[1,1]]"]},
    ]  # fmt: skip
    _launch(2, base, layouts, tmp_path / "out")
    out = tmp_path / "out"
    refs = {"cp2_ring_27_tokens": ref_big, "i2v_tp2": ref_i2v, "pp2_v2_interleaved": ref4}
    resumed = {"resume_b": {3, 4}, "pp_to_fsdp2": {3, 4}}  # continued after the other layout's checkpoint
    for lay in layouts:
        check_layout(refs.get(lay["name"], ref), out, lay, 2, "wan", resumed.get(lay["name"]))
    assert ref["metrics"][-1]["loss"] < ref["metrics"][0]["loss"]  # the reference trains
    state = export_model_state(find_latest(out / "fsdp2"))  # the sharded checkpoint reads back whole
    assert state["blocks.0.attn.q.weight"].shape == (64, 64)
    assert all(torch.isfinite(t).all() for t in state.values())


def test_wan_layouts_four_processes(wan_train_root, tmp_path):
    base = _wan_base(wan_train_root, wan_train_root / "wan")
    ref = _single(base, tmp_path / "ref")
    layouts = [
        {"name": "cp4_hybrid", "args": ["--parallel.cp", "4", "--parallel.cp_algo", "hybrid",
                                        "--parallel.ulysses_degree", "2"]},
        {"name": "tp2_fsdp2", "args": ["--parallel.tp", "2", "--parallel.dp_shard", "2"]},
        {"name": "tp2_fsdp2_selective_ac", "args": ["--parallel.tp", "2", "--parallel.dp_shard", "2",
                                                    "--model.activation_checkpointing", "selective"]},
        {"name": "hsdp_2x2", "args": ["--parallel.dp_replicate", "2", "--parallel.dp_shard", "2",
                                      "--train.micro_batch", "1"]},
        {"name": "cp2_ring_window_fsdp2", "args": ["--parallel.cp", "2", "--parallel.cp_algo", "ring",
                                                   "--parallel.dp_shard", "2", "--parallel.ring_window", "1"]},
        # pipeline stages running tensor / context parallel inside (the plan's pieces per stage)
        {"name": "pp2_tp2", "args": ["--parallel.pp", "2", "--parallel.tp", "2"]},
        {"name": "pp2_cp2_ulysses", "args": ["--parallel.pp", "2", "--parallel.cp", "2"]},
    ]  # fmt: skip
    _launch(4, base, layouts, tmp_path / "out")
    for lay in layouts:
        check_layout(ref, tmp_path / "out", lay, 4, "wan")


# ---------------------------------------------------------------------------------------------------
# Qwen2.5-VL SFT
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen_root(tmp_path_factory):
    """Synthetic Q&A (64 images), a 4-layer tiny Qwen folder, and an 8-sample set with one image only."""
    from mmkit.data.synth import synth_shapes_qa
    from mmkit.models.qwen2_5_vl.tiny import create_tiny_qwen2_5_vl, tiny_config

    root = tmp_path_factory.mktemp("qwen_layouts")
    synth_shapes_qa(root / "qa", images=64, seed=0)
    create_tiny_qwen2_5_vl(root / "q4", seed=0, cfg=tiny_config(num_hidden_layers=4))
    tied = tiny_config(num_hidden_layers=4)
    tied.tie_word_embeddings = True  # as Qwen2.5-VL-3B: the LM head is the embedding matrix
    create_tiny_qwen2_5_vl(root / "q4_tied", seed=0, cfg=tied)
    items = json.loads((root / "qa" / "qa.json").read_text())
    one = [items[0]] + [
        {"messages": [{"role": "user", "content": f"Say the number {i}."},
                      {"role": "assistant", "content": f"{i} {i + 1} {i + 2}"}]}
        for i in range(7)
    ]  # fmt: skip
    (root / "qa" / "one_image.json").write_text(json.dumps(one))
    return root


def _qwen_base(root: Path, data: str = "qa.json") -> list[str]:
    return [
        "--config", str(REPO / "recipes/tiny/qwen2_5_vl_sft.toml"), "--data.paths", f"[{root / 'qa' / data}]",
        *_common(),
    ]  # fmt: skip


def test_qwen_layouts_two_processes(qwen_root, tmp_path):
    base = _qwen_base(qwen_root)
    q4 = ["--model.init_from", str(qwen_root / "q4"), "--train.micro_batch", "2"]
    one = ["--data.paths", f"[{qwen_root / 'qa' / 'one_image.json'}]", "--train.steps", "2"]
    ref = _single(base, tmp_path / "ref")
    ref4 = _single([*base, *q4], tmp_path / "ref4")
    ref_one = _single([*base, *one], tmp_path / "ref_one")
    layouts = [
        {"name": "fsdp2", "args": []},
        {"name": "tp2", "args": ["--parallel.tp", "2"]},
        {"name": "tp2_no_sp", "args": ["--parallel.tp", "2", "--parallel.sequence_parallel", "false"]},
        {"name": "cp2_ulysses", "args": ["--parallel.cp", "2", "--parallel.cp_algo", "ulysses"]},
        {"name": "cp2_ring", "args": ["--parallel.cp", "2", "--parallel.cp_algo", "ring"]},
        {"name": "pp2_1f1b", "args": [*q4, "--parallel.pp", "2", "--parallel.pp_schedule", "1f1b"]},
        {"name": "pp2_v2_interleaved", "args": [*q4, "--parallel.pp", "2", "--parallel.pp_schedule",
                                                "interleaved_1f1b", "--parallel.pp_layers", "[[1,1],[1,1]]"]},
        # global batch 8 = the whole set: one data-parallel rank has the image, the other none
        {"name": "one_image_fsdp2", "args": [*one, "--train.global_batch", "8", "--train.micro_batch", "4"]},
    ]  # fmt: skip
    _launch(2, base, layouts, tmp_path / "out")
    for lay in layouts:
        want = ref4 if lay["name"].startswith("pp") else ref_one if lay["name"] == "one_image_fsdp2" else ref
        check_layout(want, tmp_path / "out", lay, 2, "qwen2_5_vl")
    assert ref["metrics"][-1]["loss"] < ref["metrics"][0]["loss"]


def test_qwen_layouts_four_processes(qwen_root, tmp_path):
    base = _qwen_base(qwen_root)
    q4 = ["--model.init_from", str(qwen_root / "q4"), "--train.micro_batch", "2"]
    ref = _single(base, tmp_path / "ref")
    ref4 = _single([*base, *q4], tmp_path / "ref4")
    tied = ["--model.init_from", str(qwen_root / "q4_tied"), "--train.micro_batch", "2"]
    ref_tied = _single([*base, *tied], tmp_path / "ref_tied")
    layouts = [
        {"name": "cp4_hybrid", "args": ["--parallel.cp", "4", "--parallel.cp_algo", "hybrid",
                                        "--parallel.ulysses_degree", "2"]},
        {"name": "tp2_fsdp2", "args": ["--parallel.tp", "2", "--parallel.dp_shard", "2"]},
        {"name": "cp2_ring_window_tp2", "args": ["--parallel.cp", "2", "--parallel.cp_algo", "ring",
                                                 "--parallel.tp", "2", "--parallel.ring_window", "1"]},
        # pipeline stages with tensor / context parallel inside; pp4: the tied embedding's gradient is
        # summed over the first and last stage only (their own group; the middle ranks hold no copy)
        {"name": "pp2_tp2", "args": [*q4, "--parallel.pp", "2", "--parallel.tp", "2"]},
        {"name": "pp2_cp2_ring", "args": [*q4, "--parallel.pp", "2", "--parallel.cp", "2",
                                          "--parallel.cp_algo", "ring"]},
        {"name": "pp4_tied", "args": [*tied, "--parallel.pp", "4"]},
    ]  # fmt: skip
    _launch(4, base, layouts, tmp_path / "out")
    for lay in layouts:
        want = ref_tied if lay["name"] == "pp4_tied" else ref4 if lay["name"].startswith("pp") else ref
        check_layout(want, tmp_path / "out", lay, 4, "qwen2_5_vl")


# ---------------------------------------------------------------------------------------------------
# OpenSoraPlan 1.3 t2v / i2v (Skiparse layers 2 and 3 of 4)
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def osp_root(tmp_path_factory):
    """Tiny release-layout DiTs (t2v, i2v) and precomputed features: 3 x 3 x 5 = 45 tokens per clip (odd:
    cp 2 and 4 do not divide it; not a multiple of Skiparse's k^2 = 16)."""
    from osp_helpers import write_features, write_tiny_dit

    root = tmp_path_factory.mktemp("osp_layouts")
    write_tiny_dit(root / "t2v", "tiny", seed=1)
    write_tiny_dit(root / "i2v", "tiny-i2v", seed=2)
    write_features(root / "feat_t2v", "t2v", seed=3)
    write_features(root / "feat_i2v", "i2v", seed=4)
    # clips of different sizes: every batch of two pads to (3, 6, 10) (pipeline stages need one shape per
    # step) with zeros along T, H or W in one of its clips
    full = (3, 6, 10)
    sizes = [full, (2, 6, 10), full, (3, 4, 10), full, (3, 6, 8), full, full]
    write_features(root / "feat_padded", "t2v", seed=5, sizes=sizes)
    return root


def _osp_base(root: Path, task: str = "t2v") -> list[str]:
    return [
        "--config", str(REPO / f"recipes/tiny/opensoraplan13_{task}.toml"), "--model.init_from", str(root / task),
        "--data.precomputed_dir", str(root / f"feat_{task}"), "--train.timestep_strata", "2", *_common(),
    ]  # fmt: skip


def test_opensoraplan_layouts_two_processes(osp_root, tmp_path):
    base = _osp_base(osp_root)
    i2v = ["--model.task", "i2v", "--model.flavor", "tiny-i2v", "--model.init_from", str(osp_root / "i2v"),
           "--data.precomputed_dir", str(osp_root / "feat_i2v"), "--data.mask_type_ratios", "[1,8,8,2,0,1]"]  # fmt: skip
    ref = _single(base, tmp_path / "ref")
    ref_mb1 = _single([*base, "--train.micro_batch", "1"], tmp_path / "ref_mb1")
    ref_i2v = _single([*base, *i2v], tmp_path / "ref_i2v")
    padded = ["--data.precomputed_dir", str(osp_root / "feat_padded")]
    ref_padded = _single([*base, *padded], tmp_path / "ref_padded")
    layouts = [
        {"name": "fsdp2", "args": []},
        {"name": "tp2", "args": ["--parallel.tp", "2"]},
        {"name": "cp2_ulysses", "args": ["--parallel.cp", "2", "--parallel.cp_algo", "ulysses"]},
        {"name": "cp2_ring", "args": ["--parallel.cp", "2", "--parallel.cp_algo", "ring"]},
        # 1F1B with stage 0 holding one layer, stage 1 three (MindSpeed keeps stage 0 light for the encoders)
        {"name": "pp2_1f1b_1_3", "args": ["--parallel.pp", "2", "--parallel.pp_schedule", "1f1b",
                                          "--parallel.pp_layers", "[1,3]"]},
        {"name": "pp2_v2_interleaved", "args": [
            "--train.micro_batch", "1", "--parallel.pp", "2", "--parallel.pp_schedule", "interleaved_1f1b",
            "--parallel.pp_layers", "[[1,1],[1,1]]"]},
        {"name": "i2v_fsdp2", "args": i2v},
        {"name": "i2v_cp2_ulysses", "args": [*i2v, "--parallel.cp", "2"]},
        # batches of clips of different sizes: the video mask as a key bias / key mask, the loss masked
        {"name": "padded_tp2", "args": [*padded, "--parallel.tp", "2"]},
        {"name": "padded_cp2_ulysses", "args": [*padded, "--parallel.cp", "2", "--parallel.cp_algo", "ulysses"]},
        {"name": "padded_cp2_ring", "args": [*padded, "--parallel.cp", "2", "--parallel.cp_algo", "ring"]},
        {"name": "padded_pp2_1f1b", "args": [*padded, "--parallel.pp", "2", "--parallel.pp_layers", "[1,3]"]},
    ]  # fmt: skip
    _launch(2, base, layouts, tmp_path / "out")
    refs = {"pp2_v2_interleaved": ref_mb1, "i2v_fsdp2": ref_i2v, "i2v_cp2_ulysses": ref_i2v}
    refs.update({lay["name"]: ref_padded for lay in layouts if lay["name"].startswith("padded")})
    for lay in layouts:
        check_layout(refs.get(lay["name"], ref), tmp_path / "out", lay, 2, "opensoraplan")
    losses = [r["loss"] for r in ref["metrics"]]
    assert all(math.isfinite(v) for v in losses) and len(losses) == STEPS


def test_opensoraplan_layouts_four_processes(osp_root, tmp_path):
    base = _osp_base(osp_root)
    ref = _single(base, tmp_path / "ref")
    layouts = [
        {"name": "cp4_hybrid", "args": ["--parallel.cp", "4", "--parallel.cp_algo", "hybrid",
                                        "--parallel.ulysses_degree", "2"]},
        {"name": "cp2_ring_window_tp2", "args": ["--parallel.cp", "2", "--parallel.cp_algo", "ring",
                                                 "--parallel.tp", "2", "--parallel.ring_window", "1"]},
        # pipeline stages running the plan's pieces: Skiparse under cp inside each stage
        {"name": "pp2_cp2_ulysses", "args": ["--parallel.pp", "2", "--parallel.cp", "2"]},
    ]  # fmt: skip
    _launch(4, base, layouts, tmp_path / "out")
    for lay in layouts:
        check_layout(ref, tmp_path / "out", lay, 4, "opensoraplan")


def test_opensoraplan_cp3_three_processes(osp_root, tmp_path):
    """cp = 3 does not divide Skiparse's k = 4: the groups stay whole on every rank and the heads split
    3 ways (a 3-head DiT), on batches with padded clips (the dense layers' key mask under the ring)."""
    from osp_helpers import write_tiny_dit

    write_tiny_dit(tmp_path / "dit3", "tiny", seed=6, num_attention_heads=3, attention_head_dim=12,
                   cross_attention_dim=36)  # fmt: skip
    base = [*_osp_base(osp_root), "--model.init_from", str(tmp_path / "dit3"),
            "--data.precomputed_dir", str(osp_root / "feat_padded")]  # fmt: skip
    ref = _single(base, tmp_path / "ref")
    layouts = [
        {"name": "padded_cp3_ulysses", "args": ["--parallel.cp", "3", "--parallel.cp_algo", "ulysses"]},
        {"name": "padded_cp3_ring", "args": ["--parallel.cp", "3", "--parallel.cp_algo", "ring"]},
    ]  # fmt: skip
    _launch(3, base, layouts, tmp_path / "out")
    for lay in layouts:
        check_layout(ref, tmp_path / "out", lay, 3, "opensoraplan")
