"""Bad input to the Wan pipelines and `mmkit generate`: one clear error, before any compute."""

import json
import shutil

import pytest

import mmkit
from mmkit.cli.main import main
from mmkit.models.wan.tiny import create_tiny_wan


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return create_tiny_wan(tmp_path_factory.mktemp("wan") / "t2v", task="t2v", seed=2)


@pytest.fixture(scope="module")
def pipe(folder):
    return mmkit.load_pipeline(folder, task="t2v", device="cpu")


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(num_frames=8), "frames=8: must be 4k\\+1"),
        (dict(height=40), "height=40: must be a positive multiple of 16"),
        (dict(width=20), "width=20: must be a positive multiple of 16"),
        (dict(num_inference_steps=0), "steps=0"),
        (dict(output_type="gif"), "output_type='gif'"),
        (dict(sampler="ddim"), "sampler='ddim'"),
    ],
)
def test_pipeline_rejects(pipe, kw, match):
    args = dict(height=32, width=32, num_frames=5, num_inference_steps=1, progress=False) | kw
    with pytest.raises(ValueError, match=match):
        pipe("a cube", **args)


def test_long_prompt_is_truncated_with_a_warning(pipe):
    with pytest.warns(UserWarning, match="truncated"):
        out = pipe(
            "red cube " * 400, height=32, width=32, num_frames=1, num_inference_steps=1, progress=False
        )
    assert out.frames.shape == (1, 1, 32, 32, 3)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--frames", "10"], "--frames 10: must be 4k\\+1"),
        (["--height", "50"], "--height 50: must be a positive multiple of 16"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--dtype", "fp64"], "unknown dtype 'fp64'"),
        (["--out", "x.gif"], "suffix must be one of"),
    ],
)
def test_cli_rejects(folder, tmp_path, capsys, argv, match):
    base = ["generate", "t2v", "--model", str(folder), "--prompt", "x", "--out", str(tmp_path / "o.mp4")]
    assert main(base + argv) == 2
    assert pytest.importorskip("re").search(match, capsys.readouterr().err)


def test_i2v_without_image(folder, tmp_path, capsys):
    assert (
        main(["generate", "i2v", "--model", str(folder), "--prompt", "x", "--out", str(tmp_path / "o.mp4")])
        == 2
    )
    assert "i2v needs --image" in capsys.readouterr().err


def test_missing_component_names_the_file(folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(FileNotFoundError, match="component folder missing: .*vae"):
        mmkit.load_pipeline(broken, task="t2v", device="cpu")
    shutil.copytree(folder / "vae", broken / "vae")
    (broken / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        mmkit.load_pipeline(broken, task="t2v", device="cpu")
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    with pytest.raises(ValueError, match="does not list the component 'transformer'"):
        mmkit.load_pipeline(broken, task="t2v", device="cpu")


def test_t2v_folder_as_i2v_is_refused(folder):
    with pytest.raises(ValueError, match="component 'image_encoder'.*i2v"):
        mmkit.load_pipeline(folder, task="i2v", device="cpu")
