"""Video/image IO: mp4 round trip through PyAV, npy, png grids, and clear errors for bad input."""

import av
import numpy as np
import pytest
import torch
from PIL import Image

from mmkit.infer.media import frame_grid, load_image, read_video, save_video


def _video(t=5, h=32, w=48):
    """Smooth frames (T, H, W, 3) in [0.1, 0.9]: R follows x, G follows y, B follows time."""
    tt, yy, xx = np.meshgrid(np.linspace(0, 1, t), np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    return (0.1 + 0.8 * np.stack([xx, yy, tt], axis=-1)).astype(np.float32)


def test_mp4_round_trip_keeps_frames_size_order_and_colours(tmp_path):
    frames = _video()
    path = save_video(frames, tmp_path / "sub" / "clip.mp4")
    assert path == tmp_path / "sub" / "clip.mp4"
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        assert stream.average_rate == 16
    back = read_video(path)
    assert back.shape == (5, 32, 48, 3) and back.dtype == np.uint8
    err = np.abs(back.astype(np.float64) - frames * 255)
    # Lossy H.264 + 4:2:0 chroma: small on average; a channel swap or frame reorder would be ~100.
    assert err.mean() < 3.0 and err.max() < 24
    assert np.all(np.diff(back[..., 2].mean(axis=(1, 2))) > 20)  # blue rises frame by frame


def test_mp4_fps_and_torch_input(tmp_path):
    frames = torch.from_numpy(_video(t=3)).to(torch.bfloat16)
    path = save_video(frames, tmp_path / "slow.MP4", fps=8)
    with av.open(str(path)) as c:
        assert c.streams.video[0].average_rate == 8
    assert read_video(path).shape == (3, 32, 48, 3)


def test_mp4_odd_size_is_padded_to_even_not_cropped(tmp_path):
    frames = _video(t=3, h=33, w=47)
    back = read_video(save_video(frames, tmp_path / "odd.mp4"))
    assert back.shape == (3, 34, 48, 3)
    err = np.abs(back[:, :33, :47].astype(np.float64) - frames * 255)
    assert err.mean() < 3.0


def test_npy_holds_float_frames_clipped_to_unit_range(tmp_path):
    frames = _video(t=4, h=8, w=8)
    frames[0, 0, 0] = [-0.5, 1.5, 0.25]  # out of range values from a sampler get clipped
    back = np.load(save_video(torch.from_numpy(frames), tmp_path / "v.npy"))
    assert back.dtype == np.float32 and back.shape == (4, 8, 8, 3)
    np.testing.assert_array_equal(back[0, 0, 0], [0.0, 1.0, 0.25])
    np.testing.assert_array_equal(back[1:], frames[1:])


def test_png_grid_is_near_square_and_in_frame_order(tmp_path):
    frames = np.stack([np.full((16, 20, 3), i / 10, np.float32) for i in range(5)])
    img = np.asarray(Image.open(save_video(frames, tmp_path / "grid.png")))
    assert img.shape == (2 * 16, 3 * 20, 3)  # 5 frames -> 3 columns x 2 rows
    for i in range(5):
        r, c = divmod(i, 3)
        assert (img[r * 16 : (r + 1) * 16, c * 20 : (c + 1) * 20] == round(i / 10 * 255)).all()
    assert (img[16:, 40:] == 0).all()  # the unused sixth cell is black
    assert frame_grid(frames, cols=5).shape == (16, 100, 3)
    assert frame_grid(frames, cols=1).shape == (80, 20, 3)
    assert frame_grid(frames[:4]).shape == (32, 40, 3)
    assert frame_grid(np.zeros((9, 2, 2, 3))).shape == (6, 6, 3)


def test_bad_suffix_shape_and_values_are_clear_errors(tmp_path):
    frames = _video(t=2, h=8, w=8)
    with pytest.raises(ValueError, match=r"'\.gif'.*\.mp4, \.npy, \.png"):
        save_video(frames, tmp_path / "v.gif")
    with pytest.raises(ValueError, match="suffix '\\(none\\)'"):
        save_video(frames, tmp_path / "video")
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\), got shape \(1, 2, 8, 8, 3\)"):
        save_video(frames[None], tmp_path / "v.mp4")
    bad = frames.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        save_video(bad, tmp_path / "v.npy")
    with pytest.raises(ValueError, match="fps"):
        save_video(frames, tmp_path / "v.mp4", fps=0)
    with pytest.raises(ValueError, match="cols"):
        frame_grid(frames, cols=0)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_load_image_rgb_missing_and_corrupt(tmp_path):
    rgba = np.zeros((6, 7, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    Image.fromarray(rgba).save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert img.mode == "RGB" and img.size == (7, 6) and img.getpixel((0, 0)) == (200, 0, 0)
    assert load_image(Image.fromarray(rgba)).mode == "RGB"

    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="junk.png"):
        load_image(tmp_path / "junk.png")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.png"):
        load_image(tmp_path / "cut.png")


def test_read_video_missing_and_corrupt(tmp_path):
    with pytest.raises(FileNotFoundError, match="gone.mp4"):
        read_video(tmp_path / "gone.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"\x00garbage" * 64)
    with pytest.raises(ValueError, match="junk.mp4"):
        read_video(tmp_path / "junk.mp4")
