"""Tiny Wan t2v training through the real CLI/config path: loss falls, resume is bit-exact."""

import json

import pytest

from mmkit.cli.main import main
from mmkit.config import parse_cli
from mmkit.data.synth import synth_shapes
from mmkit.models.wan.tiny import create_tiny_wan
from mmkit.train.trainer import Trainer


@pytest.fixture
def setup(wan_train_root):
    return wan_train_root


def _args(root, ckpt, steps, **extra):
    args = ["--config", "recipes/tiny/wan_t2v.toml", "--model.init_from", str(root / "wan")]
    args += ["--data.paths", f"[{root / 'shapes' / 'data.txt'}]", "--train.steps", str(steps)]
    args += ["--checkpoint.dir", str(ckpt), "--checkpoint.interval", "2", "--logging.log_interval", "1"]
    args += ["--logging.metrics_file", str(ckpt / "metrics.jsonl"), "--logging.progress_bar", "false"]
    args += ["--optim.warmup_steps", "2", "--optim.schedule", "constant"]  # the LR must not depend on steps
    for k, v in extra.items():
        args += [f"--{k}", str(v)]
    return args


def test_resume_continues_the_identical_loss_curve(setup, tmp_path):
    full = Trainer(parse_cli(_args(setup, tmp_path / "a", 6))).fit()
    first = Trainer(parse_cli(_args(setup, tmp_path / "b", 4))).fit()
    assert first == full[:4]
    # same config with steps=6 resumes from step_4 and must reproduce steps 5-6 exactly
    again = Trainer(parse_cli(_args(setup, tmp_path / "b", 6))).fit()
    assert len(again) == 2
    assert again == full[4:]
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for key in (
        "loss",
        "grad_norm",
        "lr",
        "step_time_s",
        "samples_per_s",
        "tokens_per_s",
        "mfu",
        "peak_mem_mb",
    ):
        assert key in rows[-1], key


def test_cli_train_and_loss_falls(setup, tmp_path, capsys):
    assert main(["train", *_args(setup, tmp_path / "c", 10, **{"optim.lr": 2e-3})]) == 0
    rows = [json.loads(line) for line in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < 0.9 * rows[0]["loss"]
    assert (tmp_path / "c" / "latest").is_file()


def test_config_errors_before_compute(setup, tmp_path, capsys):
    assert main(["train", *_args(setup, tmp_path / "d", 2), "--train.stepz", "3"]) == 2
    assert "train.steps" in capsys.readouterr().err  # the closest name is suggested
    with pytest.raises(ValueError, match="global_batch"):
        parse_cli(_args(setup, tmp_path / "d", 2, **{"train.global_batch": 3}))


def test_precomputed_features_give_the_same_loss(setup, tmp_path):
    import torch

    from mmkit.data.features import FeatureDataset, collate_features, extract_features
    from mmkit.data.video import VideoDataset, collate_videos
    from mmkit.device import resolve_device
    from mmkit.train.build import build_task
    from mmkit.train.trainer import step_generator

    cfg = parse_cli(_args(setup, tmp_path / "e", 2, **{"data.text_dropout": 0.5}))
    task = build_task(cfg, resolve_device("cpu"))
    ds = VideoDataset(cfg.data.paths, 9, 32, 32, 16, max_samples=4, seed=0, progress=False)
    extract_features(task, ds, tmp_path / "feats", progress=False)
    feats = FeatureDataset(tmp_path / "feats")
    assert len(feats) == 4 and feats[0]["text_context"].shape == (512, 32)
    for seed in range(3):  # dropout hits different samples for different seeds
        with torch.no_grad():
            a = task.loss(collate_videos([ds[0], ds[1]]), step_generator(seed, 1, 0))
            b = task.loss(collate_features([feats[0], feats[1]]), step_generator(seed, 1, 0))
        assert a.loss_sum.item() == pytest.approx(b.loss_sum.item(), rel=1e-6) and a.count == b.count
    # and the trainer runs from the feature folder
    losses = Trainer(
        parse_cli(_args(setup, tmp_path / "f", 3, **{"data.precomputed_dir": tmp_path / "feats"}))
    ).fit()
    assert len(losses) == 3


def test_i2v_and_v_prediction_train(tmp_path):
    """The first logged loss of an i2v v-prediction run equals the loss written out by hand
    (`wan_helpers.hand_wan_loss`) on the same two micro-batches, encoded by the run's frozen encoders."""
    import torch
    from wan_helpers import hand_wan_loss

    from mmkit.train.trainer import step_generator

    root = tmp_path
    create_tiny_wan(root / "wan", task="i2v", seed=0)
    synth_shapes(root / "shapes", videos=4, num_frames=9, height=32, width=32, seed=1)
    extra = {"model.task": "i2v", "train.loss": "v_pred_zero_snr", "data.text_dropout": 0.5}
    losses = Trainer(parse_cli(_args(root, tmp_path / "g", 3, **extra))).fit()
    assert len(losses) == 3 and losses[-1] < losses[0]
    fresh = Trainer(parse_cli(_args(root, tmp_path / "g2", 3, **extra)))  # untrained, same data order
    task, g = fresh.task, step_generator(fresh.cfg.train.seed, 1)
    total, count = 0.0, 0
    batches = iter(fresh.loader)
    with torch.no_grad():
        for _ in range(fresh.accum):
            b = next(batches)
            n = len(b["caption"])
            cond, clip = task.image_condition(b["video"], b["video"].shape[2])
            feats = {
                "latents": task.encode_video(b["video"]),
                "text_context": task.encode_text(b["caption"], torch.zeros(n, dtype=torch.bool)),
                "null_text_context": task.encode_text(b["caption"], torch.ones(n, dtype=torch.bool)),
                "cond": cond,
                "image_context": clip,
                **{k: b[k] for k in ("index", "epoch") if k in b},
            }
            part, _ = hand_wan_loss(fresh.model, feats, g, task.cfg)
            total, count = total + part, count + feats["latents"].numel()
    assert count == 4 * 16 * 3 * 4 * 4  # 4 clips of 9 frames at 32 x 32: latents (16, 3, 4, 4)
    assert losses[0] == pytest.approx(total / count, rel=1e-6)


def test_bf16_mixed_precision_keeps_fp32_master_weights(setup, tmp_path):
    import torch

    cfg = parse_cli(_args(setup, tmp_path / "h", 2, **{"train.mixed_precision": "bf16"}))
    trainer = Trainer(cfg)
    fp32_losses = Trainer(parse_cli(_args(setup, tmp_path / "i", 2))).fit()
    losses = trainer.fit()
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert losses[0] != fp32_losses[0] and abs(losses[0] - fp32_losses[0]) < 0.05 * fp32_losses[0]


def test_init_from_mmkit_checkpoints(setup, tmp_path):
    """`--model.init_from` an mmkit checkpoint starts training from exactly its weights: a training run's
    checkpoint folder, that checkpoint pre-split for tp2 (`resplit`), and `hf-to-mm` output of another
    Wan folder (its weights, not the ones the run started from)."""
    import torch

    from mmkit.checkpoint.dcp import export_model_state, find_latest
    from mmkit.checkpoint.hf import read_hf
    from mmkit.convert.ops import hf_to_mm, resplit

    Trainer(parse_cli(_args(setup, tmp_path / "run", 2, **{"optim.lr": 1e-2}))).fit()  # saves step_2
    trained = export_model_state(find_latest(tmp_path / "run"))
    start = read_hf(setup / "wan").state
    assert any(not torch.equal(trained[k], start[k]) for k in start)  # training moved the weights
    other = create_tiny_wan(tmp_path / "other", task="t2v", seed=5, vae="random")
    cases = {
        "run": (tmp_path / "run", trained),
        "tp2": (resplit(tmp_path / "run", tmp_path / "tp2", tp=2, progress=False), trained),
        "hf-to-mm": (hf_to_mm(other, tmp_path / "mm", progress=False), read_hf(other).state),
    }
    for name, (src, want) in cases.items():
        trainer = Trainer(parse_cli(_args(setup, tmp_path / f"t_{name}", 2, **{"model.init_from": src})))
        got = trainer.model.state_dict()
        assert sorted(got) == sorted(want), name
        diff = [k for k in want if not torch.equal(got[k], want[k].to(got[k].dtype))]
        assert not diff, f"init_from {name}: {len(diff)} tensors differ from the checkpoint, e.g. {diff[:3]}"
