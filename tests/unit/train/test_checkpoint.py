import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
from train_helpers import build, train_step

from mmkit.checkpoint import dcp as ckpt_mod
from mmkit.checkpoint.dcp import (
    export_model_state,
    find_latest,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from mmkit.config import CheckpointConfig, Config, load_config, save_resolved
from mmkit.train.checkpoint import CheckpointManager
from mmkit.train.ema import EMA

FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def _seed_all(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _assert_same_state(m1, o1, m2, o2):
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    s1, s2 = get_optimizer_state_dict(m1, o1, options=FLAT), get_optimizer_state_dict(m2, o2, options=FLAT)
    assert s1.keys() == s2.keys()
    for k in s1:
        if isinstance(s1[k], torch.Tensor):
            assert torch.equal(s1[k], s2[k]), k
        else:
            assert s1[k] == s2[k], k


def test_round_trip_continues_bit_identically(tmp_path):
    _seed_all(0)
    model, opt, sched = build(seed=0)
    ema = EMA(model, decay=0.9)
    for _ in range(3):
        train_step(model, opt, sched, ema)
    path = save_checkpoint(
        tmp_path, 3, model, opt, sched, ema=ema, data_state={"samples_seen": 15, "epoch": 0}
    )
    assert path == tmp_path / "step_3" and (tmp_path / "latest").read_text().strip() == "step_3"
    reference = [train_step(model, opt, sched, ema) for _ in range(3)]

    _seed_all(123)  # different weights and RNG streams: everything must come from the checkpoint
    model2, opt2, sched2 = build(seed=1)
    ema2 = EMA(model2, decay=0.9)
    state = load_checkpoint(tmp_path, model2, opt2, sched2, ema=ema2)
    assert state.step == 3 and state.data_state == {"samples_seen": 15, "epoch": 0}
    assert sched2.last_epoch == 3 and opt2.param_groups[0]["betas"] == (0.9, 0.999)
    resumed = [train_step(model2, opt2, sched2, ema2) for _ in range(3)]
    assert resumed == reference  # bit for bit: weights, Adam moments, LR schedule and RNG streams restored
    _assert_same_state(model, opt, model2, opt2)
    for k, v in ema.state_dict().items():
        assert torch.equal(v, ema2.state_dict()[k]), k


def test_rng_state_round_trip():
    _seed_all(5)
    s = rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    _seed_all(6)
    set_rng_state(s)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_no_save_rng_leaves_rng_alone_and_no_load_optim_keeps_fresh_optimizer(tmp_path):
    model, opt, sched = build(seed=0)
    for _ in range(2):
        train_step(model, opt, sched)
    save_checkpoint(tmp_path, 2, model, opt, sched, save_rng=False)
    assert not any("rng" in p.read_text() for p in (tmp_path / "step_2" / "ranks").iterdir())

    model2, opt2, sched2 = build(seed=1)
    torch.manual_seed(77)
    expected = torch.rand(4)
    torch.manual_seed(77)
    state = load_checkpoint(tmp_path, model2, opt2, sched2, load_optim=False)
    assert torch.equal(torch.rand(4), expected)  # RNG untouched
    assert state.step == 2
    for (k, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), k  # weights loaded ...
    assert opt2.state_dict()["state"] == {} and sched2.last_epoch == 0  # ... optimizer and schedule fresh


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, opt, sched = build(seed=0)
    train_step(model, opt, sched)
    save_checkpoint(tmp_path, 1, model, opt, sched, data_state={"samples_seen": 5})
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    train_step(model, opt, sched)

    def killed(tmp, final, ckpt_dir, step):
        raise KeyboardInterrupt("killed after writing the temporary folder")

    monkeypatch.setattr(ckpt_mod, "_publish", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, model, opt, sched)
    assert (tmp_path / ".tmp-step_2" / "train_state.json").is_file()  # the save got as far as it could
    assert (tmp_path / "latest").read_text().strip() == "step_1"
    assert find_latest(tmp_path) == tmp_path / "step_1" and list_checkpoints(tmp_path) == [
        tmp_path / "step_1"
    ]

    monkeypatch.undo()
    model2, opt2, sched2 = build(seed=1)
    state = load_checkpoint(tmp_path, model2, opt2, sched2)
    assert state.step == 1 and state.data_state == {"samples_seen": 5}
    for k, v in model2.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert not (tmp_path / ".tmp-step_2").exists()  # the leftover was cleaned up
    save_checkpoint(tmp_path, 2, model, opt, sched)
    assert (tmp_path / "latest").read_text().strip() == "step_2"


def test_keep_last_and_repeated_step(tmp_path):
    model, opt, sched = build(seed=0)
    for step in range(1, 5):
        train_step(model, opt, sched)
        save_checkpoint(tmp_path, step, model, opt, sched, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_3", "step_4"]
    assert (tmp_path / "latest").read_text().strip() == "step_4"
    before = os.stat(tmp_path / "step_4" / "train_state.json").st_mtime_ns
    save_checkpoint(tmp_path, 4, model, opt, sched, keep_last=2)  # interval save == final save: no rewrite
    assert os.stat(tmp_path / "step_4" / "train_state.json").st_mtime_ns == before


def test_export_model_state_and_mismatch_error(tmp_path):
    model, opt, sched = build(seed=0)
    ema = EMA(model, decay=0.5)
    train_step(model, opt, sched, ema)
    save_checkpoint(tmp_path, 1, model, opt, sched, ema=ema)
    full = export_model_state(tmp_path)
    assert full.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(full[k], v), k
    averaged = export_model_state(tmp_path / "step_1", which="ema")
    assert torch.equal(averaged["inp.weight"], ema.state_dict()["inp.weight"])
    assert not torch.equal(averaged["inp.weight"], model.inp.weight)

    other = torch.nn.Linear(4, 8)
    with pytest.raises(ValueError, match="does not match the model being loaded: missing 2"):
        load_checkpoint(tmp_path, other)
    wider, _, _ = build(seed=0)
    wider.out = torch.nn.Linear(8, 5)
    with pytest.raises(
        ValueError, match=r"shape mismatch \(saved vs model\) \['model.out.weight \(3, 8\) vs \(5, 8\)"
    ):
        load_checkpoint(tmp_path, wider)
    with pytest.raises(FileNotFoundError, match="neither a step_N"):
        load_checkpoint(tmp_path / "nowhere", model)


def test_checkpoint_manager(tmp_path):
    cfg = Config()
    cfg.checkpoint = CheckpointConfig(dir=str(tmp_path / "ck"), interval=2, keep_last=0)
    mgr = CheckpointManager(cfg.checkpoint, config=cfg)
    assert not (tmp_path / "ck").exists()  # nothing is written before resume() checked the run
    assert [s for s in range(1, 6) if mgr.should_save(s, 5)] == [2, 4, 5]
    model, opt, sched = build(seed=0)
    assert mgr.resume(model, opt, sched) is None  # fresh run
    assert (tmp_path / "ck" / "config.toml").is_file()
    for step in range(1, 6):
        train_step(model, opt, sched)
        mgr.maybe_save(step, 5, model, opt, sched, data_state={"step": step})
    assert [p.name for p in list_checkpoints(tmp_path / "ck")] == ["step_2", "step_4", "step_5"]
    assert (
        load_config(tmp_path / "ck" / "step_4" / "config.toml") == cfg
    )  # each step folder is self-describing
    model2, opt2, sched2 = build(seed=1)
    assert mgr.resume(model2, opt2, sched2).step == 5
    mgr.cfg.resume = str(tmp_path / "ck" / "step_2")
    with pytest.raises(ValueError, match=r"later steps \(step_4, step_5\).*--checkpoint.fork"):
        mgr.resume(model2, opt2, sched2)  # continuing step_2 here would mix two continuations
    mgr.cfg.fork = str(tmp_path / "fork")
    fork = CheckpointManager(mgr.cfg, config=cfg)
    assert fork.resume(model2, opt2, sched2).data_state == {"step": 2}
    assert fork.dir == tmp_path / "fork"
    mgr.cfg.fork = None
    mgr.cfg.resume = "none"
    assert mgr.resume(model2, opt2, sched2) is None
    save_resolved(cfg, tmp_path)  # the file is plain TOML written atomically
    assert not any(p.name.startswith(".config") for p in tmp_path.iterdir())


def test_two_process_fsdp_save_loads_in_one_process(tmp_path):
    worker = Path(__file__).with_name("dist_ckpt_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(worker),
    ]
    try:
        proc = subprocess.run(cmd + [str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"2-process checkpoint worker hung (> {e.timeout} s)")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(list((tmp_path / "ckpt" / "step_2" / "dcp").glob("shard-*.safetensors"))) == 2

    ref = load_file(str(tmp_path / "reference.safetensors"))
    model, opt, sched = build(seed=3)
    ema = EMA(model, decay=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = load_checkpoint(tmp_path / "ckpt", model, opt, sched, ema=ema)
    assert any("RNG states not restored" in str(w.message) for w in caught)  # 2 processes -> 1
    assert state.step == 2 and state.data_state == {"samples_seen": 10} and sched.last_epoch == 2
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[f"model.{k}"]), k
    osd = get_optimizer_state_dict(model, opt, options=FLAT)
    n_optim = [k for k in ref if k.startswith("optim.")]
    assert len(n_optim) == 21  # 7 parameters x (step, exp_avg, exp_avg_sq)
    for k in n_optim:
        assert torch.equal(osd[k[len("optim.") :]], ref[k]), k
    for k, v in ema.state_dict().items():
        assert torch.equal(v, ref[f"ema.{k}"]), k
