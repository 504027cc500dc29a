"""`kill -9` inside a checkpoint save, deterministically (the writer's fault-injection hook
`MMKIT_CKPT_KILL=<point>:<step>` SIGKILLs the process there): before the temporary folder is renamed,
and after the rename but before `latest` moves. Every step any of the runs computed, before and after
each kill, equals the uninterrupted run bit for bit, and so do the final weights; the temporary folder
existed and the resume removed it."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from mmkit.checkpoint.dcp import KILL_ENV, export_model_state, list_checkpoints
from mmkit.config import parse_cli
from mmkit.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
STEPS = 4


def _args(root, ckpt):
    return [
        "--config", str(REPO / "recipes/tiny/wan_t2v.toml"),
        "--model.init_from", str(root / "wan"), "--data.paths", f"[{root / 'shapes' / 'data.txt'}]",
        "--train.steps", str(STEPS), "--checkpoint.dir", str(ckpt), "--checkpoint.interval", "1",
        "--checkpoint.keep_last", "2", "--logging.log_interval", "1", "--logging.progress_bar", "false",
        "--logging.metrics_file", str(ckpt / "metrics.jsonl"), "--optim.warmup_steps", "2",
    ]  # fmt: skip


def _run(root, ckpt, kill):
    """The CLI in a child process, SIGKILLed by the writer's hook."""
    cmd = [sys.executable, "-m", "mmkit.train", *_args(root, ckpt)]
    env = {**os.environ, KILL_ENV: kill}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _records(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by the kill
    return out


def _latest(ckpt: Path) -> str:
    return (ckpt / "latest").read_text().strip()


def _in_process(root, ckpt, capsys) -> str:
    """The same run in this process (no interpreter start-up); returns what it printed."""
    capsys.readouterr()
    Trainer(parse_cli(_args(root, ckpt))).fit()
    return capsys.readouterr().out


def test_kill9_inside_saves_then_resume_is_bit_exact(wan_train_root, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(KILL_ENV, raising=False)
    ref_dir, ckpt = tmp_path / "ref", tmp_path / "ckpt"
    _in_process(wan_train_root, ref_dir, capsys)  # the uninterrupted reference
    ref = {r["step"]: r for r in _records(ref_dir / "metrics.jsonl")}
    assert sorted(ref) == list(range(1, STEPS + 1))

    # 1. killed in the save of step 2, the temporary folder complete but not yet renamed
    res = _run(wan_train_root, ckpt, kill="before_rename:2")
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert (ckpt / ".tmp-step_2" / "manifest.json").is_file()  # the kill landed inside the save
    assert _latest(ckpt) == "step_1" and list_checkpoints(ckpt) == [ckpt / "step_1"]

    # 2. resumed (removing the leftover), then killed after renaming step_3, before `latest` moved
    res = _run(wan_train_root, ckpt, kill="after_rename:3")
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert "removed .tmp-step_2, an unfinished save" in res.stdout
    assert f"resumed from {ckpt / 'step_1'} (step 1 of {STEPS})" in res.stdout
    assert not (ckpt / ".tmp-step_2").exists() and not list(ckpt.glob(".tmp-*"))
    assert _latest(ckpt) == "step_2" and (ckpt / "step_3" / "manifest.json").is_file()

    # 3. resumed from the complete step_3 (newer than `latest`) to the end
    out = _in_process(wan_train_root, ckpt, capsys)
    assert f"resumed from {ckpt / 'step_3'} (step 3 of {STEPS})" in out
    assert _latest(ckpt) == f"step_{STEPS}"

    seen = _records(ckpt / "metrics.jsonl")
    assert sorted({r["step"] for r in seen}) == list(range(1, STEPS + 1))
    assert len(seen) > STEPS  # steps 2 and 3 were computed twice, across the kills
    for r in seen:
        for key in ("loss", "grad_norm", "lr"):
            assert r[key] == ref[r["step"]][key], (r["step"], key)
    a, b = export_model_state(ref_dir), export_model_state(ckpt)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
