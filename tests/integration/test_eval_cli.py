"""`mmkit eval shapes|shapes-qa` on the shipped models, at smoke-test size (2 prompts, 2 steps)."""

from __future__ import annotations

import json

import pytest

from mmkit.cli.main import main
from mmkit.data.synth_eval import ATTRIBUTES
from mmkit.infer.evaluate import QA_EVAL_KINDS


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    assert main(["create-tiny", "wan-shapes", str(root / "wan")]) == 0
    assert main(["create-tiny", "qwen-shapes", str(root / "qwen")]) == 0
    return root


def _json_line(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_eval_shapes_two_prompts(folders, tmp_path, capsys):
    args = ["eval", "shapes", "--model", str(folders / "wan"), "--prompts", "2", "--steps", "2"]
    assert main([*args, "--out", str(tmp_path), "--json"]) == 0
    acc = _json_line(capsys.readouterr().out)
    assert set(acc) == set(ATTRIBUTES) and all(v in (0.0, 0.5, 1.0) for v in acc.values())
    for name in ("00.mp4", "00.png", "01.mp4", "01.png", "contact_sheet.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    held = json.loads((folders / "wan" / "heldout_prompts.json").read_text())
    assert (tmp_path / "01.txt").read_text().strip() == held[1]


def test_eval_shapes_qa_two_images(folders, capsys):
    assert main(["eval", "shapes-qa", "--model", str(folders / "qwen"), "--images", "2", "--json"]) == 0
    acc = _json_line(capsys.readouterr().out)
    assert set(acc) == set(QA_EVAL_KINDS) and all(0.0 <= v <= 1.0 for v in acc.values())


def test_eval_refuses_more_prompts_than_held_out(folders, capsys):
    assert main(["eval", "shapes", "--model", str(folders / "wan"), "--prompts", "99"]) == 2
    assert "holds 32 held-out prompts" in capsys.readouterr().err
