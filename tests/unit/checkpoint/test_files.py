"""Damaged safetensors files and checkpoint folders are named in one clear error (finding 7)."""

import pytest
import torch
from safetensors.torch import save_file

from mmkit.checkpoint.files import (
    DamagedFileError,
    check_safetensors,
    load_safetensors,
    open_safetensors,
    verify_manifest,
    write_manifest,
)


@pytest.fixture
def st_file(tmp_path):
    p = tmp_path / "model.safetensors"
    save_file({"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4)}, str(p))
    return p


def test_intact_file_loads(st_file):
    header = check_safetensors(st_file)
    assert header["a"]["shape"] == [2, 3] and header["b"]["dtype"] == "F32"
    sd = load_safetensors(st_file)
    assert torch.equal(sd["a"], torch.arange(6.0).reshape(2, 3))
    with open_safetensors(st_file) as f:
        assert sorted(f.keys()) == ["a", "b"]


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda b: b[:-3], "truncated or altered"),  # an interrupted download
        (lambda b: b"", "too short"),
        (lambda b: b[:20], "does not fit"),
        (lambda b: b[:8] + b"{" * (len(b) - 8), "not valid JSON"),
        (lambda b: b + b"\0", "truncated or altered"),
    ],
)
def test_damaged_file_is_named(st_file, damage, why):
    st_file.write_bytes(damage(st_file.read_bytes()))
    for call in (check_safetensors, load_safetensors):
        with pytest.raises(DamagedFileError, match=why) as e:
            call(st_file)
        assert str(st_file) in str(e.value) and "fetch or copy it again" in str(e.value)
    with pytest.raises(DamagedFileError), open_safetensors(st_file):
        pass


def test_manifest_finds_every_kind_of_damage(tmp_path, st_file):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.json").write_text('{"k": 1}')
    write_manifest(tmp_path)
    assert verify_manifest(tmp_path) == []
    data = bytearray(st_file.read_bytes())
    data[-1] ^= 0xFF  # a flipped byte inside the tensor data: same size, same header
    st_file.write_bytes(bytes(data))
    assert verify_manifest(tmp_path, checksums=False) == []  # sizes alone cannot see it
    (problem,) = verify_manifest(tmp_path)
    assert str(st_file) in problem and "sha256" in problem
    (tmp_path / "sub" / "x.json").unlink()
    assert any("x.json: missing" in p for p in verify_manifest(tmp_path))
    (tmp_path / "manifest.json").write_text("{")
    assert verify_manifest(tmp_path) == [
        f"{tmp_path / 'manifest.json'}: the manifest is unreadable or damaged"
    ]
