"""Nothing lost, nothing silent, on the checkpoint side (issue findings 1, 5, 6, 7, 10), with a toy model:
non-finite weights are never saved, a failed save is one clear error, resume checks what it continues and
recomputes the LR schedule from the config, and a damaged checkpoint folder is named or skipped."""

import errno
import os
import random
import shutil

import pytest
import torch

import mmkit.checkpoint.dcp as dcp_mod
from mmkit.checkpoint.dcp import (
    CheckpointWriteError,
    NonFiniteWeightsError,
    find_latest,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from mmkit.checkpoint.files import DamagedFileError
from mmkit.config import CheckpointConfig, Config, OptimConfig
from mmkit.train.checkpoint import CheckpointManager
from mmkit.train.lr import build_lr_scheduler, rebase_scheduler
from mmkit.train.optim import build_optimizer
from tests.train_helpers import build, train_step


def test_non_finite_weights_are_never_saved(tmp_path):
    model, opt, sched = build()
    train_step(model, opt, sched)
    save_checkpoint(tmp_path, 1, model, opt, sched, keep_last=1)
    with torch.no_grad():
        model.out.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=r"step 2: not saved.*out\.weight.*step_1, is kept"):
        save_checkpoint(tmp_path, 2, model, opt, sched, keep_last=1)
    assert list_checkpoints(tmp_path) == [tmp_path / "step_1"]  # keep_last deleted nothing
    assert not list(tmp_path.glob(".tmp-*"))


def test_save_errors_are_named_and_keep_the_previous_checkpoint(tmp_path, monkeypatch):
    model, opt, sched = build()
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(CheckpointWriteError, match="a_file.*a file of that name is in the way"):
        save_checkpoint(tmp_path / "a_file", 1, model, opt, sched)
    save_checkpoint(tmp_path / "ck", 1, model, opt, sched)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dcp_mod, "write_manifest", full)  # the disk fills up late in the save
    with pytest.raises(
        CheckpointWriteError, match=r"step 2: the disk is full; the previous checkpoint .*step_1"
    ):
        save_checkpoint(tmp_path / "ck", 2, model, opt, sched)
    assert find_latest(tmp_path / "ck") == tmp_path / "ck" / "step_1"
    assert not list((tmp_path / "ck").glob(".tmp-*"))  # the partial save's space is given back


def test_unwritable_checkpoint_dir_is_a_config_error(tmp_path):
    from mmkit.config import ConfigError, validate

    (tmp_path / "f").write_text("x")
    cfg = Config()
    cfg.checkpoint.dir = str(tmp_path / "f")
    with pytest.raises(ConfigError, match="checkpoint.dir=.*is a file, not a folder"):
        validate(cfg, world_size=1)
    cfg.checkpoint.dir = str(tmp_path / "f" / "sub")
    with pytest.raises(ConfigError, match="cannot be created: .* is a file"):
        validate(cfg, world_size=1)


def _lrs(opt, sched, n):
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def _sched(model, lr=1e-2, min_lr=1e-3, total=10, warmup=2):
    cfg = OptimConfig(lr=lr, min_lr=min_lr, warmup_steps=warmup)
    opt = build_optimizer(model, cfg)
    return cfg, opt, build_lr_scheduler(opt, cfg, total)


def test_resume_recomputes_the_schedule_from_the_config():
    model = build()[0]
    cfg, opt, sched = _sched(model)
    full = _lrs(opt, sched, 10)
    _, opt_a, sched_a = _sched(model)
    _lrs(opt_a, sched_a, 4)
    saved = sched_a.state_dict()
    # unchanged config: exactly the uninterrupted rates
    _, opt_b, sched_b = _sched(model)
    sched_b.load_state_dict(saved)
    assert rebase_scheduler(sched_b, opt_b, cfg, 10, 4, saved) is None
    assert _lrs(opt_b, sched_b, 6) == full[4:]
    # a new lr: the whole schedule from the new base (min_lr / lr of the new config too)
    cfg_c, opt_c, sched_c = _sched(model, lr=2e-2, min_lr=2e-3)
    sched_c.load_state_dict(saved)
    rebase_scheduler(sched_c, opt_c, cfg_c, 10, 4, saved)
    assert _lrs(opt_c, sched_c, 6) == pytest.approx([2 * x for x in full[4:]], rel=1e-12)
    # more steps: the cosine continues from the rate reached, no jump, down to min_lr at the new end
    cfg_d, opt_d, sched_d = _sched(model, total=20)
    sched_d.load_state_dict(saved)
    note = rebase_scheduler(sched_d, opt_d, cfg_d, 20, 4, saved)
    assert "continues from the rate reached at step 4" in note
    longer = _lrs(opt_d, sched_d, 16)
    assert longer[0] == pytest.approx(full[4], rel=1e-12)
    assert all(b <= a for a, b in zip(longer, longer[1:]))  # monotone decay, no jump
    assert longer[-1] > 1e-3 and sched_d.get_last_lr()[0] == pytest.approx(1e-3)
    # a second resume of the longer run keeps its continuation
    saved_d = sched_d.state_dict()
    cfg_e, opt_e, sched_e = _sched(model, total=20)
    _, opt_f, sched_f = _sched(model, total=20)
    sched_f.load_state_dict(saved)
    rebase_scheduler(sched_f, opt_f, cfg_e, 20, 4, saved)
    _lrs(opt_f, sched_f, 6)
    mid = sched_f.state_dict()
    sched_e.load_state_dict(mid)
    assert rebase_scheduler(sched_e, opt_e, cfg_e, 20, 10, mid) is None
    assert _lrs(opt_e, sched_e, 10) == longer[6:]
    assert saved_d["lr_lambdas"][0]["anchor"][0] == 4


def _run(tmp_path, steps=4, **ck):
    cfg = Config()
    cfg.checkpoint = CheckpointConfig(dir=str(tmp_path / "ck"), interval=1, **ck)
    mgr = CheckpointManager(cfg.checkpoint, config=cfg)
    model, opt, sched = build()
    assert mgr.resume(model, opt, sched, total_steps=steps) is None
    for step in range(1, steps + 1):
        train_step(model, opt, sched)
        mgr.maybe_save(step, steps, model, opt, sched, data_state={"step": step})
    return cfg, mgr


def test_resume_checks_and_says_what_it_continues(tmp_path, capsys):
    cfg, mgr = _run(tmp_path)
    model, opt, sched = build(seed=1)
    with pytest.raises(ValueError, match=r"train.steps=4: the checkpoint .*step_4 is already at step 4"):
        mgr.resume(model, opt, sched, total_steps=4)
    assert mgr.resume(model, opt, sched, total_steps=9).step == 4
    assert f"resumed from {tmp_path / 'ck' / 'step_4'} (step 4 of 9)" in capsys.readouterr().out
    cfg.optim.warmup_steps = 7
    with pytest.raises(
        ValueError, match=r"optim.warmup_steps=7: the checkpoint .* was trained with optim.warmup_steps=0"
    ):
        mgr.resume(model, opt, sched, total_steps=9)


def test_missing_rng_and_optimizer_parts_warn(tmp_path):
    model, opt, sched = build()
    train_step(model, opt, sched)
    save_checkpoint(tmp_path, 1, model, None, sched)
    (tmp_path / "step_1" / "ranks" / "rank_00000.json").unlink()
    with pytest.warns(UserWarning) as rec:
        load_checkpoint(tmp_path, model, opt, sched)
    text = " ".join(str(w.message) for w in rec)
    assert "no optimizer state: the optimizer (AdamW moments) is NOT restored" in text
    assert "ranks/rank_00000.json missing: the RNG states" in text


# ---- fuzz: random damage to a checkpoint folder ------------------------------------------------------
def _damage(rng: random.Random, step_dir):
    files = sorted(p for p in step_dir.rglob("*") if p.is_file())
    victim = rng.choice(files)
    kind = rng.choice(["truncate", "flip", "empty", "delete", "garbage"])
    data = victim.read_bytes()
    if kind == "truncate":
        victim.write_bytes(data[: rng.randrange(max(1, len(data)))])
    elif kind == "flip" and data:
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        victim.write_bytes(bytes(b))
    elif kind == "empty":
        victim.write_bytes(b"")
    elif kind == "delete":
        victim.unlink()
    else:
        victim.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))))
    return f"{kind} {victim.relative_to(step_dir.parent)}"


def test_fuzz_damaged_checkpoint_folder(tmp_path, capsys):
    """Each case damages the newest step (sometimes both) and resumes: a fallback that says so, or one
    error naming the damaged folder or file, never a traceback from deeper down."""
    _run(tmp_path, steps=2)
    pristine = tmp_path / "pristine"
    shutil.copytree(tmp_path / "ck", pristine)
    n = int(os.environ.get("MMKIT_FUZZ_N", "12"))
    rng = random.Random(0)
    outcomes = set()
    for case in range(n):
        shutil.rmtree(tmp_path / "ck")
        shutil.copytree(pristine, tmp_path / "ck")
        what = [_damage(rng, tmp_path / "ck" / "step_2")]
        if case % 4 == 3:
            what.append(_damage(rng, tmp_path / "ck" / "step_1"))
        cfg = Config()
        # checkpoint.resume auto, or the checkpoint dir named explicitly: the same fallback
        cfg.checkpoint = CheckpointConfig(
            dir=str(tmp_path / "ck"), resume="auto" if case % 2 else str(tmp_path / "ck")
        )
        model, opt, sched = build(seed=5)
        capsys.readouterr()
        try:
            st = CheckpointManager(cfg.checkpoint, config=cfg).resume(model, opt, sched, total_steps=9)
        except (ValueError, FileNotFoundError) as e:  # DamagedFileError is a ValueError
            assert "ck" in str(e), (what, e)
            outcomes.add("error")
            continue
        out = capsys.readouterr().out
        if st.step == 1:
            assert "step_2 is damaged" in out and "falling back" in out, (what, out)
            outcomes.add("fallback")
        else:  # the damage missed everything the manifest covers: impossible, every file is in it
            pytest.fail(f"{what}: resumed step_2 without noticing")
        for p in model.parameters():
            assert torch.isfinite(p).all()
    assert "fallback" in outcomes, outcomes
    print(sorted(outcomes))


def test_load_names_a_damaged_tensor_file_without_a_manifest(tmp_path):
    """A folder from before manifests: the header check still names the truncated file."""
    model, opt, sched = build()
    save_checkpoint(tmp_path, 1, model, opt, sched)
    (tmp_path / "step_1" / "manifest.json").unlink()
    shard = next((tmp_path / "step_1" / "dcp").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DamagedFileError, match=str(shard.name)):
        load_checkpoint(tmp_path, model, opt, sched)
    assert not list(tmp_path.glob(".tmp-*"))
