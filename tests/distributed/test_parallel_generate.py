"""Multi-process generation (sequence, CFG and data parallel, sharded weights, parallel VAE) == one process.

The single-process frames are made here, in this process, from tiny t2v and i2v folders; the layouts run
in one 4-process torchrun launch (`_generate_worker.py`) that ends with a rank raising, plus a real
`torchrun -m mmkit generate` run with --prompts over data parallelism 2. Layout and flag errors are
checked in one process, before any weights load.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import mmkit
from mmkit.cli.main import main
from mmkit.infer.parallel import InferenceParallel

WORKER = Path(__file__).with_name("_generate_worker.py")
REPO = str(WORKER.parents[2])
TOL = 1e-5  # max abs over frames in [0, 1], fp32
sys.path.insert(0, str(WORKER.parent))
from _generate_worker import CASES, NEG, PROMPT, gen_kwargs  # noqa: E402


def _env() -> dict:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }


def torchrun(nproc: int, port: int, args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(port), *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Tiny t2v / i2v folders, a first frame and the single-process reference frames (refs.npz)."""
    import torch
    from PIL import Image

    from mmkit.infer.wan_parallel import chunk_bounds, decode_chunk
    from mmkit.models.wan.tiny import create_tiny_wan

    root = tmp_path_factory.mktemp("pargen")
    rgb = (np.random.RandomState(1).rand(64, 64, 3) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(root / "first.png")
    refs, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers run: the same reduction order in every matmul and conv
    for task in ("t2v", "i2v"):
        create_tiny_wan(root / task, task=task, seed=0)
        pipe = mmkit.load_pipeline(root / task, task=task, device="cpu")
        image = str(root / "first.png") if task == "i2v" else None
        for size in ("base", "odd"):
            refs[f"{task}_{size}"] = pipe(PROMPT, **gen_kwargs(size, image)).frames
            latents = pipe(PROMPT, output_type="latent", **gen_kwargs(size, image)).frames
            refs[f"{task}_{size}_latents"] = latents.numpy()
        # --vae-parallel over 2 ranks, in one process: the same two time chunks, concatenated
        mean, std = pipe._latent_stats("cpu")
        z = torch.from_numpy(refs[f"{task}_odd_latents"]) * std + mean
        video = torch.cat([decode_chunk(pipe.vae, z, a, b, 1) for a, b in chunk_bounds(z.shape[2], 2)], dim=2)
        refs[f"{task}_odd_split"] = (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1).numpy()
        if task == "t2v":  # the second prompt of the --prompts run: seed + 1
            refs["t2v_second"] = pipe("a red circle", **{**gen_kwargs("base", None), "seed": 6}).frames
    torch.set_num_threads(threads)
    np.savez(root / "refs.npz", **refs)
    return root


def test_layouts_equal_one_process_then_a_failing_rank_ends_the_job(root):
    res = torchrun(4, 29711, [str(WORKER), str(root)])
    ended = time.time()
    # the launch ends with the injected failure (after every layout): rank 1's error, within seconds
    assert res.returncode != 0, "the rank that raised did not end the job with an error"
    assert "rank 1 failed: RuntimeError: injected failure on rank 1" in res.stderr, res.stderr[-4000:]
    started = re.search(r"FAIL-START (\S+)", res.stdout)
    assert started, res.stdout + res.stderr[-4000:]
    assert ended - float(started.group(1)) < 60, (
        f"the job took {ended - float(started.group(1)):.0f} s to end"
    )
    found = {
        (c, t): (float(lat), float(fr))
        for c, t, lat, fr in re.findall(r"MAXERR (\S+) (\S+) (\S+) (\S+)", res.stdout)
    }
    print(res.stdout)
    for case in CASES:
        for task in ("t2v", "i2v"):  # 2-rank layouts: one task per data-parallel group; 4-rank ones: both
            assert (case, task) in found, f"{case} {task} not reported:\n{res.stdout}"
            lat, frames = found[(case, task)]
            assert lat <= TOL, f"{case} {task}: latents max abs {lat:.2e} > {TOL}"
            assert frames <= TOL, f"{case} {task}: frames max abs {frames:.2e} > {TOL}"
    refs = np.load(root / "refs.npz")  # the split decode's second chunk is approximate: it must differ
    for task in ("t2v", "i2v"):
        err = np.abs(refs[f"{task}_odd_split"] - refs[f"{task}_odd"])
        print(
            f"{task}: time-split decode (warm-up 1) vs untiled: max abs {err.max():.2e}, mean {err.mean():.2e}"
        )
        assert err.max() > 1e-6


def test_cli_prompts_over_data_parallel(root, tmp_path):
    """`torchrun -m mmkit generate` with 2 prompts over dp 2: outputs named by line number."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\n\na red circle\n")  # lines 1 and 3
    args = ["-m", "mmkit", "generate", "t2v", "--model", str(root / "t2v"), "--prompts", str(prompts)]
    args += ["--negative-prompt", NEG]
    args += ["--height", "32", "--width", "32", "--frames", "5", "--steps", "2", "--guidance", "3"]
    args += ["--seed", "5", "--device", "cpu", "--out", str(tmp_path / "v.npy")]
    res = torchrun(2, 29712, args)
    assert res.returncode == 0, res.stderr[-4000:]
    refs = np.load(root / "refs.npz")
    first, second = np.load(tmp_path / "v_1.npy"), np.load(tmp_path / "v_3.npy")
    assert np.abs(first - refs["t2v_base"][0]).max() <= TOL
    assert np.abs(second - refs["t2v_second"][0]).max() <= TOL
    assert "rank 0: peak memory" in res.stdout and "rank 1: peak memory" in res.stdout


def test_cli_memory_options_one_process(root, tmp_path):
    """--t5-cpu, --offload_model True and --vae-tiling in one process (no torchrun): the same frames on the
    CPU (one tile covers these 4 x 4 latents), and the peak memory line."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the references were made
    try:
        args = ["generate", "t2v", "--model", str(root / "t2v"), "--prompt", PROMPT, "--negative-prompt", NEG]
        args += [
            "--height",
            "32",
            "--width",
            "32",
            "--frames",
            "5",
            "--steps",
            "2",
            "--guidance",
            "3",
            "--seed",
            "5",
        ]
        args += ["--device", "cpu", "--t5_cpu", "--offload_model", "True", "--vae-tiling", "--vae-tile", "4"]
        assert main(args + ["--out", str(tmp_path / "v.npy")]) == 0
    finally:
        torch.set_num_threads(threads)
    got = np.load(tmp_path / "v.npy")
    assert np.abs(got - np.load(root / "refs.npz")["t2v_base"][0]).max() <= TOL


def _cli(model: Path, *extra: str) -> list[str]:
    return ["generate", "t2v", "--model", str(model), "--prompt", "x", "--height", "32", "--width", "32",
            "--frames", "5", "--steps", "1", "--device", "cpu", "--out", "/tmp/never.npy", *extra]  # fmt: skip


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--ulysses-size", "2"], r"--ulysses-size 2 x --ring-size 1 x --cfg-size 1 = 2 does not divide the world size 1"),
        (["--ulysses_size", "1", "--cfg_size", "3"], r"--cfg-size 3: must be 1 or 2"),
        (["--guidance", "1", "--cfg-size", "2"], r"--cfg-size 2 needs classifier-free guidance, but --guidance is 1.0"),
        (["--dit-fsdp"], r"--dit-fsdp / --t5-fsdp shard the weights over the ranks that make one video"),
        (["--t5_cpu", "--t5_fsdp"], r"--t5-cpu with --t5-fsdp"),
    ],
)  # fmt: skip
def test_bad_layouts_fail_before_loading(tmp_path, capsys, extra, message):
    """A folder with configs but no weights: the error is the flag's, not a missing file's."""
    model = tmp_path / "wan"
    (model / "transformer").mkdir(parents=True)
    (model / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
    (model / "transformer" / "config.json").write_text('{"num_attention_heads": 12}')
    assert main(_cli(model, *extra)) == 2
    assert re.search(message, capsys.readouterr().err)


def test_heads_and_image_checks(capsys):
    with pytest.raises(
        ValueError, match=r"--ulysses-size 5: the model's 12 attention heads .* \[1, 2, 3, 4, 6, 12\]"
    ):
        InferenceParallel(ulysses=5).check(world=5, heads=12)
    InferenceParallel(ulysses=4, ring=2, cfg=2).check(world=32, heads=12, guidance=5.0)  # dp 2
    args = ["generate", "i2v", "--model", "/nonexistent", "--prompt", "x", "--out", "o.npy", "--t5-cpu"]
    assert main(args) == 2
    assert "i2v needs --image PATH (the first frame) on every rank" in capsys.readouterr().err
    assert main(args + ["--image", "/nonexistent.png"]) == 2
    assert "--image /nonexistent.png: file not found; i2v reads it on every rank" in capsys.readouterr().err


def test_tiled_decode_blends_to_the_untiled_result_for_a_pointwise_decoder():
    """With a decoder that sees each latent pixel alone, tiles + blending must give the untiled output;
    any seam, gap or weight error shows."""
    import torch

    from mmkit.infer.parallel import tiled_decode

    z = torch.randn(1, 16, 3, 13, 21)

    def decode(zt):  # 3 channels, 8x nearest upsampling, 1 + 4 (T - 1) frames
        x = zt[:, :3].repeat_interleave(8, -1).repeat_interleave(8, -2)
        return torch.cat([x[:, :, :1], x[:, :, 1:].repeat_interleave(4, 2)], 2)

    want = decode(z)
    for tile in (4, 5, 8, 32):
        got = tiled_decode(decode, z, 8, tile, 9)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
