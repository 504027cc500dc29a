"""`mmkit demo` end to end at a few steps (what `make demo` runs at full length)."""

import json

from mmkit.cli.main import main


def test_demo_small(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "6", "--videos", "8", "--gen-steps", "2"]) == 0
    for name in ("heldout_0.mp4", "heldout_0.png", "heldout_1.mp4", "heldout_1.png", "loss.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 6 and len(summary["prompts"]) == 2
    assert (tmp_path / "wan-trained" / "model_index.json").is_file()
    assert "demo outputs:" in capsys.readouterr().out
