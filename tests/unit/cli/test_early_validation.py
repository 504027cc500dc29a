"""`mmkit generate` and `mmkit chat` check every flag, input image, output path, weight file and the
memory a request needs before any weights load (the loaders are replaced by a tripwire here)."""

from __future__ import annotations

import pytest
from data_helpers import make_image, write_bomb_png

from mmkit.cli.main import main
from mmkit.models.qwen2_5_vl.tiny import create_tiny_qwen2_5_vl


class Loaded(Exception):
    """Raised by the tripwire: a weight loader was reached."""


@pytest.fixture()
def tripwire(monkeypatch):
    def trip(*_a, **_k):
        raise Loaded

    monkeypatch.setattr("mmkit.infer.pipelines.load_pipeline", trip)
    monkeypatch.setattr("mmkit.models.qwen2_5_vl.load.load_vlm", trip)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return create_tiny_qwen2_5_vl(tmp_path_factory.mktemp("q") / "qwen", seed=0)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    make_image(32, 32, 0).save(d / "ok.png")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    write_bomb_png(d / "bomb.png")
    return d


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("mmkit ") and "Traceback" not in err
    return err


def test_generate_flags_are_checked_before_weights_load(wan_train_root, images, tmp_path, tripwire, capsys):
    wan = str(wan_train_root / "wan")
    out = str(tmp_path / "v.mp4")
    base = ["generate", "t2v", "--model", wan, "--height", "32", "--width", "32", "--frames", "5"]
    cases = [
        (["--prompt", "a", "--steps", "0"], "--steps 0: must be >= 1"),
        (["--prompt", "a", "--guidance", "-5"], "--guidance -5.0: must be a finite number >= 0"),
        (["--prompt", "a", "--guidance", "nan"], "--guidance nan"),
        (["--prompt", "a", "--flow-shift", "0"], "--flow-shift 0.0: must be a finite number > 0"),
        (["--prompt", "  "], "--prompt: is empty"),
        (["--prompt", "a", "--image", str(images / "ok.png")], "t2v takes no image"),
    ]
    for extra, msg in cases:
        assert main([*base, *extra, "--out", out]) == 2, extra
        assert msg in _error(capsys)
    i2v = ["generate", "i2v", "--model", wan, "--prompt", "a", "--out", out, "--image"]
    for name in ("corrupt.png", "bomb.png"):
        assert main([*i2v, str(images / name)]) == 2
        assert f"{name}: not a readable image" in _error(capsys)
    (tmp_path / "afile").write_text("")
    assert main([*base, "--prompt", "a", "--out", str(tmp_path / "afile" / "v.mp4")]) == 2
    assert "cannot create the folder" in _error(capsys)
    (tmp_path / "old.mp4").write_text("keep")
    assert main([*base, "--prompt", "a", "--out", str(tmp_path / "old.mp4")]) == 2
    assert "the file exists; pass --overwrite" in _error(capsys)
    assert (tmp_path / "old.mp4").read_text() == "keep"
    # finding 8: 8192 x 8192 x 81 frames is refused with the estimate, not grown into for minutes
    big = ["--height", "8192", "--width", "8192", "--frames", "81", "--prompt", "a", "--out", out]
    assert main([*base[:4], *big]) == 2
    err = _error(capsys)
    assert "this generation needs about" in err and "GiB free" in err and "VAE decode" in err
    # all flags valid: the first thing after the checks is the (tripwired) load
    with pytest.raises(Loaded):
        main([*base, "--prompt", "a", "--out", out])


def test_generate_memory_warning_and_refusal_follow_the_device(
    wan_train_root, tmp_path, tripwire, monkeypatch
):
    from mmkit.infer import budget
    from mmkit.infer.pipelines import estimate_memory

    need = sum(estimate_memory(wan_train_root / "wan", "t2v", height=32, width=32, num_frames=5).values())
    argv = ["generate", "t2v", "--model", str(wan_train_root / "wan"), "--prompt", "a", "--height", "32"]
    argv += ["--width", "32", "--frames", "5", "--out", str(tmp_path / "v.npy")]
    monkeypatch.setattr(budget, "device_memory", lambda _d: int(need / 0.9))
    with pytest.warns(UserWarning, match="this generation needs about"), pytest.raises(Loaded):
        main(argv)
    monkeypatch.setattr(budget, "device_memory", lambda _d: need - 1)
    assert main(argv) == 2


def test_chat_flags_and_images_are_checked_before_weights_load(qwen, images, tripwire, capsys):
    base = ["chat", "--model", str(qwen), "--prompt", "hi"]
    cases = [
        (["--temperature", "nan"], "temperature=nan: must be a finite number >= 0"),
        (["--temperature", "-1"], "temperature=-1.0"),
        (["--top-p", "0"], "top_p=0.0: must be in (0, 1]"),
        (["--top-p", "nan"], "top_p=nan"),
        (["--max-new-tokens", "0"], "max_new_tokens=0"),
        (["--prompt", " "], "--prompt: is empty"),
        (["--image", str(images / "corrupt.png")], "corrupt.png: not a readable image"),
        (["--image", str(images / "bomb.png")], "bomb.png: not a readable image"),
        (["--video", str(images / "corrupt.png")], "corrupt.png: not a readable video"),
    ]
    for extra, msg in cases:
        assert main([*base, *extra]) == 2, extra
        assert msg in _error(capsys)


def test_chat_max_new_tokens_is_capped_to_the_context(qwen, tripwire, monkeypatch):
    from mmkit.cli import chat

    seen = {}
    real = chat.precheck

    def spy(args):
        real(args)
        seen["max_new_tokens"] = args.max_new_tokens

    monkeypatch.setattr(chat, "precheck", spy)
    with pytest.warns(UserWarning, match="more than the model's context \\(4096 tokens.*capped to 4096"):
        with pytest.raises(Loaded):
            main(["chat", "--model", str(qwen), "--prompt", "hi", "--max-new-tokens", "100000000"])
    assert seen["max_new_tokens"] == 4096


def test_chat_kv_cache_beyond_the_device_is_refused(qwen, tripwire, monkeypatch, capsys):
    from mmkit.infer import budget

    monkeypatch.setattr(budget, "device_memory", lambda _d: 2**20)  # 1 MiB free
    assert main(["chat", "--model", str(qwen), "--prompt", "hi", "--max-new-tokens", "4000"]) == 2
    err = _error(capsys)
    assert "this chat needs about" in err and "KV cache" in err and "lower --max-new-tokens" in err


def test_generate_names_a_damaged_or_pickled_weight_file(wan_train_root, tmp_path, tripwire, capsys):
    import shutil

    wan = shutil.copytree(wan_train_root / "wan", tmp_path / "wan")
    argv = ["generate", "t2v", "--model", str(wan), "--prompt", "a", "--height", "32", "--width", "32"]
    argv += ["--frames", "5", "--out", str(tmp_path / "v.npy")]
    shard = sorted((wan / "text_encoder").glob("*.safetensors"))[0]
    intact = shard.read_bytes()
    shard.write_bytes(intact[: len(intact) // 2])  # an interrupted download
    assert main(argv) == 2
    assert f"{shard}: " in _error(capsys)
    shard.write_bytes(intact)
    vae = next((wan / "vae").glob("*.safetensors"))
    vae.rename(vae.with_suffix(".bin"))  # a pickled VAE: never handed to torch.load
    assert main(argv) == 2
    assert "holds only pickled weights" in _error(capsys)


def test_engine_caps_new_tokens_to_the_context(qwen):
    """The Python API too: the KV cache never grows past the model's context (finding 8)."""
    from mmkit.infer.chat import ChatSession
    from mmkit.infer.vlm import SamplingParams
    from mmkit.models.qwen2_5_vl.load import load_vlm

    model, processor = load_vlm(qwen, device="cpu")
    chat = ChatSession(model, processor, SamplingParams(max_new_tokens=10**8, eos_token_ids=(-5,)))
    prompt_len = len(
        processor(processor.apply_chat_template([{"role": "user", "content": "hi"}]))["input_ids"][0]
    )
    model.cfg.text.max_position_embeddings = prompt_len + 3
    with pytest.warns(UserWarning, match="leaves 3 of the model's"):
        reply = chat.ask("hi")
    assert len(reply.token_ids) == 3
    model.cfg.text.max_position_embeddings = prompt_len
    chat.reset()
    with pytest.raises(ValueError, match=f"the prompt is {prompt_len} tokens"):
        chat.ask("hi")
