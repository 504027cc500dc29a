"""`mmkit generate i2v` under torchrun, checked before any weights load (what every rank runs first:
`precheck_parallel`, then `precheck`): OpenSoraPlan's `--mask-type t2iv` generates every frame and takes
no --image; every other i2v needs --image on every rank. No launch: the world size is given.
"""

from __future__ import annotations

import json

import pytest

from mmkit.cli.generate import precheck
from mmkit.cli.generate_parallel import precheck_parallel
from mmkit.cli.main import build_parser
from mmkit.models.opensoraplan.config import OSPConfig
from mmkit.models.opensoraplan.tiny import PIPELINE_CLASS, TINY_DIT

PROMPT = "a blue square"


@pytest.fixture(scope="module")
def osp_i2v(tmp_path_factory):
    """The tiny OSP i2v folder's configs, no weights (everything here runs before any weights load)."""
    folder = tmp_path_factory.mktemp("osp") / "i2v"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": PIPELINE_CLASS["i2v"]}))
    cfg = OSPConfig(**TINY_DIT, vae_scale_factor_t=4).to_dict()
    (folder / "transformer" / "config.json").write_text(json.dumps(cfg))
    return folder


def _args(model, out, *extra: str):
    argv = ["generate", "i2v", "--model", str(model), "--prompt", PROMPT, "--height", "32", "--width", "64"]
    argv += ["--frames", "13", "--steps", "1", "--device", "cpu", "--ulysses-size", "2", "--out", str(out)]
    return build_parser("generate").parse_args([*argv, *extra])


def test_t2iv_under_torchrun_takes_no_image(osp_i2v, tmp_path):
    a = _args(osp_i2v, tmp_path / "v.mp4", "--mask-type", "t2iv")
    assert precheck_parallel(a, world=2) == [(1, PROMPT)]
    precheck(a)  # the flags, the conditioning against the family, the output path and the memory
    assert a.image is None and a.cache_configs == []
    # t2iv with an image: the family's rule refuses it, after the image is found on every rank
    from PIL import Image

    Image.new("RGB", (64, 32)).save(tmp_path / "first.png")
    a = _args(osp_i2v, tmp_path / "v.mp4", "--mask-type", "t2iv", "--image", str(tmp_path / "first.png"))
    precheck_parallel(a, world=2)
    with pytest.raises(ValueError, match="t2iv generates every frame: drop --image"):
        precheck(a)


@pytest.mark.parametrize("mask_type", [None, "i2v", "transition", "continuation", "clear", "random_temporal"])
def test_other_i2v_under_torchrun_need_an_image(osp_i2v, tmp_path, mask_type):
    extra = ["--mask-type", mask_type] if mask_type else []
    a = _args(osp_i2v, tmp_path / "v.mp4", *extra)
    with pytest.raises(ValueError, match=r"^i2v needs --image PATH \(the first frame\) on every rank$"):
        precheck_parallel(a, world=2)
