"""OpenSoraPlan multi-process generation (Ulysses, ring, hybrid, CFG and data parallel, sharded weights,
Skiparse under sequence shards) == one process.

The single-process frames are made here, in this process, from the tiny OSP t2v and i2v folders; the
layouts and a `generate --prompts` CLI run go in one 4-process torchrun launch (`_osp_generate_worker.py`).
The layout rules this family adds are checked in one process, before any weights load.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

import mmkit
from mmkit.cli.main import main
from mmkit.infer.opensoraplan_parallel import check_parallel
from mmkit.infer.parallel import InferenceParallel

WORKER = Path(__file__).with_name("_osp_generate_worker.py")
TOL = 1e-5  # max abs over frames in [0, 1], fp32
sys.path.insert(0, str(WORKER.parent))
from _osp_generate_worker import CASES, NEG, PROMPT, SIZES, gen_kwargs  # noqa: E402
from test_parallel_generate import torchrun  # noqa: E402


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Tiny OSP t2v / i2v folders, a first frame, a prompt file and the one-process frames (refs.npz)."""
    import torch
    from PIL import Image

    from mmkit.models.opensoraplan.tiny import create_tiny_osp

    root = tmp_path_factory.mktemp("ospgen")
    rgb = (np.random.RandomState(1).rand(64, 64, 3) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(root / "first.png")
    (root / "prompts.txt").write_text(f"{PROMPT}\n\na red circle\n")  # lines 1 and 3
    refs, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers run: the same reduction order in every matmul and conv
    try:
        for task in ("t2v", "i2v"):
            create_tiny_osp(root / task, task=task, seed=0)
            pipe = mmkit.load_pipeline(root / task, task=task, device="cpu")
            image = str(root / "first.png") if task == "i2v" else None
            for size in SIZES:
                refs[f"{task}_{size}"] = pipe(PROMPT, **gen_kwargs(size, image)).frames
            if task == "t2v":  # the second prompt of the --prompts run: seed + 1
                refs["t2v_second"] = pipe("a red circle", **{**gen_kwargs("base", None), "seed": 6}).frames
    finally:
        torch.set_num_threads(threads)
    np.savez(root / "refs.npz", **refs)
    return root


def test_layouts_equal_one_process(root):
    res = torchrun(4, 29721, [str(WORKER), str(root)], timeout=300)
    print(res.stdout)
    assert res.returncode == 0, res.stderr[-4000:]
    found = {(c, t): float(e) for c, t, e in re.findall(r"MAXERR (\S+) (\S+) nan (\S+)", res.stdout)}
    for case in CASES:
        for task in ("t2v", "i2v"):  # 2-rank layouts: one task per data-parallel group; 4-rank ones: both
            assert (case, task) in found, f"{case} {task} not reported:\n{res.stdout}"
            assert found[(case, task)] <= TOL, f"{case} {task}: frames max abs {found[(case, task)]:.2e}"
    # Skiparse layers over degrees that do not divide k (heads split as well), against one device
    split = re.findall(r"SKIPARSE (\d+) (\d+) (\d+) (\S+) (\S+)", res.stdout)
    assert len(split) == 6, res.stdout
    for cp, k, heads, mode, err in split:
        assert float(err) <= 1e-6, f"Skiparse over {cp} ranks, k={k}, {heads} heads, {mode}: {err}"
    # the CLI's --prompts run: lines 1 and 3 over data parallel 2, named by line number
    refs = np.load(root / "refs.npz")
    first, second = np.load(root / "cli_1.npy"), np.load(root / "cli_3.npy")
    assert np.abs(first - refs["t2v_base"][0]).max() <= TOL
    assert np.abs(second - refs["t2v_second"][0]).max() <= TOL
    assert "rank 3: peak memory" in res.stdout


def test_layout_rules_before_loading(root, tmp_path, capsys):
    """Skiparse splits its k = 4 groups over gcd(U R, 4) rank blocks and the heads over the rest (which
    must divide the 2 heads); the WF-VAE refuses --vae-parallel / --vae-tiling. Each names the flag,
    from the configs alone (no weights)."""
    bare = tmp_path / "osp"
    (bare / "transformer").mkdir(parents=True)
    for name in ("model_index.json", "transformer/config.json"):
        (bare / name).write_text((root / "t2v" / name).read_text())
    msg = r"--ulysses-size 1 x --ring-size 3 = 3: a Skiparse layer splits its sparse_n=4 groups over 1 rank "
    with pytest.raises(
        ValueError, match=msg + r"blocks and its heads over 3, and the 2 heads .* \[2, 4, 8\]"
    ):
        check_parallel(bare, InferenceParallel(ring=3), world=3)
    with pytest.raises(ValueError, match=r"--ulysses-size 4: the model's 2 attention heads do not divide"):
        check_parallel(bare, InferenceParallel(ulysses=4), world=4)
    check_parallel(bare, InferenceParallel(ulysses=2, ring=2, cfg=2), world=8)  # sp 4 divides k = 4
    check_parallel(bare, InferenceParallel(ulysses=2, ring=4), world=8)  # 4 group blocks x 2 head blocks
    args = ["generate", "t2v", "--model", str(bare), "--prompt", "x", "--height", "32", "--width", "32"]
    args += ["--frames", "5", "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "v.npy")]
    for flag in ("--vae-parallel", "--vae-tiling"):
        assert main(args + [flag]) == 2
        assert f"{flag}: not available for OpenSoraPlan; its WF-VAE always decodes" in capsys.readouterr().err


def test_cli_memory_options_one_process(root, tmp_path):
    """--t5_cpu and --offload_model True in one process (no torchrun): the one-process frames."""
    import torch

    h, w, f = SIZES["base"]
    args = ["generate", "t2v", "--model", str(root / "t2v"), "--prompt", PROMPT, "--negative-prompt", NEG]
    args += ["--height", str(h), "--width", str(w), "--frames", str(f), "--steps", "2", "--guidance", "3"]
    args += ["--seed", "5", "--device", "cpu", "--t5_cpu", "--offload_model", "True"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the references were made
    try:
        assert main(args + ["--out", str(tmp_path / "v.npy")]) == 0
    finally:
        torch.set_num_threads(threads)
    got = np.load(tmp_path / "v.npy")
    assert np.abs(got - np.load(root / "refs.npz")["t2v_base"][0]).max() <= TOL
