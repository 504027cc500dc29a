import json

import pytest
import torch

from mmkit.cli.main import main as mmkit_main
from mmkit.cli.plot import moving_average, plot_metrics
from mmkit.config import LoggingConfig
from mmkit.train import metrics as metrics_mod
from mmkit.train.metrics import (
    MetricsLogger,
    device_peak_flops,
    measure_matmul_flops,
    peak_memory_mb,
    read_metrics,
)

FIELDS = (
    "step",
    "loss",
    "grad_norm",
    "lr",
    "step_time_s",
    "samples_per_s",
    "tokens_per_s",
    "mfu",
    "peak_mem_mb",
)


def _run(cfg, total=5, start=0, rank=0, losses=None):
    log = MetricsLogger(cfg, total_steps=total, start_step=start, device="cpu", rank=rank, world_size=2)
    for step in range(start + 1, total + 1):
        loss = (losses or {}).get(step, 1.0 / step)
        log.step(
            {"step": step, "loss": loss, "grad_norm": 0.5, "lr": 1e-3, "step_time_s": 0.25,
             "samples": 8, "tokens": 1000, "flops": 5e11, "loss_flow": loss / 2}
        )  # fmt: skip
    log.close()


def test_jsonl_fields_values_and_interval(tmp_path, capsys):
    cfg = LoggingConfig(
        log_interval=2,
        metrics_file=str(tmp_path / "m.jsonl"),
        peak_tflops=1.0,
        log_tps=True,
        progress_bar=False,
    )
    _run(cfg)
    recs = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [2, 4, 5]  # every log_interval steps, and the last step
    r = recs[0]
    assert all(k in r for k in FIELDS)
    assert r["loss"] == 0.5 and r["grad_norm"] == 0.5 and r["lr"] == 1e-3 and r["loss_flow"] == 0.25
    assert r["samples_per_s"] == 32.0 and r["tokens_per_s"] == 4000.0
    assert r["mfu"] == pytest.approx(5e11 / 0.25 / (1e12 * 2))  # FLOP/s / (peak x world size) = 1.0
    assert r["peak_mem_mb"] > 10
    out = capsys.readouterr().out
    assert (
        "step 4/5 | loss 0.2500 | grad 0.5 | lr 1.00e-03 | 0.250 s/step | 32.00 samples/s | 4000 tok/s" in out
    )
    assert "mfu 100.0%" in out


def test_resume_appends_and_reader_keeps_last(tmp_path):
    cfg = LoggingConfig(
        log_interval=1, metrics_file=str(tmp_path / "m.jsonl"), peak_tflops=1.0, progress_bar=False
    )
    _run(cfg, total=4)
    _run(cfg, total=6, start=2, losses={3: 9.0})  # resumed from step 2: steps 3, 4 are redone
    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    assert len(lines) == 8
    recs = read_metrics(tmp_path / "m.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6] and recs[2]["loss"] == 9.0


def test_tensorboard_files_and_rank_nonzero_is_silent(tmp_path):
    cfg = LoggingConfig(
        log_interval=1,
        tensorboard_dir=str(tmp_path / "tb"),
        metrics_file=str(tmp_path / "m.jsonl"),
        peak_tflops=1.0,
    )
    _run(cfg, total=3)
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 100
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]
    assert acc.Scalars("train/loss")[1].value == pytest.approx(0.5)

    other = LoggingConfig(
        log_interval=1, metrics_file=str(tmp_path / "r1.jsonl"), tensorboard_dir=str(tmp_path / "tb1")
    )
    _run(other, total=2, rank=1)
    assert not (tmp_path / "r1.jsonl").exists() and not (tmp_path / "tb1").exists()


def test_cpu_peak_measured_once_and_memory(monkeypatch):
    calls = []
    monkeypatch.setattr(metrics_mod, "_CPU_PEAK_CACHE", {})
    monkeypatch.setattr(
        metrics_mod, "measure_matmul_flops", lambda n, dtype: calls.append((n, dtype)) or 2e11
    )
    assert device_peak_flops("cpu", torch.float32) == 2e11
    assert device_peak_flops("cpu", torch.float32) == 2e11  # cached: no second measurement
    # sizes double while a product is fast; a fast CPU is measured at 4096
    assert calls == [(n, torch.float32) for n in (256, 512, 1024, 2048, 4096)]
    # a slow dtype (bf16 without hardware support: ~1 GFLOP/s) stops as soon as a product takes 0.1 s
    calls.clear()
    monkeypatch.setattr(metrics_mod, "measure_matmul_flops", lambda n, dtype: calls.append((n, dtype)) or 1e9)
    assert device_peak_flops("cpu", torch.bfloat16) == 1e9
    assert calls == [(256, torch.bfloat16), (512, torch.bfloat16)]  # 2 * 512^3 / 1e9 = 0.27 s
    assert measure_matmul_flops(256) > 1e8  # a real (small) measurement
    assert peak_memory_mb("cpu") > 10
    assert metrics_mod.PEAK_TFLOPS["h100"] == (989.0, 67.0)


def test_plot_png(tmp_path):
    cfg = LoggingConfig(
        log_interval=1, metrics_file=str(tmp_path / "m.jsonl"), peak_tflops=1.0, progress_bar=False
    )
    _run(cfg, total=30)
    png = plot_metrics(tmp_path / "m.jsonl", tmp_path / "plots" / "loss.png", smooth=5)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert (
        mmkit_main(["plot", str(tmp_path / "m.jsonl"), str(tmp_path / "lr.png"), "--key", "lr", "--log"]) == 0
    )
    assert (tmp_path / "lr.png").stat().st_size > 5000
    with pytest.raises(ValueError, match="no numeric 'accuracy' values"):
        plot_metrics(tmp_path / "m.jsonl", tmp_path / "x.png", key="accuracy")
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
