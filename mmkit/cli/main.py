"""The `mmkit` console script: one subcommand per thin module in `mmkit/cli/`."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help). Each module has `add_arguments(parser)` and `run(args)`.
COMMANDS = {
    "generate": ("mmkit.cli.generate", "text/image-to-video generation"),
    "create-tiny": ("mmkit.cli.create_tiny", "write a tiny random model folder in the real HF layout"),
    "chat": ("mmkit.cli.chat", "chat with a Qwen2.5-VL model about images and videos"),
    "data": ("mmkit.cli.data", "dataset tools: convert LLaVA/ShareGPT data to the messages format"),
    "train": ("mmkit.cli.train", "train or fine-tune from a recipe (TOML) with dotted overrides"),
    "demo": ("mmkit.cli.demo", "the end-to-end demo behind `make demo`"),
    "eval": ("mmkit.cli.eval", "measure the shapes models' prompt fidelity: eval shapes | shapes-qa"),
    "plot": ("mmkit.cli.plot", "plot a training metric (loss, ...) from a metrics JSONL file to PNG"),
    "accel": ("mmkit.cli.accel", "sampling acceleration: cache search, adaptive-cache calibration"),
    "convert": (
        "mmkit.cli.convert",
        "convert checkpoints: hf-to-mm, mm-to-hf, resplit (any tp/pp layout), vae-convert",
    ),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The CLI parser. With `only`, just that subcommand's module is imported (the others stay
    help-only stubs), so one subcommand's heavy or broken imports never affect another."""
    parser = argparse.ArgumentParser(prog="mmkit", description="Train, convert and serve multimodal models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or name == only:
            importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    if chosen == "train":  # the trainer parses its own --section.field overrides
        idx = argv.index("train")
        args = build_parser("train").parse_args(argv[: idx + 1])
        args.overrides = argv[idx + 1 :]
    else:
        parser = build_parser(chosen if chosen in COMMANDS else None)
        args, extra = parser.parse_known_args(argv)
        if extra and not hasattr(args, "overrides"):
            parser.parse_args(argv)  # argparse's own "unrecognized arguments" error and exit
        if extra:  # `mmkit data features OUT --config R a.b=c`: overrides after an option
            args.overrides = [*args.overrides, *extra]
    try:
        rc = importlib.import_module(args._module).run(args)
    except (ValueError, FileNotFoundError) as e:
        # User-caused errors: one clear line, no traceback.
        print(f"mmkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
