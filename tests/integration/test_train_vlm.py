"""Tiny Qwen2.5-VL SFT through the real CLI/config path on synthetic image Q&A: the loss falls, resume
is bit-exact, batches mixing samples with and without images train (padded and packed)."""

import json
import math

import pytest

from mmkit.cli.main import main
from mmkit.config import parse_cli
from mmkit.data.synth import synth_shapes_qa
from mmkit.models.qwen2_5_vl.tiny import create_tiny_qwen2_5_vl
from mmkit.train.trainer import Trainer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlmtrain")
    create_tiny_qwen2_5_vl(root / "qwen", seed=0)
    qa = synth_shapes_qa(root / "qa", images=12, size=56, seed=0, progress=False)
    # one image record + one text-only record: with micro_batch 2 every micro-batch mixes both kinds
    text_only = {
        "messages": [{"role": "user", "content": "Say red."}, {"role": "assistant", "content": "red"}]
    }
    (root / "qa" / "mixed.json").write_text(json.dumps([json.loads(qa.read_text())[0], text_only]))
    return root


def _args(root, ckpt, steps, data="qa.json", **extra):
    args = ["--config", "recipes/tiny/qwen2_5_vl_sft.toml", "--data.paths", str(root / "qa" / data)]
    args += ["--train.steps", str(steps), "--train.global_batch", "4", "--train.micro_batch", "2"]
    args += ["--checkpoint.dir", str(ckpt), "--checkpoint.interval", "2", "--logging.log_interval", "1"]
    args += ["--logging.metrics_file", str(ckpt / "metrics.jsonl"), "--logging.progress_bar", "false"]
    args += ["--optim.warmup_steps", "1", "--optim.schedule", "constant"]  # the LR must not depend on steps
    for k, v in extra.items():
        args += [f"--{k}", str(v)]
    return args


def _rows(ckpt):
    return [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]


def test_cli_train_loss_falls(setup, tmp_path):
    assert main(["train", *_args(setup, tmp_path / "a", 10)]) == 0
    rows = _rows(tmp_path / "a")
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"]
    assert rows[-1]["tokens_per_s"] > 0 and rows[-1]["mfu"] > 0
    assert (tmp_path / "a" / "latest").is_file()


def test_resume_continues_the_identical_loss_curve(setup, tmp_path):
    init = {"model.init_from": setup / "qwen"}  # weights + tokenizer through the HF-folder loader
    full = Trainer(parse_cli(_args(setup, tmp_path / "a", 6, **init))).fit()
    first = Trainer(parse_cli(_args(setup, tmp_path / "b", 4, **init))).fit()
    assert first == full[:4]
    again = Trainer(parse_cli(_args(setup, tmp_path / "b", 6, **init))).fit()  # resumes from step_4
    assert len(again) == 2
    assert again == full[4:]


@pytest.mark.parametrize("packing", ["false", "true"])
def test_batch_with_and_without_images(setup, tmp_path, packing):
    args = _args(setup, tmp_path / "c", 3, data="mixed.json", **{"data.packing": packing})
    trainer = Trainer(parse_cli([*args, "--train.global_batch", "2"]))
    batch = next(iter(trainer.loader))
    assert batch["image_grid_thw"].shape[0] == 1  # one of the two samples has an image
    assert ("cu_seqlens" in batch) == (packing == "true")
    losses = trainer.fit()
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]


def test_init_from_mmkit_checkpoints(setup, tmp_path):
    """`--model.init_from` an mmkit checkpoint starts training from exactly its weights: a training run's
    checkpoint folder, and `hf-to-mm` output of another Qwen folder (its weights, not the run's start)."""
    import torch

    from mmkit.checkpoint.dcp import export_model_state, find_latest
    from mmkit.checkpoint.hf import read_hf
    from mmkit.convert.ops import hf_to_mm

    init = {"model.init_from": setup / "qwen", "optim.lr": 1e-2}
    Trainer(parse_cli(_args(setup, tmp_path / "run", 2, **init))).fit()  # saves step_2
    trained = export_model_state(find_latest(tmp_path / "run"))
    start = read_hf(setup / "qwen").state
    assert any(not torch.equal(trained[k], start[k]) for k in start)  # training moved the weights
    other = create_tiny_qwen2_5_vl(tmp_path / "other", seed=3)
    cases = {
        "run": (tmp_path / "run", trained),
        "hf-to-mm": (hf_to_mm(other, tmp_path / "mm", progress=False), read_hf(other).state),
    }
    for name, (src, want) in cases.items():
        trainer = Trainer(parse_cli(_args(setup, tmp_path / f"t_{name}", 2, **{"model.init_from": src})))
        got = trainer.model.state_dict()
        assert sorted(got) == sorted(want), name
        diff = [k for k in want if not torch.equal(got[k], want[k].to(got[k].dtype))]
        assert not diff, f"init_from {name}: {len(diff)} tensors differ from the checkpoint, e.g. {diff[:3]}"
