"""Fuzz: random corruptions (truncate, flip bytes, empty file) of one file of a Hugging Face folder or a
data folder end in a named error (the file or its folder in the message) or a counted skip, never a
traceback. Fixed seed; `MMKIT_FUZZ_N=200` runs more cases per target."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest

from mmkit.cli.main import main
from mmkit.data.sft import SFTDataset
from mmkit.data.synth import synth_shapes, synth_shapes_qa
from mmkit.data.video import SampleKey, VideoDataset
from mmkit.models.qwen2_5_vl.tiny import create_tiny_qwen2_5_vl

N = int(os.environ.get("MMKIT_FUZZ_N", "4"))  # cases per target
SEED = 1234


def corrupt(folder: Path, rng: random.Random) -> tuple[Path, str]:
    """Damage one random file of `folder` in place; returns it and what was done."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    path = rng.choice(files)
    data = bytearray(path.read_bytes())
    how = rng.choice(("truncate", "flip", "empty"))
    if how == "truncate" and len(data) > 1:
        data = data[: rng.randrange(1, len(data))]
    elif how == "flip" and data:
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(min(len(data), 4096))  # mostly headers: where damage shows at all
            data[i] ^= 1 << rng.randrange(8)
    else:
        how, data = "empty", b""
    path.write_bytes(bytes(data))
    return path, how


def named(message: str, path: Path) -> bool:
    return path.name in message or str(path.parent) in message


def cases(pristine: Path, tmp: Path, target: str):
    rng = random.Random(f"{SEED}-{target}")
    for i in range(N):
        folder = tmp / f"{target}-{i}"
        shutil.copytree(pristine, folder)
        yield folder, *corrupt(folder, rng)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return create_tiny_qwen2_5_vl(tmp_path_factory.mktemp("fuzz") / "qwen", seed=0)


@pytest.mark.parametrize("command", ["chat", "convert"])
def test_hf_folder(qwen, tmp_path, capsys, command):
    bad = []
    for folder, path, how in cases(qwen, tmp_path, command):
        if command == "chat":
            argv = [
                "chat",
                "--model",
                str(folder),
                "--prompt",
                "hi",
                "--max-new-tokens",
                "2",
                "--device",
                "cpu",
            ]
        else:
            argv = ["convert", "hf-to-mm", str(folder), str(tmp_path / f"out-{folder.name}"), "--quiet"]
        try:
            rc = main(argv)
        except Exception as e:  # a traceback: the CLI only turns named errors into exit code 2
            rc, err = "traceback", f"{type(e).__name__}: {e}"
        else:
            err = capsys.readouterr().err
        if not (rc == 0 or (rc == 2 and named(err, path))):
            bad.append((path.name, how, rc, err[-300:]))
    assert not bad, "\n".join(map(str, bad))


def test_data_folders(tmp_path, tmp_path_factory):
    from mmkit.models.qwen2_5_vl.processor import Qwen2_5_VLProcessor
    from mmkit.models.qwen2_5_vl.tokenizer import build_tiny_tokenizer

    root = tmp_path_factory.mktemp("fuzz_data")
    build_tiny_tokenizer(root / "tok", min_pixels=28 * 28, max_pixels=56 * 56)
    proc = Qwen2_5_VLProcessor.from_pretrained(root / "tok")
    qa = synth_shapes_qa(root / "qa", images=3, size=32, seed=0, progress=False).parent
    shapes = synth_shapes(
        root / "shapes", videos=3, num_frames=5, height=16, width=16, seed=0, progress=False
    )

    bad = []

    def read_all(ds):
        return [ds[SampleKey(i, epoch=0, consumed=i + 1)] for i in range(len(ds))]

    for folder, path, how in cases(qa, tmp_path, "qa"):
        try:
            ds = SFTDataset(str(folder / "qa.json"), proc, progress=False)
            read_all(ds)
        except (ValueError, FileNotFoundError) as e:
            if not (named(str(e), path) or "none of the" in str(e)):
                bad.append((path.name, how, str(e)[-300:]))
        except Exception as e:
            bad.append((path.name, how, f"traceback {type(e).__name__}: {e}"))
    for folder, path, how in cases(shapes.root, tmp_path, "shapes"):
        (folder / "data.txt").write_text(f"{folder},{folder / 'annotation.json'}\n")  # the copy's own paths
        try:
            ds = VideoDataset(folder / "data.txt", 5, 16, 16, progress=False)
            read_all(ds)
        except (ValueError, FileNotFoundError) as e:
            if not (named(str(e), path) or "none of the" in str(e)):
                bad.append((path.name, how, str(e)[-300:]))
        except Exception as e:
            bad.append((path.name, how, f"traceback {type(e).__name__}: {e}"))
    assert not bad, "\n".join(map(str, bad))
