"""`mmkit generate` over several processes and with memory options (the flags `mmkit generate` adds).

Launch: `torchrun --nproc_per_node N -m mmkit generate t2v|i2v ... --ulysses-size U --ring-size R
--cfg-size C`; whatever N leaves over (N / (U*R*C)) is data parallelism over `--prompts FILE` (one prompt
per line; prompt k, counting from 0, uses seed --seed + k, and its video is named by its line number:
out.mp4 -> out_03.mp4). Every flag is checked before any weights load; a failing rank prints its error
and ends with a non-zero status (torchrun then stops the others; every process group has a timeout).

Example:
    torchrun --nproc_per_node 4 -m mmkit generate t2v --model Wan2.1-T2V-1.3B-Diffusers \\
        --prompt "a red circle moves left" --ulysses-size 2 --cfg-size 2 --out out.mp4
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

from mmkit.infer.parallel import InferenceParallel, check_same_everywhere, peak_memory, rank_env


def _flag_bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {v!r}")


def add_parallel_arguments(p) -> None:
    """The multi-process and memory flags (underscore spellings of Wan2.1 / MindIE accepted too)."""
    g = p.add_argument_group("multi-process and memory (torchrun --nproc_per_node N -m mmkit generate ...)")
    g.add_argument(
        "--ulysses-size",
        "--ulysses_size",
        dest="ulysses_size",
        type=int,
        default=1,
        help="Ulysses sequence parallelism (must divide the attention heads)",
    )
    g.add_argument(
        "--ring-size",
        "--ring_size",
        dest="ring_size",
        type=int,
        default=1,
        help="ring attention sequence parallelism (hybrid with --ulysses-size)",
    )
    g.add_argument(
        "--cfg-size",
        "--cfg_size",
        dest="cfg_size",
        type=int,
        default=1,
        help="2: cond and uncond branches on the two halves of the ranks (needs --guidance > 1)",
    )
    g.add_argument(
        "--prompts",
        help="file, one prompt per line: data parallel over the ranks left over; "
        "outputs named by line number (out.mp4 -> out_<line>.mp4), prompt k uses seed --seed + k",
    )
    g.add_argument(
        "--dit-fsdp",
        "--dit_fsdp",
        dest="dit_fsdp",
        action="store_true",
        help="shard the DiT weights (FSDP2) over the ranks making one video",
    )
    g.add_argument(
        "--t5-fsdp",
        "--t5_fsdp",
        dest="t5_fsdp",
        action="store_true",
        help="shard the text-encoder weights (FSDP2) over the ranks making one video",
    )
    g.add_argument(
        "--t5-cpu", "--t5_cpu", dest="t5_cpu", action="store_true", help="keep the text encoder on the CPU"
    )
    g.add_argument(
        "--offload",
        "--offload-model",
        "--offload_model",
        dest="offload",
        nargs="?",
        const=True,
        default=False,
        type=_flag_bool,
        help="move each model to the device only for its stage",
    )
    g.add_argument(
        "--vae-tiling",
        "--vae_tiling",
        dest="vae_tiling",
        action="store_true",
        help="decode in overlapping spatial tiles (less memory)",
    )
    g.add_argument(
        "--vae-parallel",
        "--vae_parallel",
        dest="vae_parallel",
        action="store_true",
        help="decode split in time over the ranks making one video, gathered on its first rank",
    )
    g.add_argument("--vae-tile", dest="vae_tile", type=int, default=32,
                   help="tile side in latent pixels for --vae-tiling (32 = 256 pixels)")  # fmt: skip
    g.add_argument("--vae-warmup", dest="vae_warmup", type=int, default=3,
                   help="--vae-parallel: latent frames decoded before each time chunk to rebuild the causal cache")  # fmt: skip


def options(a) -> InferenceParallel:
    """The `InferenceParallel` of parsed flags. Example: `options(parser.parse_args([...]))`."""
    return InferenceParallel(
        ulysses=a.ulysses_size, ring=a.ring_size, cfg=a.cfg_size, dit_fsdp=a.dit_fsdp, t5_fsdp=a.t5_fsdp,
        t5_cpu=a.t5_cpu, offload=a.offload, vae_tiling=a.vae_tiling, vae_parallel=a.vae_parallel,
        vae_tile=a.vae_tile, vae_warmup=a.vae_warmup,
    )  # fmt: skip


def wants_parallel(a) -> bool:
    """Whether this run needs the multi-process / memory path (torchrun, or any of its flags)."""
    return rank_env()[2] > 1 or a.prompts is not None or options(a) != InferenceParallel()


def read_prompts(a) -> list[tuple[int, str]]:
    """(line number from 1, prompt) of every non-empty line of --prompts, or [(1, --prompt)]."""
    if a.prompts is None:
        if not a.prompt:
            raise ValueError("give --prompt TEXT or --prompts FILE (one prompt per line)")
        return [(1, a.prompt)]
    if a.prompt:
        raise ValueError("give either --prompt or --prompts, not both")
    path = Path(a.prompts)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts: file not found: {path}")
    lines = [(i, t.strip()) for i, t in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)]
    lines = [(i, t) for i, t in lines if t]
    if not lines:
        raise ValueError(f"--prompts {path}: no prompt in the file; write one prompt per line")
    return lines


def precheck_parallel(a, world: int) -> list[tuple[int, str]]:
    """Every layout and flag error before any weights load (all ranks raise the same error).

    Example: `prompts = precheck_parallel(args, world=4)`.
    """
    p = options(a)
    heads = None
    cfg_json = Path(a.model) / "transformer" / "config.json"
    if cfg_json.is_file():
        from mmkit.models.common.hf_io import read_json

        heads = read_json(cfg_json).get("num_attention_heads")
    p.check(world, heads=heads, guidance=a.guidance)
    family_check = _family_check(a.model)
    if family_check is not None:
        family_check(a.model, p, world)
    prompts = read_prompts(a)
    if a.task == "i2v":
        if not a.image and getattr(a, "mask_type", None) != "t2iv":  # t2iv generates every frame
            raise ValueError("i2v needs --image PATH (the first frame) on every rank")
        for image in a.image or []:
            check_same_everywhere(
                Path(image).is_file(), f"--image {image}: file not found; i2v reads it on every rank"
            )
    return prompts


def _family_check(model: str):
    """The family loader's own layout rules, `loader.check_parallel(folder, parallel, world)` (e.g.
    OpenSoraPlan's Skiparse groups per rank), or None; a missing folder is reported by the load later."""
    from mmkit import registry

    try:
        spec = registry.detect(model)
    except FileNotFoundError:
        return None
    return getattr(spec.resolve("pipeline"), "check_parallel", None)


def output_path(out: str, line: int, last: int, many: bool) -> Path:
    """out.mp4 -> out_07.mp4 for prompt file line 7 (zero-padded to the last line's width)."""
    path = Path(out)
    if not many:
        return path
    return path.with_name(f"{path.stem}_{line:0{len(str(last))}d}{path.suffix}")


def run_parallel(a) -> int:
    """Generate under the layout the flags give (one process or torchrun); returns the exit status."""
    import torch
    import torch.distributed as dist

    from mmkit.device import dist_backend, resolve_device
    from mmkit.parallel.dims import process_group_timeout

    rank, local_rank, world = rank_env()
    device = resolve_device(a.device)
    own_group = world > 1 and not dist.is_initialized()  # else the caller's group: leave it to the caller
    if own_group:
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        dist.init_process_group(dist_backend(device), timeout=process_group_timeout())
    try:
        from mmkit.cli.generate import precheck

        prompts = precheck_parallel(a, world)
        precheck(a)
    except (ValueError, FileNotFoundError) as e:  # the same on every rank: say it once
        if rank == 0:
            print(f"mmkit generate: error: {e}", file=sys.stderr)
        return _leave(world, 2)
    try:
        _generate(a, prompts, device)
    except Exception as e:
        print(f"mmkit generate: rank {rank} failed: {type(e).__name__}: {e}", file=sys.stderr)
        traceback.print_exc()
        return _leave(world, 1)
    if own_group:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def _leave(world: int, code: int) -> int:
    """Exit status after an error; with several processes end this one now (no barrier: a peer may be
    stuck in a collective; torchrun stops the others when one fails)."""
    if world > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _generate(a, prompts: list[tuple[int, str]], device) -> None:
    from mmkit.cli.generate import pipe_kwargs, save_outputs
    from mmkit.infer.accel.cache import apply_cache, cache_stats
    from mmkit.infer.pipelines import load_pipeline
    from mmkit.models.common import attention_backends

    pipe = load_pipeline(a.model, task=a.task, device=device, dtype=a.dtype, parallel=options(a))
    attention_backends.configure(backend=a.attention_backend)
    if a.cache_configs:  # on the transformer: the parallel forward runs its hooks (every rank decides alike)
        apply_cache(pipe.transformer, *a.cache_configs)
    layout = pipe.layout
    last = prompts[-1][0]
    for k in layout.my_prompts(len(prompts)):
        line, text = prompts[k]
        out = pipe(text, seed=a.seed + k, **pipe_kwargs(a))
        if a.cache_configs:  # the video's counts (both CFG halves), as one process prints them
            s = cache_stats(pipe.transformer)
            s = type(s)(
                *layout.video_counts([s.blocks_run, s.blocks_skipped, s.attention_reused], pipe.device)
            )
            if layout.writes:
                where = f" (line {line})" if a.prompts is not None else ""
                print(f"cache {a.cache_configs[0].method}{where}: {s.summary()}", flush=True)
        if out.frames is not None:
            save_outputs(out, output_path(a.out, line, last, a.prompts is not None))
    print(f"rank {layout.rank}: peak memory {peak_memory(device)}", flush=True)
