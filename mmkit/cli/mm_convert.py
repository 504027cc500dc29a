"""`mm-convert`: the converter-class command line MindSpeed-MM users already type, mapped onto `mmkit convert`.

    mm-convert Qwen2_5_VLConverter hf_to_mm --cfg.mm_dir OUT --cfg.hf_config.hf_dir IN \\
        --cfg.parallel_config.llm_pp_layers [[12,16]] --cfg.parallel_config.vit_pp_layers [[32,0]] \\
        --cfg.parallel_config.tp_size 1
    mm-convert Qwen2_5_VLConverter mm_to_hf --cfg.mm_dir IN --cfg.save_hf_dir OUT --cfg.hf_config.hf_dir HF
    mm-convert WanConverter resplit --cfg.source_path IN --cfg.target_path OUT \\
        --cfg.target_parallel_config.pp_layers [15,15]
    mm-convert OpenSoraPlanConverter --version v1.3 hf_to_mm --cfg.source_path IN --cfg.target_path OUT \
        --cfg.target_parallel_config.tp_size 2 --cfg.target_parallel_config.pp_layers [[4,4],[12,12]]
    mm-convert OpenSoraPlanConverter --version v1.3 vae_convert --cfg.source_path VAE --cfg.target_path OUT

Converters: each model family's (`Qwen2_5_VLConverter`, `WanConverter`, `OpenSoraPlanConverter`; a
`--version` before the action names the flavor generation, e.g. v1.3); actions `hf_to_mm`, `mm_to_hf`,
`resplit`, and `vae_convert` (the family's VAE between its release file and the diffusers layout;
`--cfg.to diffusers|original`, default: the other layout than the source's). `--overwrite` replaces an earlier
mmkit output at the target (a folder mmkit did not write is never touched). Field names are MindSpeed's; values are JSON where they parse (`[[12,16]]`, `1`, `true`), text
otherwise. The fields' meaning and the work are `mmkit.convert.mm_convert`'s.
"""

from __future__ import annotations

import difflib
import json
import sys

from mmkit import registry
from mmkit.convert.mm_convert import ACTIONS, FIELDS, UsageError, run


def _closest(word: str, known) -> str:
    near = difflib.get_close_matches(word, list(known), n=1, cutoff=0.5)
    return f"; did you mean {near[0]!r}?" if near else ""


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_args(argv: list[str]) -> tuple[str, str, dict[str, object]]:
    """(family, action, {field: value}) of an mm-convert command line; UsageError naming what is wrong.

    `--overwrite` (anywhere after the action) sets the field "overwrite" to True.
    Example: `parse_args(["WanConverter", "resplit", "--cfg.source_path", "a", "--cfg.target_path", "b"])`
    -> `("wan", "resplit", {"source_path": "a", "target_path": "b"})`.
    """
    converters = sorted(s.converter for s in registry.specs())
    if len(argv) < 2 or argv[0].startswith("-") or (argv[1].startswith("-") and argv[1] != "--version"):
        raise UsageError(
            f"usage: mm-convert {{{'|'.join(converters)}}} {{{'|'.join(ACTIONS)}}} --cfg.<field> VALUE ..."
        )
    converter, argv = argv[0], list(argv)
    spec = registry.by_converter(converter)
    if spec is None:
        raise UsageError(
            f"unknown converter {converter!r}{_closest(converter, converters)} Known converters: "
            f"{', '.join(converters)}"
        )
    if argv[1] == "--version":  # MindSpeed's `OpenSoraPlanConverter --version v1.3 ACTION`
        if len(argv) < 4:
            raise UsageError(f"{converter} --version VERSION ACTION: give the version and then the action")
        version = argv[2]
        # a version names a generation of the family's flavors ("v1.3" of "v1.3-2B")
        versions = sorted({f.split("-")[0] for f in spec.flavor_names() if f.startswith("v")})
        if version not in versions:
            raise UsageError(
                f"{converter} --version {version!r}: choose one of {', '.join(versions) or '(none: drop --version)'}"
            )
        argv = [converter, *argv[3:]]
    action = argv[1]
    if action not in ACTIONS:
        raise UsageError(
            f"{converter}: unknown action {action!r}{_closest(action, ACTIONS)} Actions: {', '.join(ACTIONS)}"
        )
    fields: dict[str, object] = {}
    rest = list(argv[2:])
    while rest:
        flag = rest.pop(0)
        if flag == "--overwrite":  # mmkit's flag, as in `mmkit convert`: replace an earlier mmkit output
            fields["overwrite"] = True
            continue
        if not flag.startswith("--cfg."):
            raise UsageError(f"{flag!r}: every setting is --cfg.<field> VALUE (e.g. --cfg.mm_dir OUT)")
        name, eq, text = flag[len("--cfg.") :].partition("=")
        if not eq:
            if not rest:
                raise UsageError(f"--cfg.{name} needs a value")
            text = rest.pop(0)
        if name not in FIELDS[action]:
            known = sorted(FIELDS[action])
            raise UsageError(
                f"{action}: unknown field cfg.{name}{_closest(name, known)} Fields: {', '.join('cfg.' + k for k in known)}"
            )
        fields[name] = _value(text)
    return spec.name, action, fields


def main(argv: list[str] | None = None) -> int:
    """The `mm-convert` console script; returns the exit code (0 ok, 2 a user error printed on stderr).

    Example: `main(["Qwen2_5_VLConverter", "hf_to_mm", "--cfg.mm_dir", "out", "--cfg.hf_config.hf_dir", "qwen"])`.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if not argv:  # nothing to do is a usage error, not a success
        print(__doc__, file=sys.stderr)
        print("mm-convert: error: give a converter and an action (see above)", file=sys.stderr)
        return 2
    try:
        family, action, fields = parse_args(argv)
        out = run(family, action, fields)
    except (ValueError, FileNotFoundError) as e:
        print(f"mm-convert: error: {e}", file=sys.stderr)
        return 2
    print(f"mm-convert {argv[0]} {action}: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
