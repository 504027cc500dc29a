"""`mmkit create-tiny` + `mmkit generate` end to end, through the console entry point."""

import numpy as np
import torch

import mmkit
from mmkit.cli.main import main
from mmkit.infer.media import read_video


def test_generate_t2v_npy_equals_python_api_and_mp4_png(tmp_path, capsys):
    model = tmp_path / "wan"
    assert main(["create-tiny", "wan-t2v", str(model), "--seed", "3"]) == 0
    args = [
        "generate",
        "t2v",
        "--model",
        str(model),
        "--prompt",
        "a blue square",
        "--height",
        "32",
        "--width",
        "32",
    ]
    args += ["--frames", "5", "--steps", "2", "--guidance", "3", "--seed", "5", "--device", "cpu"]
    assert main(args + ["--out", str(tmp_path / "v.npy")]) == 0
    assert "s/step" in capsys.readouterr().out
    got = np.load(tmp_path / "v.npy")
    pipe = mmkit.load_pipeline(model, task="t2v", device="cpu")
    want = pipe(
        "a blue square", height=32, width=32, num_frames=5, num_inference_steps=2, guidance_scale=3, seed=5
    ).frames[0]
    np.testing.assert_array_equal(got, want)
    assert main(args + ["--out", str(tmp_path / "v.mp4")]) == 0
    video = read_video(tmp_path / "v.mp4")
    assert video.shape == (5, 32, 32, 3)
    assert np.abs(video / 255.0 - want).mean() < 0.05
    assert (tmp_path / "v.png").is_file()


def test_generate_i2v_from_image_file(tmp_path):
    from PIL import Image

    model = tmp_path / "wan"
    assert main(["create-tiny", "wan-i2v", str(model)]) == 0
    Image.fromarray((np.random.RandomState(1).rand(32, 32, 3) * 255).astype(np.uint8)).save(
        tmp_path / "first.png"
    )
    args = [
        "generate",
        "i2v",
        "--model",
        str(model),
        "--prompt",
        "a cube",
        "--image",
        str(tmp_path / "first.png"),
    ]
    args += [
        "--height",
        "32",
        "--width",
        "32",
        "--frames",
        "5",
        "--steps",
        "2",
        "--out",
        str(tmp_path / "v.npy"),
    ]
    torch.manual_seed(0)
    assert main(args) == 0
    assert np.load(tmp_path / "v.npy").shape == (5, 32, 32, 3)
