"""LLaVA/ShareGPT -> messages conversion on a fixture with every record kind, and the `mmkit data` CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmkit.cli.main import main
from mmkit.data.formats import convert_llava, convert_llava_file, read_records

FIXTURE = Path(__file__).parent / "fixtures" / "llava_mixed.json"

EXPECTED = [
    {
        "messages": [
            {"role": "user", "content": "<image>What is in the picture?"},
            {"role": "assistant", "content": "A red square."},
        ],
        "images": ["/data/coco/1.jpg"],
    },
    {
        "messages": [
            {"role": "user", "content": "What colour is it?\n<image>"},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "And the shape?"},
            {"role": "assistant", "content": "A circle."},
        ],
        "images": ["/data/coco/2.jpg"],
    },
    {
        "messages": [
            {"role": "user", "content": "<image><image>Are they the same?"},
            {"role": "assistant", "content": "No."},
        ],
        "images": ["/data/a.png", "/abs/b.png"],
    },
    {
        "messages": [
            {"role": "user", "content": "<video>What happens?"},
            {"role": "assistant", "content": "A dog runs."},
        ],
        "videos": ["/data/clips/v.mp4"],
    },
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "<image>Describe it."},
            {"role": "assistant", "content": "A tree."},
        ],
        "images": ["/data/coco/3.jpg"],
    },
]

# index in the fixture -> a phrase the reason must contain
EXPECTED_PROBLEMS = {
    6: "unknown role 'bot'",
    7: "record is a str",
    8: '"conversations" is missing',
    9: "2 <image> tag(s) but 1 image path(s)",
    10: "end on assistant",
    11: "turn 0 must be",
}


def test_convert_every_record_kind():
    out, report = convert_llava(read_records(FIXTURE), image_root="/data", progress=False)
    assert out == EXPECTED
    assert report.total == 12 and report.converted == 6
    assert [i for i, _ in report.problems] == sorted(EXPECTED_PROBLEMS)
    for i, reason in report.problems:
        assert EXPECTED_PROBLEMS[i] in reason, (i, reason)


def test_no_image_root_keeps_paths_and_jsonl_bad_line(tmp_path):
    src = tmp_path / "in.jsonl"
    good = {
        "image": "x.jpg",
        "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}],
    }
    src.write_text(json.dumps(good) + "\n{not json\n\n" + json.dumps(good) + "\n")
    dst = tmp_path / "out.jsonl"
    report = convert_llava_file(src, dst, progress=False)
    assert report.total == 3 and report.converted == 2
    assert report.problems == [(1, "record is null or its JSONL line is not valid JSON")]
    lines = dst.read_text().splitlines()
    assert [json.loads(s) for s in lines] == [
        {
            "messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "A"}],
            "images": ["x.jpg"],
        }
    ] * 2


def test_media_tag_in_reply_is_malformed():
    rec = {
        "image": "x.jpg",
        "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "<image>"}],
    }
    out, report = convert_llava([rec], progress=False)
    assert out == [] and "assistant turn" in report.problems[0][1]


def test_cli_convert_llava(tmp_path, capsys):
    dst = tmp_path / "sub" / "out.json"
    rc = main(["data", "convert", "llava", str(FIXTURE), str(dst), "--image-root", "/data"])
    assert rc == 0
    assert json.loads(dst.read_text()) == EXPECTED
    cap = capsys.readouterr()
    problem_lines = [s for s in cap.err.splitlines() if s.startswith("record ")]
    assert [int(s.split()[1].rstrip(":")) for s in problem_lines] == sorted(EXPECTED_PROBLEMS)
    assert "converted 6/12 records, skipped 6" in cap.out


def test_cli_errors(tmp_path, capsys):
    assert main(["data", "convert", "llava", str(tmp_path / "missing.json"), str(tmp_path / "o.json")]) == 2
    assert "missing.json does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"conversations": []}]))
    assert (
        main(["data", "convert", "llava", str(bad), str(tmp_path / "o.json"), "--quiet"]) == 1
    )  # nothing converted
    with pytest.raises(SystemExit):
        main(["data", "convert", "sharegpt4v", "a", "b"])  # unknown format: argparse error
