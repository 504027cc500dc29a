"""Every parallel layout reproduces the single-process run: same loss (relative 1e-5) and gradient norm
at each of 4 steps, same global batch and seed, for the tiny Wan t2v and tiny Qwen2.5-VL SFT recipes.

Each torchrun launch (gloo, 2 or 4 processes, a subprocess timeout so a hang fails fast) trains several
layouts one after another (`_layout_worker.py`); the single-process references run in this process.
Also covered: save under fsdp2 then resume under tp2, save under pp2 then resume under fsdp2 (the curve
continues), a sequence that does not divide by the context-parallel degree, and a VLM step where only
one data-parallel rank has an image (every rank must issue the same collectives, or the step hangs).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmkit.checkpoint.dcp import export_model_state, find_latest
from mmkit.config import parse_cli
from mmkit.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_layout_worker.py")
STEPS = 4
RTOL = 1e-5


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _single(args: list[str], out: Path) -> list[dict]:
    """The single-process reference run (no WORLD_SIZE in the environment)."""
    env = {k: os.environ.pop(k) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK") if k in os.environ}
    try:
        cfg = parse_cli([*args, "--checkpoint.dir", str(out), "--logging.metrics_file", str(out / "m.jsonl")])
        trainer = Trainer(cfg)
        trainer.fit()
        trainer.close()
    finally:
        os.environ.update(env)
    return _metrics(out / "m.jsonl")


def _launch(nproc: int, port: int, base: list[str], layouts: list[dict], out: Path) -> None:
    spec = json.dumps({"base": base, "layouts": layouts})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(port), str(WORKER), str(out), spec]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MMKIT_PG_TIMEOUT_S": "120", "PYTHONPATH": str(REPO)}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-6000:]


def _assert_same(ref: list[dict], got: list[dict], name: str, steps=None) -> None:
    got_by_step = {r["step"]: r for r in got}
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
    _launch(2, 29761, base, layouts, tmp_path / "out")
    out = tmp_path / "out"
    for name in (
        "fsdp2",
        "tp2",
        "tp2_no_sp",
        "cp2_ulysses",
        "cp2_ring",
        "fsdp2_selective_ac",
        "tp2_full_ac",
        "tp2_selective_ac",
        "tp2_no_sp_selective_ac",
        "pp2_1f1b",
    ):
        _assert_same(ref, _metrics(out / name / "metrics.jsonl"), name)
    _assert_same(ref_big, _metrics(out / "cp2_ring_27_tokens" / "metrics.jsonl"), "cp2_ring_27_tokens")
    _assert_same(ref_i2v, _metrics(out / "i2v_tp2" / "metrics.jsonl"), "i2v_tp2")
    _assert_same(ref4, _metrics(out / "pp2_v2_interleaved" / "metrics.jsonl"), "pp2_v2_interleaved")
    for name, what in (("resume_b", "fsdp2 -> tp2 resume"), ("pp_to_fsdp2", "pp2 -> fsdp2 resume")):
        resumed = _metrics(out / name / "metrics.jsonl")
        assert [r["step"] for r in resumed] == [3, 4]  # continued after the other layout's checkpoint
        _assert_same(ref, resumed, what, steps={3, 4})
    assert ref[-1]["loss"] < ref[0]["loss"]  # the reference trains
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
    _launch(4, 29762, base, layouts, tmp_path / "out")
    for lay in layouts:
        _assert_same(ref, _metrics(tmp_path / "out" / lay["name"] / "metrics.jsonl"), lay["name"])


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
    _launch(2, 29763, base, layouts, tmp_path / "out")
    out = tmp_path / "out"
    for name in ("fsdp2", "tp2", "tp2_no_sp", "cp2_ulysses", "cp2_ring"):
        _assert_same(ref, _metrics(out / name / "metrics.jsonl"), name)
    for name in ("pp2_1f1b", "pp2_v2_interleaved"):
        _assert_same(ref4, _metrics(out / name / "metrics.jsonl"), name)
    _assert_same(ref_one, _metrics(out / "one_image_fsdp2" / "metrics.jsonl"), "one_image_fsdp2")
    assert ref[-1]["loss"] < ref[0]["loss"]


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
    _launch(4, 29764, base, layouts, tmp_path / "out")
    for lay in layouts:
        want = ref_tied if lay["name"] == "pp4_tied" else ref4 if lay["name"].startswith("pp") else ref
        _assert_same(want, _metrics(tmp_path / "out" / lay["name"] / "metrics.jsonl"), lay["name"])
