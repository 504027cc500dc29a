"""Precomputed features: one NaN latent or one damaged file is skipped and counted, never trained on
(issue finding 1: one NaN in one precomputed latent gave NaN from step 1)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from mmkit.data.features import FeatureDataset, collate_features


def _write(root, n=4):
    (root / "features").mkdir(parents=True)
    save_file({"text_context": torch.zeros(1, 8)}, str(root / "null_text.safetensors"))
    records = []
    for i in range(n):
        name = f"features/{i:06d}.safetensors"
        save_file(
            {"latents": torch.full((4, 1, 2, 2), float(i)), "text_context": torch.ones(3, 8)},
            str(root / name),
        )
        records.append({"file": name, "caption": f"c{i}", "source": f"v{i}.mp4"})
    (root / "index.json").write_text(json.dumps({"task": "t2v", "text_len": 6, "samples": records}))


def test_nan_latent_and_damaged_file_are_skipped_and_counted(tmp_path):
    _write(tmp_path)
    bad = {"latents": torch.zeros(4, 1, 2, 2), "text_context": torch.ones(3, 8)}
    bad["latents"][1, 0, 1, 1] = float("nan")
    save_file(bad, str(tmp_path / "features/000001.safetensors"))
    f2 = tmp_path / "features/000002.safetensors"
    f2.write_bytes(f2.read_bytes()[:-5])  # truncated
    ds = FeatureDataset(tmp_path)
    items = [ds[i] for i in range(4)]
    # sample 1 (NaN) and 2 (damaged) are replaced by the next usable one: 3, then 3 again
    assert [int(it["latents"][0, 0, 0, 0]) for it in items] == [0, 3, 3, 3]
    assert torch.isfinite(collate_features(items)["latents"]).all()
    assert ds.report()["skipped"] == {"nonfinite": 1, "damaged": 1}
    [ds[i] for i in range(4)]
    assert ds.report()["skipped"] == {"nonfinite": 1, "damaged": 1}  # each file counted once


def test_no_usable_sample_is_one_clear_error(tmp_path):
    _write(tmp_path, n=1)
    (tmp_path / "features/000000.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="none of the 1 samples .* is usable"):
        FeatureDataset(tmp_path)[0]
