"""`mmkit demo` end to end at a few steps (what `make demo` runs at full length)."""

import json
from pathlib import Path

from mmkit.cli.main import main


def test_demo_small(tmp_path, capsys):
    args = [
        "--steps",
        "6",
        "--videos",
        "8",
        "--gen-steps",
        "2",
        "--shapes-prompts",
        "1",
        "--shapes-steps",
        "2",
    ]
    assert main(["demo", "--out", str(tmp_path), *args]) == 0
    names = ["scratch_heldout.mp4", "scratch_heldout.png", "loss.png", "contact_sheet.png", "vlm_image.png"]
    for name in [*names, "shapes_heldout/00.mp4", "shapes_heldout/00.png"]:
        assert (tmp_path / name).stat().st_size > 0, name
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["train"]["steps"] == 6 and len(summary["shapes"]["prompts"]) == 1
    assert set(summary["shapes"]["accuracy"]) == {"background", "color", "shape", "direction"}
    assert [r["truth"] for r in summary["chat"]] and all("answer" in r for r in summary["chat"])
    cache = summary["cache"]
    assert cache["speedup"] > 0 and 0 <= cache["skipped"] < 1 and cache["psnr_worst"] <= cache["psnr_mean"]
    assert (tmp_path / "contact_sheet_cached.png").stat().st_size > 0
    assert all(Path(p).exists() for p in summary["pictures"].values())
    assert (tmp_path / "wan-trained" / "model_index.json").is_file()
    out = capsys.readouterr().out
    assert "demo outputs:" in out and "(truth: " in out and "adaptive step cache:" in out
