"""`torchrun --nproc_per_node 2 -m mmkit.train`: the same recipe runs data-parallel on gloo; the two
ranks stay in lockstep (one checkpoint, identical weights), and the loss is the global mean."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmkit.train.checkpoint import export_model_state, find_latest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def setup(wan_train_root):
    return wan_train_root


def test_two_process_data_parallel(setup, tmp_path):
    ckpt = tmp_path / "ckpt"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
        "-m", "mmkit.train", "--config", str(REPO / "recipes/tiny/wan_t2v.toml"),
        "--model.init_from", str(setup / "wan"), "--data.paths", f"[{setup / 'shapes' / 'data.txt'}]",
        "--train.steps", "3", "--optim.warmup_steps", "1", "--checkpoint.dir", str(ckpt),
        "--logging.log_interval", "1", "--logging.progress_bar", "false",
        "--logging.metrics_file", str(ckpt / "metrics.jsonl"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)  # a hang fails fast
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # rank 0 alone writes metrics
    assert all(r["samples_per_s"] > 0 and 0 < r["loss"] < 10 for r in rows)
    latest = find_latest(ckpt)
    assert latest is not None and latest.name == "step_3"
    state = export_model_state(latest)
    assert state and all(torch.isfinite(t).all() for t in state.values())
