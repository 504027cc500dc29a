"""`mmkit data ...`: dataset tools. Subcommands: `convert llava IN OUT [--image-root DIR]`,
`synth shapes OUTDIR --videos N [...]`, `synth shapes-qa OUTDIR [--images N ...]`.

Each action is a (sub)parser with its own `_data_run` handler, so later tools (e.g. `mmkit data
synth ...`) add one more subparser here. The work lives in `mmkit.data`.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register `data` subcommands on `parser`. Example: `add_arguments(sub.add_parser("data"))`."""
    actions = parser.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    convert = actions.add_parser("convert", help="convert a dataset into mmkit's messages format")
    formats = convert.add_subparsers(dest="format", required=True, metavar="FORMAT")
    llava = formats.add_parser(
        "llava",
        help="LLaVA/ShareGPT records -> messages",
        description="Convert LLaVA/ShareGPT-style records ({'image', 'conversations': [{'from', 'value'}]}) "
        "into {'messages': [...], 'images': [...]} records. Bad records are reported and skipped.",
    )
    llava.add_argument("input", help="LLaVA JSON list or JSONL file")
    llava.add_argument("output", help="output file (.json list, or .jsonl for one record per line)")
    llava.add_argument(
        "--image-root", default=None, help="folder joined in front of relative image/video paths"
    )
    llava.add_argument("--quiet", action="store_true", help="no progress bar, no per-record problem lines")
    llava.set_defaults(_data_run=_convert_llava)

    synth = actions.add_parser("synth", help="write a synthetic data set")
    kinds = synth.add_subparsers(dest="kind", required=True, metavar="KIND")
    shapes = kinds.add_parser(
        "shapes",
        help="moving-shape mp4 clips + captions in the MindSpeed layout (data.txt, annotation.json)",
        description="Write mp4 clips of coloured shapes moving over plain backgrounds, captioned like "
        "'a red circle moves left on a black background', plus annotation.json, data.txt and "
        "heldout_prompts.json (captions kept out of training).",
    )
    shapes.add_argument("outdir", help="output folder")
    shapes.add_argument("--videos", type=int, default=64, help="number of clips (default 64)")
    shapes.add_argument("--frames", type=int, default=17, help="frames per clip (default 17)")
    shapes.add_argument("--height", type=int, default=64, help="pixels (default 64)")
    shapes.add_argument("--width", type=int, default=64, help="pixels (default 64)")
    shapes.add_argument("--fps", type=float, default=16, help="frames per second (default 16)")
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument(
        "--heldout", type=int, default=4, help="caption combinations kept out of training (default 4)"
    )
    shapes.add_argument("--quiet", action="store_true", help="no progress bar")
    shapes.add_argument("--overwrite", action="store_true", help="replace a set an earlier synth wrote")
    shapes.set_defaults(_data_run=_synth_shapes)
    qa = kinds.add_parser(
        "shapes-qa",
        help="PNG images of shapes + messages-format Q&A about them (qa.json)",
        description="Write PNG images of 1-3 coloured shapes and {'messages', 'images'} records asking "
        "their colour, shape, position and count.",
    )
    qa.add_argument("outdir", help="output folder")
    qa.add_argument("--images", type=int, default=64, help="number of images (default 64)")
    qa.add_argument("--size", type=int, default=112, help="image side in pixels (default 112)")
    qa.add_argument("--turns", type=int, default=1, help="questions per image (default 1)")
    qa.add_argument(
        "--single-turn",
        action="store_true",
        help="each question its own one-turn record with its image (no answer readable from earlier turns)",
    )
    qa.add_argument("--seed", type=int, default=0)
    qa.add_argument("--quiet", action="store_true", help="no progress bar")
    qa.add_argument("--overwrite", action="store_true", help="replace a set an earlier synth wrote")
    qa.set_defaults(_data_run=_synth_shapes_qa)

    feats = actions.add_parser(
        "features",
        help="precompute Wan training features (VAE latents, umT5 text, CLIP) for a recipe's data",
        description="Run the frozen encoders of a training config once over its video data and write "
        "OUTDIR/features/*.safetensors + index.json; train on them with --data.precomputed_dir OUTDIR.",
    )
    feats.add_argument("outdir", help="output folder")
    feats.add_argument("--config", required=True, help="training recipe (TOML)")
    feats.add_argument(
        "overrides", nargs="*", default=[], help="section.field=value (or --section.field value) overrides"
    )
    feats.add_argument("--overwrite", action="store_true", help="replace a set an earlier features run wrote")
    feats.set_defaults(_data_run=_features)


def run(args: argparse.Namespace) -> int:
    """Dispatch to the chosen action. Example: `run(build_parser().parse_args(["data", "convert", ...]))`."""
    return args._data_run(args)


def _convert_llava(args: argparse.Namespace) -> int:
    from mmkit.data.formats import convert_llava_file

    report = convert_llava_file(args.input, args.output, image_root=args.image_root, progress=not args.quiet)
    if not args.quiet:
        for index, reason in report.problems:
            print(f"record {index}: skipped: {reason}", file=sys.stderr)
    print(f"{report.summary()} -> {args.output}")
    # Nothing converted out of a non-empty file is a failure; some skips are not.
    return 1 if report.total and not report.converted else 0


def _synth_shapes(args: argparse.Namespace) -> int:
    from mmkit.data.synth import synth_shapes

    out = synth_shapes(
        args.outdir, args.videos, args.frames, args.height, args.width, args.fps, args.seed, not args.quiet,
        heldout=args.heldout, overwrite=args.overwrite,
    )  # fmt: skip
    print(
        f"wrote {out.videos} clips -> {out.data_txt} (held-out prompts: {out.root / 'heldout_prompts.json'})"
    )
    return 0


def _synth_shapes_qa(args: argparse.Namespace) -> int:
    from mmkit.data.synth import synth_shapes_qa

    path = synth_shapes_qa(
        args.outdir, args.images, args.size, args.turns, args.seed, not args.quiet,
        overwrite=args.overwrite, single_turn=args.single_turn,
    )  # fmt: skip
    print(f"wrote {args.images} images + Q&A -> {path}")
    return 0


def _features(args: argparse.Namespace) -> int:
    from mmkit.config import parse_cli
    from mmkit.data.features import extract_features
    from mmkit.data.video import VideoDataset
    from mmkit.device import resolve_device
    from mmkit.outputs import check_output_dir
    from mmkit.train.build import build_task

    check_output_dir(args.outdir, "data features", args.overwrite)  # before the encoders load
    overrides = [f"--{o}" if "=" in o and not o.startswith("--") else o for o in args.overrides]
    cfg = parse_cli(["--config", args.config, *overrides])
    d = cfg.data
    ds = VideoDataset(d.paths, d.num_frames, d.height, d.width, d.train_fps, d.max_samples, cfg.train.seed)
    task = build_task(cfg, resolve_device(cfg.train.device))
    out = extract_features(task, ds, args.outdir, overwrite=args.overwrite)
    print(f"wrote {len(ds)} feature files -> {out} (train with --data.precomputed_dir {out})")
    return 0
