"""`mmkit convert ...`: checkpoint conversion. Actions: `mm-to-hf CKPT OUTDIR [--ema] [--layout L]`.

Each action is a subparser with its own `_convert_run` handler, so later ones (`hf-to-mm`, `resplit`,
`vae-convert`) are one more subparser here. The work lives in `mmkit.convert`.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register `convert` actions on `parser`. Example: `add_arguments(sub.add_parser("convert"))`."""
    actions = parser.add_subparsers(dest="convert_command", required=True, metavar="ACTION")

    mm_to_hf = actions.add_parser(
        "mm-to-hf",
        help="mmkit training checkpoint -> Hugging Face folder (diffusers / transformers)",
        description="Export a training checkpoint (a checkpoint.dir or one step_N folder) as a folder that "
        "diffusers (Wan: a full pipeline, frozen parts copied from model.init_from) or transformers "
        "(Qwen2.5-VL) loads. The family comes from the run's config.toml.",
    )
    mm_to_hf.add_argument("ckpt", help="checkpoint.dir of a run (its latest step) or a step_N folder")
    mm_to_hf.add_argument("outdir", help="output folder (new or empty)")
    mm_to_hf.add_argument("--ema", action="store_true", help="export the EMA weights (the run had train.ema)")
    mm_to_hf.add_argument(
        "--layout",
        choices=("diffusers", "original", "transformers"),
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
    mm_to_hf.add_argument("--quiet", action="store_true", help="no progress bars")
    mm_to_hf.set_defaults(_convert_run=_mm_to_hf)


def run(args: argparse.Namespace) -> int:
    """Dispatch to the chosen action. Example: `run(build_parser().parse_args(["convert", "mm-to-hf", C, O]))`."""
    return args._convert_run(args)


def _mm_to_hf(args: argparse.Namespace) -> int:
    from mmkit.convert.export import export_to_hf, parse_size

    out = export_to_hf(
        args.ckpt,
        args.outdir,
        which="ema" if args.ema else "model",
        layout=args.layout,
        init_from=args.init_from,
        tokenizer_from=args.tokenizer_from,
        dtype=args.dtype,
        max_shard_bytes=parse_size(args.max_shard_size),
        progress=not args.quiet,
    )
    print(f"exported {'EMA' if args.ema else 'trained'} weights -> {out}")
    return 0
