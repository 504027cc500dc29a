"""No command deletes or overwrites what it did not create: every command that writes a folder or a
file is walked here against (a) the user's own non-empty folder, (b) an earlier mmkit output without
--overwrite, and, where cheap, (c) the replacement with --overwrite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmkit.cli.main import main
from mmkit.cli.mm_convert import main as mm_convert
from mmkit.outputs import MARKER, written_by

# (converter, action, fields(src, out)) of every mm-convert action
MM_CONVERT = [
    (
        "Qwen2_5_VLConverter",
        "hf_to_mm",
        lambda s, o: ["--cfg.mm_dir", str(o), "--cfg.hf_config.hf_dir", str(s)],
    ),
    ("Qwen2_5_VLConverter", "mm_to_hf", lambda s, o: ["--cfg.mm_dir", str(s), "--cfg.save_hf_dir", str(o)]),
    ("WanConverter", "resplit", lambda s, o: ["--cfg.source_path", str(s), "--cfg.target_path", str(o)]),
    (
        "WanConverter",
        "vae_convert",
        lambda s, o: ["--cfg.source_path", str(s), "--cfg.target_path", str(o), "--cfg.to", "diffusers"],
    ),
]
RECIPE = str(Path(__file__).resolve().parents[2] / "recipes" / "tiny" / "wan_t2v.toml")


def _user_folder(path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return path


def _unchanged(path: Path, files: dict[str, str]) -> bool:
    return all((path / n).read_text() == t for n, t in files.items()) and not (path / MARKER).exists()


def _refused(argv, capsys, *msgs) -> None:
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert "Traceback" not in err and all(m in err for m in msgs), err


def test_every_command_refuses_the_users_folders(tmp_path, capsys):
    mine = {
        "notes.txt": "keep",
        "model_index.json": "{}",
        "config.json": "{}",
        "ckpt/step_2/w": "x",
        "clip.mp4": "mine",
    }
    user = _user_folder(tmp_path / "user", mine)
    never = "was not written by mmkit; it is left untouched"
    # finding 2: `mmkit demo --out outputs` never deletes outputs/ckpt, even with --overwrite
    _refused(["demo", "--out", str(user)], capsys, never)
    _refused(["demo", "--out", str(user), "--overwrite"], capsys, never)
    # finding 3: create-tiny never rmtrees a folder with a model_index.json, nor writes into a Qwen folder
    from mmkit import registry

    kinds = registry.tiny_kinds()  # every family's writers: wan-*, qwen*, osp-*, the shapes models
    assert {"wan-t2v", "wan-i2v", "qwen2_5_vl", "osp-t2v", "wan-shapes", "qwen-shapes"} <= set(kinds)
    for kind in kinds:
        _refused(["create-tiny", kind, str(user), "--overwrite"], capsys, never)
    for kind in ("shapes", "shapes-qa"):
        _refused(["data", "synth", kind, str(user), "--overwrite", "--quiet"], capsys, never)
    _refused(["data", "features", str(user), "--config", RECIPE, "--overwrite"], capsys, never)
    src = tmp_path / "src"
    src.mkdir()
    # every converter refuses first, before reading the (empty) source, even with --overwrite
    for action in (["hf-to-mm", str(src)], ["resplit", str(src)], ["mm-to-hf", str(src)]):
        _refused(["convert", *action, str(user)], capsys, never)
        _refused(["convert", *action, str(user), "--overwrite"], capsys, never)
    for to in ("diffusers", "original"):
        _refused(["convert", "vae-convert", str(src), str(user), "--to", to, "--overwrite"], capsys, never)
    _refused(
        ["convert", "vae-convert", str(src), str(user), "--to", "diffusers", "--family", "opensoraplan"],
        capsys,
        never,
    )
    for conv, action, fields in MM_CONVERT:
        argv = [conv, action, *fields(src, user)]
        for extra in ([], ["--overwrite"]):
            assert mm_convert([*argv, *extra]) == 2, argv
            err = capsys.readouterr().err
            assert never in err and "Traceback" not in err, err
    _refused(
        ["generate", "t2v", "--model", str(src), "--prompt", "a", "--out", str(user / "clip.mp4")], capsys
    )
    assert _unchanged(user, mine)


def test_earlier_outputs_need_overwrite_and_are_replaced_whole(tmp_path, capsys):
    # data synth over an existing set: refused without --overwrite; with it, no orphan clips remain
    shapes = tmp_path / "shapes"
    synth = [
        "data",
        "synth",
        "shapes",
        str(shapes),
        "--frames",
        "3",
        "--height",
        "16",
        "--width",
        "16",
        "--quiet",
    ]
    assert main([*synth, "--videos", "3"]) == 0
    assert written_by(shapes) == "data synth shapes"
    _refused([*synth, "--videos", "2"], capsys, "earlier `mmkit data synth shapes` run", "--overwrite")
    assert len(list((shapes / "videos").iterdir())) == 3
    assert main([*synth, "--videos", "2", "--overwrite"]) == 0
    assert sorted(p.name for p in (shapes / "videos").iterdir()) == ["000000.mp4", "000001.mp4"]
    assert len(json.loads((shapes / "annotation.json").read_text())) == 2
    # create-tiny: refused over its own earlier folder without --overwrite, replaced with it
    qwen = tmp_path / "qwen"
    assert main(["create-tiny", "qwen2_5_vl", str(qwen)]) == 0
    (qwen / "stale.safetensors").write_text("from an older model")
    _refused(["create-tiny", "qwen2_5_vl", str(qwen)], capsys, "earlier `mmkit create-tiny qwen2_5_vl` run")
    assert main(["create-tiny", "qwen2_5_vl", str(qwen), "--overwrite"]) == 0
    assert not (qwen / "stale.safetensors").exists() and (qwen / "config.json").is_file()
    # a demo folder: refused without --overwrite (with it, the demo replaces only its own folder)
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / MARKER).write_text(json.dumps({"command": "demo"}))
    (demo / "loss.png").write_text("old")
    _refused(["demo", "--out", str(demo)], capsys, "earlier `mmkit demo` run", "--overwrite")
    # convert and mm-convert: an earlier output is refused without --overwrite, replaced whole with it
    conv = tmp_path / "conv"
    assert main(["convert", "hf-to-mm", str(qwen), str(conv), "--quiet"]) == 0
    assert written_by(conv) == "convert hf-to-mm" and (conv / "layout.json").is_file()
    (conv / "stale.txt").write_text("from an older conversion")
    _refused(["convert", "hf-to-mm", str(qwen), str(conv)], capsys, "earlier `mmkit convert hf-to-mm` run")
    mm = ["Qwen2_5_VLConverter", "hf_to_mm", "--cfg.mm_dir", str(conv), "--cfg.hf_config.hf_dir", str(qwen)]
    assert mm_convert(mm) == 2 and "--overwrite" in capsys.readouterr().err
    assert (conv / "stale.txt").is_file()
    assert main(["convert", "hf-to-mm", str(qwen), str(conv), "--quiet", "--overwrite"]) == 0
    assert not (conv / "stale.txt").exists() and (conv / "layout.json").is_file()
    (conv / "stale.txt").write_text("again")
    assert mm_convert([*mm, "--cfg.parallel_config.tp_size", "2", "--overwrite"]) == 0
    assert not (conv / "stale.txt").exists() and json.loads((conv / "layout.json").read_text())["tp"] == 2
    assert written_by(conv) == "convert hf-to-mm"
    # the converted checkpoint converts back over its own earlier export only with --overwrite
    back = tmp_path / "back"
    assert main(["convert", "mm-to-hf", str(conv), str(back), "--quiet"]) == 0
    assert written_by(back) == "convert mm-to-hf" and (back / "config.json").is_file()
    _refused(["convert", "mm-to-hf", str(conv), str(back)], capsys, "earlier `mmkit convert mm-to-hf` run")
    assert main(["convert", "mm-to-hf", str(conv), str(back), "--quiet", "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary folders


def test_a_failed_conversion_keeps_the_earlier_output(tmp_path, monkeypatch):
    """`new_dir` swaps a replaced output in only when complete: a crash while writing, or in the final
    rename, leaves the earlier output where it was, and no temporary folder behind."""
    import os

    from mmkit.checkpoint.common import new_dir

    out = tmp_path / "conv"
    with new_dir(out, "convert resplit") as tmp:
        (tmp / "w").write_text("old")
    with pytest.raises(RuntimeError), new_dir(out, "convert resplit", overwrite=True) as tmp:
        (tmp / "w").write_text("new")
        raise RuntimeError("killed while writing")
    assert (out / "w").read_text() == "old"

    real = os.rename

    def rename(a, b):
        if ".tmp-" in str(a):
            raise OSError("disk gone during the swap")
        return real(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError), new_dir(out, "convert resplit", overwrite=True) as tmp:
        (tmp / "w").write_text("new")
    assert (out / "w").read_text() == "old" and written_by(out) == "convert resplit"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv"]
    monkeypatch.setattr(os, "rename", real)
    with new_dir(out, "convert resplit", overwrite=True) as tmp:
        (tmp / "w").write_text("new")
    assert (out / "w").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["conv"]


def test_features_overrides_after_config(tmp_path, monkeypatch):
    """`mmkit data features OUT --config R a.b=c` (finding 10): the override reaches the config."""
    import mmkit.config

    seen = {}

    def spy(argv):
        seen["argv"] = argv
        raise ValueError("stop before the encoders load")

    monkeypatch.setattr(mmkit.config, "parse_cli", spy)
    argv = [
        "data",
        "features",
        str(tmp_path / "f"),
        "--config",
        RECIPE,
        "train.steps=3",
        "--data.num_frames",
        "5",
    ]
    assert main(argv) == 2
    assert seen["argv"] == ["--config", RECIPE, "--train.steps=3", "--data.num_frames", "5"]


def test_mm_convert_without_arguments_is_a_usage_error(capsys):
    assert mm_convert([]) == 2
    err = capsys.readouterr().err
    assert "usage" in err.lower() or "mm-convert Qwen2_5_VLConverter" in err
    assert mm_convert(["--help"]) == 0


@pytest.mark.parametrize("kind", ["unmarked-file", "bad-marker"])
def test_marker_edge_cases(tmp_path, kind):
    from mmkit.outputs import OutputExistsError, claim_output_dir

    if kind == "unmarked-file":
        (tmp_path / "f").write_text("x")
        with pytest.raises(OutputExistsError, match="is a file"):
            claim_output_dir(tmp_path / "f", "demo", overwrite=True)
    else:  # a damaged marker still marks an mmkit folder: replaceable with overwrite only
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / MARKER).write_bytes(b"\xff")
        with pytest.raises(OutputExistsError, match="--overwrite"):
            claim_output_dir(tmp_path / "d", "demo")
        assert claim_output_dir(tmp_path / "d", "demo", overwrite=True) == tmp_path / "d"
        assert written_by(tmp_path / "d") == "demo"
