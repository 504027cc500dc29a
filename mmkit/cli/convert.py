"""`mmkit convert ...`: checkpoint conversion. Actions, each a subparser with its own `_convert_run` handler:

- `hf-to-mm HF_DIR OUT [--tp N] [--pp N] [--pp-layers JSON] [--vit-pp-layers JSON]`: HF folder -> mmkit
  checkpoint (unsplit DCP for tp = pp = 1, else MindSpeed-style per-rank folders);
- `mm-to-hf CKPT OUTDIR [--ema] [--layout L]`: any mmkit checkpoint (trained, converted, pre-split) -> HF folder;
- `resplit IN OUT [--tp N] [--pp N] [--pp-layers JSON]`: any mmkit checkpoint -> another layout;
- `vae-convert IN OUT --to diffusers|original [--family F]`: a family's VAE between its release file and
  diffusers (the family's `vae_convert`; default the first family that has one, Wan2.1).
The work lives in `mmkit.convert` (ops.py, export.py, vae.py) over the formats of `mmkit.checkpoint`.
"""

from __future__ import annotations

import argparse
import json

from mmkit import registry

# training-config field names in layout errors -> this CLI's flags
FLAG_NAMES = {
    "parallel.tp": "--tp",
    "parallel.pp_layers": "--pp-layers",
    "parallel.pp": "--pp",
    "vit_pp_layers": "--vit-pp-layers",
}


def parse_layers(text: str | None, flag: str) -> list | None:
    """A layer-count list from the command line: JSON `[12,16]` / `[[6,8],[7,7]]`, or `12,16`.

    Example: `parse_layers("[[12,16]]", "--pp-layers")` -> `[[12, 16]]`.
    """
    if text is None:
        return None
    try:
        value = json.loads(text if text.strip().startswith("[") else f"[{text}]")
    except json.JSONDecodeError:
        value = None
    flat = [x for v in (value or []) for x in (v if isinstance(v, list) else [v])]
    if not value or not all(isinstance(x, int) and not isinstance(x, bool) for x in flat):
        raise ValueError(f"{flag} {text!r}: give layer counts as JSON, e.g. [12,16] or [[6,8],[7,7]]")
    return value


def _overwrite_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier mmkit output at the target (only once the new one is complete); "
        "a folder mmkit did not write is never touched",
    )


def _layout_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the target layout (default 1)")
    p.add_argument(
        "--pp", type=int, default=None, help="pipeline ranks (default: what --pp-layers implies, else 1)"
    )
    p.add_argument(
        "--pp-layers",
        metavar="JSON",
        default=None,
        help="layers per pipeline stage, e.g. [12,16]; nested lists for virtual stages, [[a,b],[c,d]] = "
        "pp 2 x 2 chunks (rank 0 holds a and c). Default: an even split",
    )
    p.add_argument(
        "--vit-pp-layers",
        metavar="JSON",
        default=None,
        help="qwen2_5_vl: vision blocks per stage; the tower sits on stage 0, e.g. [[32,0]]",
    )
    p.add_argument(
        "--max-shard-size", metavar="SIZE", default="5GB", help="largest safetensors file (default 5GB)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _overwrite_flag(p)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register `convert` actions on `parser`. Example: `add_arguments(sub.add_parser("convert"))`."""
    actions = parser.add_subparsers(dest="convert_command", required=True, metavar="ACTION")

    mm_to_hf = actions.add_parser(
        "mm-to-hf",
        help="mmkit checkpoint (trained, converted or pre-split) -> Hugging Face folder",
        description="Export a training checkpoint (a checkpoint.dir or one step_N folder), or a checkpoint "
        "written by hf-to-mm / resplit (pre-split ones are merged first), as a folder that diffusers (Wan: "
        "a full pipeline, frozen parts copied from model.init_from / the recorded source) or transformers "
        "(Qwen2.5-VL) loads. The family comes from the run's config.toml or the layout.json.",
    )
    mm_to_hf.add_argument(
        "ckpt", help="checkpoint.dir of a run (its latest step), a step_N folder, or a converted checkpoint"
    )
    mm_to_hf.add_argument(
        "outdir", help="output folder (new or empty; an earlier mmkit output with --overwrite)"
    )
    mm_to_hf.add_argument("--ema", action="store_true", help="export the EMA weights (the run had train.ema)")
    mm_to_hf.add_argument(
        "--layout",
        choices=tuple(dict.fromkeys(x for s in registry.specs() for x in s.hf_layouts)),
        default=None,
        help="wan: diffusers (default, full pipeline) or original (the DiT alone, Wan2.1 release names); "
        "qwen2_5_vl: transformers (default)",
    )
    mm_to_hf.add_argument(
        "--init-from",
        metavar="DIR",
        default=None,
        help="HF folder to use instead of the run's model.init_from (e.g. moved)",
    )
    mm_to_hf.add_argument(
        "--tokenizer-from",
        metavar="DIR",
        default=None,
        help="qwen2_5_vl: folder to copy tokenizer/chat-template/processor files from (needed when the run "
        "started from a flavor without model.init_from)",
    )
    mm_to_hf.add_argument(
        "--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="cast weights (default: as saved)"
    )
    mm_to_hf.add_argument(
        "--max-shard-size", metavar="SIZE", default="5GB", help="largest safetensors shard (default 5GB)"
    )
    mm_to_hf.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="export weights even if they hold NaN/inf (refused by default)",
    )
    mm_to_hf.add_argument("--quiet", action="store_true", help="no progress bars")
    _overwrite_flag(mm_to_hf)
    mm_to_hf.set_defaults(_convert_run=_mm_to_hf)

    hf_to_mm = actions.add_parser(
        "hf-to-mm",
        help="Hugging Face folder -> mmkit checkpoint, optionally pre-split for a tp/pp layout",
        description="Convert a diffusers Wan folder (pipeline, transformer/ or original release DiT) or a "
        "transformers Qwen2.5-VL folder into an mmkit checkpoint: a DCP training checkpoint for tp=pp=1, "
        "else per-rank folders mp_rank_TT_PPP/ plus layout.json. The layout is checked against the model "
        "config first (as training does).",
    )
    hf_to_mm.add_argument("hf_dir", help="Hugging Face model folder")
    hf_to_mm.add_argument(
        "out", help="output folder (new or empty; an earlier mmkit output with --overwrite)"
    )
    _layout_flags(hf_to_mm)
    hf_to_mm.add_argument(
        "--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="cast weights (default: as stored)"
    )
    hf_to_mm.set_defaults(_convert_run=_hf_to_mm)

    resplit = actions.add_parser(
        "resplit",
        help="mmkit checkpoint (any layout) -> the same weights in another tp/pp layout",
        description="Merge an mmkit checkpoint (pre-split, converted or trained) and split it for the "
        "target layout; tp=pp=1 writes the unsplit DCP format.",
    )
    resplit.add_argument("src", help="mmkit checkpoint folder (or an HF folder)")
    resplit.add_argument("out", help="output folder (new or empty; an earlier mmkit output with --overwrite)")
    _layout_flags(resplit)
    resplit.add_argument(
        "--init-from", metavar="DIR", default=None, help="HF folder to use instead of the recorded source"
    )
    resplit.set_defaults(_convert_run=_resplit)

    vae = actions.add_parser(
        "vae-convert",
        help="a VAE: original release file <-> diffusers layout (Wan2.1, OpenSoraPlan 1.3 WF-VAE)",
        description="Wan2.1 (default): --to diffusers: IN is Wan2.1_VAE.pth/.safetensors (or a folder with "
        "it), OUT a new folder. --to original: IN is a diffusers VAE (or pipeline) folder, OUT a .safetensors "
        "file or a folder for Wan2.1_VAE.safetensors. --family opensoraplan: IN is a WF-VAE folder (release "
        "config.json + *.ckpt, or diffusers) or a pipeline folder, OUT a new folder. .pth/.ckpt files are "
        "read with torch.load(weights_only=True).",
    )
    vae.add_argument("src", help="input VAE file or folder")
    vae.add_argument("out", help="output folder or .safetensors file")
    vae.add_argument("--to", required=True, choices=("diffusers", "original"), help="target layout")
    vae.add_argument(
        "--family",
        default=None,
        help="model family whose VAE it is (default: the first with a VAE converter, wan)",
    )
    vae.add_argument("--quiet", action="store_true", help="no progress bars")
    _overwrite_flag(vae)
    vae.set_defaults(_convert_run=_vae_convert)


def run(args: argparse.Namespace) -> int:
    """Dispatch to the chosen action. Example: `run(build_parser().parse_args(["convert", "mm-to-hf", C, O]))`."""
    return args._convert_run(args)


def _mm_to_hf(args: argparse.Namespace) -> int:
    from mmkit.checkpoint.hf import parse_size
    from mmkit.convert.ops import mm_to_hf

    out = mm_to_hf(
        args.ckpt,
        args.outdir,
        which="ema" if args.ema else "model",
        layout=args.layout,
        init_from=args.init_from,
        tokenizer_from=args.tokenizer_from,
        dtype=args.dtype,
        max_shard_bytes=parse_size(args.max_shard_size),
        progress=not args.quiet,
        allow_nonfinite=args.allow_nonfinite,
        overwrite=args.overwrite,
    )
    print(f"exported {'EMA' if args.ema else 'model'} weights -> {out}")
    return 0


def _layout_kwargs(args: argparse.Namespace) -> dict:
    from mmkit.checkpoint.hf import parse_size

    return dict(
        tp=args.tp,
        pp=args.pp,
        pp_layers=parse_layers(args.pp_layers, "--pp-layers"),
        vit_pp_layers=parse_layers(args.vit_pp_layers, "--vit-pp-layers"),
        max_shard_bytes=parse_size(args.max_shard_size),
        names=FLAG_NAMES,
        progress=not args.quiet,
        overwrite=args.overwrite,
    )


def _hf_to_mm(args: argparse.Namespace) -> int:
    from mmkit.convert.ops import hf_to_mm

    out = hf_to_mm(args.hf_dir, args.out, dtype=args.dtype, **_layout_kwargs(args))
    print(f"converted {args.hf_dir} -> {out}")
    return 0


def _resplit(args: argparse.Namespace) -> int:
    from mmkit.convert.ops import resplit

    out = resplit(args.src, args.out, init_from=args.init_from, **_layout_kwargs(args))
    print(f"resplit {args.src} -> {out}")
    return 0


def _vae_convert(args: argparse.Namespace) -> int:
    have = [s for s in registry.specs() if s.vae_convert]
    spec = registry.get(args.family, "--family") if args.family else have[0]
    if not spec.vae_convert:
        raise ValueError(
            f"--family {spec.name}: {spec.title} has no VAE converter; choose one of {', '.join(s.name for s in have)}"
        )
    convert = spec.resolve("vae_convert")
    out = convert(args.src, args.out, to=args.to, progress=not args.quiet, overwrite=args.overwrite)
    print(f"converted VAE ({args.to} layout) -> {out}")
    return 0
