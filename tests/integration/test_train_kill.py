"""`kill -9` during training (and very likely during a save, with a save every step): the latest
checkpoint stays loadable, and resuming loses only the steps since it, continuing the same curve."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmkit.checkpoint.dcp import find_latest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def setup(wan_train_root):
    return wan_train_root


def _cmd(root, ckpt, steps):
    return [
        sys.executable, "-m", "mmkit.train", "--config", str(REPO / "recipes/tiny/wan_t2v.toml"),
        "--model.init_from", str(root / "wan"), "--data.paths", f"[{root / 'shapes' / 'data.txt'}]",
        "--train.steps", str(steps), "--checkpoint.dir", str(ckpt), "--checkpoint.interval", "1",
        "--checkpoint.keep_last", "2", "--logging.log_interval", "1", "--logging.progress_bar", "false",
        "--logging.metrics_file", str(ckpt / "metrics.jsonl"), "--optim.schedule", "constant",
        "--optim.warmup_steps", "2",
    ]  # fmt: skip


def _losses(path: Path) -> dict[int, float]:
    out = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        out[rec["step"]] = rec["loss"]
    return out


def test_kill9_then_resume(setup, tmp_path):
    ckpt = tmp_path / "ckpt"
    proc = subprocess.Popen(_cmd(setup, ckpt, 100), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = ckpt / "metrics.jsonl"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            if metrics.is_file() and len(_losses(metrics)) >= 5:
                break
            assert proc.poll() is None, "training exited before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("training did not reach step 5 in time")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    before = _losses(metrics)
    latest = find_latest(ckpt)
    assert latest is not None
    saved = int(latest.name.split("_")[1])
    last = max(before)
    assert last - 1 <= saved <= last  # a save every step: at most the step in flight is lost
    # resume to a few steps past the kill; the steps both runs computed must agree exactly
    target = last + 2
    res = subprocess.run(_cmd(setup, ckpt, target), timeout=300, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    after = _losses(metrics)
    assert sorted(after)[-1] == target
    for step in range(saved + 1, last + 1):
        assert after[step] == before[step], step
    assert not list(ckpt.glob(".tmp-*"))  # a half-written save was cleaned up
