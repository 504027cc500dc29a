"""`mmkit data ...`: dataset tools. Subcommands: `convert llava IN OUT [--image-root DIR]`.

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
