"""`mmkit accel search` on a tiny model (scores, top 3, best.json, resume) and `mmkit generate` with caches."""

import json

import numpy as np
import pytest

from mmkit.cli.main import main
from mmkit.infer.accel.search import dit_candidates, dit_target, predicted_speedup


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wan") / "t2v"
    assert main(["create-tiny", "wan-t2v", str(folder), "--seed", "3"]) == 0
    return folder


SIZE = ["--height", "32", "--width", "32", "--frames", "5", "--device", "cpu", "--guidance", "3"]


def test_candidates_reach_the_target_least_aggressive_first():
    cands = dit_candidates(30, 50, 1.6, max_candidates=8)
    preds = [predicted_speedup(c, 50, 30) for c in cands]
    assert all(p >= 1.6 for p in preds) and preds == sorted(preds) and len(cands) == 8
    # MindIE's Wan2.1 setting skips 20 of 30 blocks on 13 of 50 steps: 1 / (1 - 260 / 1500)
    from mmkit.infer.accel.cache import DiTCacheConfig

    assert predicted_speedup(DiTCacheConfig(20, 2, 47, 10, 30), 50, 30) == pytest.approx(1500 / 1240)
    # with the DiT at 80% of the wall time: 1 / (0.2 + 0.8 * 1240 / 1500)
    assert predicted_speedup(DiTCacheConfig(20, 2, 47, 10, 30), 50, 30, 0.8) == pytest.approx(
        1 / (0.2 + 0.8 * 1240 / 1500)
    )
    assert dit_target(1.6, 0.8) == pytest.approx(0.8 / (1 / 1.6 - 0.2))
    with pytest.raises(ValueError, match="at most 5.00x"):
        dit_target(6.0, 0.8)


def test_search_writes_best_resumes_and_generate_reuses_it(model, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    out = tmp_path / "search"
    args = ["accel", "search", "--model", str(model), "--prompts", str(prompts), "--steps", "6"]
    args += ["--target-speedup", "1.05", "--max-candidates", "3", "--out", str(out), "--no-progress", *SIZE]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "top 3 of 3 candidates" in text and text.count("PSNR") == 3
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    # predicted on the whole generation: the DiT's share of the reference's wall time, measured
    share = rows[0]["dit_share"]
    assert 0 < share < 1 and f"the denoise loop took {share:.0%}" in text
    assert len(rows) == 3 and all(r["predicted_speedup"] >= 1.05 and r["psnr"] > 0 for r in rows)
    best = json.loads((out / "best.json").read_text())
    assert best["psnr"] == max(r["psnr"] for r in rows)
    assert main(args) == 0  # resumed: nothing is scored again
    assert len((out / "results.jsonl").read_text().splitlines()) == 3
    capsys.readouterr()

    gen = ["generate", "t2v", "--model", str(model), "--prompt", "a red circle", "--steps", "6", *SIZE]
    assert main(gen + ["--cache-config", str(out / "best.json"), "--out", str(tmp_path / "v.npy")]) == 0
    assert "cache dit:" in capsys.readouterr().out
    mindie = [
        "--use_attentioncache",
        "--start_step",
        "1",
        "--attentioncache_interval",
        "2",
        "--end_step",
        "5",
    ]
    assert main(gen + mindie + ["--out", str(tmp_path / "a.npy")]) == 0
    assert "self-attention outputs reused" in capsys.readouterr().out
    assert (
        main(gen + ["--cache", "adaptive", "--cache-threshold", "0.5", "--out", str(tmp_path / "b.npy")]) == 0
    )
    assert "DiT block evaluations skipped" in capsys.readouterr().out
    calib = tmp_path / "calib.json"
    cal = ["accel", "calibrate", "--model", str(model), "--prompt", "a red circle", "--steps", "6", *SIZE]
    assert main(cal + ["--out", str(calib), "--no-progress"]) == 0
    written = json.loads(calib.read_text())
    text = capsys.readouterr().out
    assert written["steps"] == 6 and "calibrated at 6 steps" in text
    sens = written["sensitivity"]  # one probe per step 1..5, each a generation that skipped that step
    assert sens["steps"] == [1, 2, 3, 4, 5] and len(sens["weight"]) == 5 and min(sens["latent_change"]) > 0
    assert (
        np.median(sens["weight"]) == pytest.approx(1.0) and "sensitivity weight by sigma (5 probes)" in text
    )
    for steps, warned in (("6", False), ("2", True)):  # 2 steps is outside the measured 0.6x..1x
        run = [*gen, "--steps", steps, "--cache", "adaptive", "--cache-calibration", str(calib)]
        assert main(run + ["--out", str(tmp_path / f"d{steps}.npy")]) == 0
        text = capsys.readouterr().out
        assert ("made at 6 steps and this run has --steps 2" in text) == warned
        assert "DiT block evaluations skipped" in text
    assert main(gen + ["--cache", "dit", "--cache-threshold", "0.1", "--out", str(tmp_path / "c.npy")]) == 2
    assert "--cache-threshold" in capsys.readouterr().err
