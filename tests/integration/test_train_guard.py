"""The issue's diverging-run scenario through the real trainer, and honest resume (findings 1, 5, 6):
the good checkpoints survive a run that blows up, NaN steps are skipped or stop the run, and a resume
says what it continues and refuses what it cannot continue before writing anything."""

import dataclasses
import json
from pathlib import Path

import pytest
import tomllib
import torch

import mmkit.convert.export as export_mod
from mmkit.checkpoint.dcp import export_model_state, list_checkpoints
from mmkit.cli.main import main
from mmkit.config import parse_cli
from mmkit.train.trainer import Trainer, TrainingDiverged

REPO = Path(__file__).resolve().parents[2]


def _args(ckpt, steps, *extra):
    # relative paths on purpose (the test runs inside the shared root): saved configs must hold them absolute
    return [
        "--config", str(REPO / "recipes/tiny/wan_t2v.toml"), "--model.init_from", "wan",
        "--data.paths", "[shapes/data.txt]", "--train.steps", str(steps), "--checkpoint.dir", str(ckpt),
        "--checkpoint.interval", "2", "--logging.log_interval", "1", "--logging.progress_bar", "false",
        "--logging.metrics_file", str(ckpt / "metrics.jsonl"), *extra,
    ]  # fmt: skip


def _finite(step_dir) -> bool:
    return all(torch.isfinite(v).all() for v in export_model_state(step_dir).values())


def test_a_diverging_run_keeps_the_good_checkpoints(wan_train_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(wan_train_root)
    ck = tmp_path / "ck"
    with pytest.warns(UserWarning, match="warmup_steps=10 is longer than train.steps=4"):
        cfg = parse_cli(_args(ck, 4))  # a smoke run shorter than the recipe's warmup goes on
    Trainer(cfg).fit()
    saved = tomllib.loads((ck / "config.toml").read_text())
    assert saved["model"]["init_from"] == str(wan_train_root / "wan")  # absolute
    assert saved["data"]["paths"] == [str(wan_train_root / "shapes/data.txt")]
    text = (ck / "config.toml").read_text()

    # train.steps <= the saved step: an error naming the field, and config.toml is not rewritten
    with pytest.raises(ValueError, match="train.steps=3: the checkpoint .*step_4 is already at step 4"):
        Trainer(parse_cli(_args(ck, 3, "--optim.lr", "5e-3"))).fit()
    assert (ck / "config.toml").read_text() == text

    # the reproduction: lr 1e3 from step_4 diverges; the run stops, nothing non-finite is saved
    capsys.readouterr()
    diverging = parse_cli(
        _args(ck, 10, "--optim.lr", "1e3", "--optim.min_lr", "0", "--checkpoint.no_load_optim")
    )
    with pytest.raises(
        TrainingDiverged, match=r"not finite.*newest checkpoint, .*step_\d+, holds the last finite"
    ):
        Trainer(diverging).fit()
    assert f"resumed from {ck / 'step_4'} (step 4 of 10)" in capsys.readouterr().out
    steps = list_checkpoints(ck)
    assert ck / "step_4" in steps and all(_finite(s) for s in steps)

    # nan_policy=skip: a NaN step's update is dropped and counted; the run goes on and saves
    good = parse_cli(_args(ck, 6, "--train.nan_policy", "skip", "--checkpoint.resume", str(ck / "step_4"),
                           "--checkpoint.fork", str(tmp_path / "fork")))  # fmt: skip
    trainer = Trainer(good)
    real_loss, calls = trainer.task.loss, []

    def loss(batch, g):  # the first micro-batch of step 5 yields NaN
        out = real_loss(batch, g)
        calls.append(1)
        return dataclasses.replace(out, loss_sum=out.loss_sum * float("nan")) if len(calls) == 1 else out

    trainer.task.loss = loss
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    losses = trainer.fit()
    assert losses[0] != losses[0] and losses[1] == losses[1]  # step 5 NaN, step 6 finite
    rows = [json.loads(x) for x in (ck / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6 and rows[-1]["skipped_steps"] == 1
    assert _finite(tmp_path / "fork" / "step_6")
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())

    # mm-to-hf refuses non-finite weights unless --allow-nonfinite
    real = export_mod.export_model_state

    def nan_state(step_dir, which):
        sd = real(step_dir, which)
        next(iter(sd.values())).view(-1)[0] = float("nan")
        return sd

    monkeypatch.setattr(export_mod, "export_model_state", nan_state)
    capsys.readouterr()
    assert main(["convert", "mm-to-hf", str(ck), str(tmp_path / "hf"), "--quiet"]) == 2
    assert "hold NaN/inf" in capsys.readouterr().err and not (tmp_path / "hf").exists()
    with pytest.warns(UserWarning, match="exporting weights that hold NaN/inf"):
        assert (
            main(["convert", "mm-to-hf", str(ck), str(tmp_path / "hf"), "--quiet", "--allow-nonfinite"]) == 0
        )
    assert (tmp_path / "hf" / "model_index.json").is_file()


def test_stop_after_max_bad_steps_in_a_row(wan_train_root, tmp_path, monkeypatch):
    monkeypatch.chdir(wan_train_root)
    ck = tmp_path / "ck"
    cfg = parse_cli(_args(ck, 5, "--train.nan_policy", "skip", "--train.max_bad_steps", "2",
                          "--optim.warmup_steps", "1"))  # fmt: skip
    trainer = Trainer(cfg)
    real_loss = trainer.task.loss
    trainer.task.loss = lambda b, g: dataclasses.replace(
        out := real_loss(b, g), loss_sum=out.loss_sum * float("inf")
    )
    with pytest.raises(TrainingDiverged, match=r"step 2: .*2 bad steps in a row \(train.max_bad_steps=2\)"):
        trainer.fit()
    assert list_checkpoints(ck) == []  # step 2 was the first save: never written from a broken run
