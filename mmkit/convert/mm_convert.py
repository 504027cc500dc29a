"""`mm-convert`: the converter-class command line MindSpeed-MM users already type, mapped onto `mmkit convert`.

    mm-convert Qwen2_5_VLConverter hf_to_mm --cfg.mm_dir OUT --cfg.hf_config.hf_dir IN \\
        --cfg.parallel_config.llm_pp_layers [[12,16]] --cfg.parallel_config.vit_pp_layers [[32,0]] \\
        --cfg.parallel_config.tp_size 1
    mm-convert Qwen2_5_VLConverter mm_to_hf --cfg.mm_dir IN --cfg.save_hf_dir OUT --cfg.hf_config.hf_dir HF
    mm-convert WanConverter resplit --cfg.source_path IN --cfg.target_path OUT \\
        --cfg.target_parallel_config.pp_layers [15,15]

Converters: `Qwen2_5_VLConverter`, `WanConverter`; actions `hf_to_mm`, `mm_to_hf`, `resplit`. Field names are
MindSpeed's (both its VLM spelling, `mm_dir` / `hf_config.hf_dir` / `save_hf_dir` / `source_dir` /
`target_dir`, and its Sora/Wan spelling, `source_path` / `target_path` / `hf_dir`); values are JSON where
they parse (`[[12,16]]`, `1`, `true`), text otherwise. The work is `mmkit.convert.checkpoint_io`'s, so
layouts are validated exactly as `mmkit convert` does, with the same errors, naming these fields.
A source layout given for mm_to_hf / resplit is checked against the checkpoint's layout.json (mmkit
reads the source layout from disk).
"""

from __future__ import annotations

import difflib
import json
import sys

CONVERTERS = {"Qwen2_5_VLConverter": "qwen2_5_vl", "WanConverter": "wan"}
ACTIONS = ("hf_to_mm", "mm_to_hf", "resplit")
_LAYOUT = ("tp_size", "llm_pp_layers", "vit_pp_layers", "pp_layers", "ep_size")


def _group(prefix: str, role: str) -> dict[str, str]:
    return {f"{prefix}.{k}": f"{role}.{k}" for k in _LAYOUT}


# action -> {MindSpeed field (after "cfg."): role}; roles: src, out, init_from, target.*, source.*, ignored
FIELDS = {
    "hf_to_mm": {
        "hf_config.hf_dir": "src",
        "source_path": "src",
        "hf_dir": "src",
        "mm_dir": "out",
        "target_path": "out",
        **_group("parallel_config", "target"),
        **_group("target_parallel_config", "target"),
        "trust_remote_code": "ignored",
    },
    "mm_to_hf": {
        "mm_dir": "src",
        "source_path": "src",
        "save_hf_dir": "out",
        "target_path": "out",
        "hf_config.hf_dir": "init_from",
        "hf_dir": "init_from",
        **_group("parallel_config", "source"),
        **_group("source_parallel_config", "source"),
        "trust_remote_code": "ignored",
    },
    "resplit": {
        "source_dir": "src",
        "source_path": "src",
        "mm_dir": "src",
        "target_dir": "out",
        "target_path": "out",
        "hf_config.hf_dir": "init_from",
        "hf_dir": "init_from",
        **_group("source_parallel_config", "source"),
        **_group("target_parallel_config", "target"),
        **_group("parallel_config", "target"),
        "trust_remote_code": "ignored",
    },
}
_REQUIRED = {
    "hf_to_mm": {"src": "hf_config.hf_dir", "out": "mm_dir"},
    "mm_to_hf": {"src": "mm_dir", "out": "save_hf_dir"},
    "resplit": {"src": "source_dir", "out": "target_dir"},
}


class UsageError(ValueError):
    """A command line mm-convert cannot run."""


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

    Example: `parse_args(["WanConverter", "resplit", "--cfg.source_path", "a", "--cfg.target_path", "b"])`
    -> `("wan", "resplit", {"source_path": "a", "target_path": "b"})`.
    """
    if len(argv) < 2 or argv[0].startswith("-") or argv[1].startswith("-"):
        raise UsageError(
            f"usage: mm-convert {{{'|'.join(CONVERTERS)}}} {{{'|'.join(ACTIONS)}}} --cfg.<field> VALUE ..."
        )
    converter, action = argv[0], argv[1]
    if converter not in CONVERTERS:
        raise UsageError(
            f"unknown converter {converter!r}{_closest(converter, CONVERTERS)} Known converters: "
            f"{', '.join(CONVERTERS)}"
        )
    if action not in ACTIONS:
        raise UsageError(
            f"{converter}: unknown action {action!r}{_closest(action, ACTIONS)} Actions: {', '.join(ACTIONS)}"
        )
    fields: dict[str, object] = {}
    rest = list(argv[2:])
    while rest:
        flag = rest.pop(0)
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
    return CONVERTERS[converter], action, fields


def _layout(family: str, action: str, fields: dict, role: str) -> tuple[dict, dict[str, str]]:
    """`{tp, pp_layers, vit_pp_layers}` from the fields of one role ("target" / "source"), plus the names
    layout errors should use for them (the fields as the user typed them)."""
    got = {}  # layout key (tp_size, ...) -> (field name, value)
    for name, value in fields.items():
        role_key = FIELDS[action][name]
        if role_key.startswith(role + "."):
            got[role_key.split(".", 1)[1]] = (name, value)
    out: dict = {}
    names: dict[str, str] = {}
    if "ep_size" in got and got["ep_size"][1] != 1:
        raise UsageError(
            f"cfg.{got['ep_size'][0]}={got['ep_size'][1]}: mmkit's models have no experts; use 1"
        )
    if "tp_size" in got:
        name, tp = got["tp_size"]
        if not isinstance(tp, int) or isinstance(tp, bool):
            raise UsageError(f"cfg.{name}={tp!r}: must be an integer")
        out["tp"], names["parallel.tp"] = tp, f"cfg.{name}"
    if "llm_pp_layers" in got and "pp_layers" in got:
        raise UsageError(f"give cfg.{got['llm_pp_layers'][0]} or cfg.{got['pp_layers'][0]}, not both")
    if "llm_pp_layers" in got or "pp_layers" in got:
        name, value = got.get("llm_pp_layers") or got["pp_layers"]
        if family == "wan" and name.endswith("llm_pp_layers"):
            raise UsageError(
                f"cfg.{name}: WanConverter takes its pipeline split as cfg.{name.replace('llm_', '')}"
            )
        out["pp_layers"] = value
        names["parallel.pp_layers"], names["parallel.pp"] = f"cfg.{name}", "pp size"
    if "vit_pp_layers" in got:
        name, value = got["vit_pp_layers"]
        if family == "wan":
            raise UsageError(
                f"cfg.{name}: Wan has no vision tower; drop it (the DiT's split is cfg.{name.replace('vit_', '')})"
            )
        out["vit_pp_layers"], names["vit_pp_layers"] = value, f"cfg.{name}"
    return out, names


def _one(fields: dict, action: str, role: str) -> str | None:
    """The value (a path, as text) of the single field filling `role` (src / out / init_from)."""
    hits = [(k, v) for k, v in fields.items() if FIELDS[action][k] == role]
    if len(hits) > 1:
        raise UsageError(f"cfg.{hits[0][0]} and cfg.{hits[1][0]} both set the {role}; give one")
    if not hits:
        need = _REQUIRED[action].get(role)
        if need:
            raise UsageError(
                f"{action}: cfg.{need} is required (the {'input' if role == 'src' else 'output'} path)"
            )
        return None
    return str(hits[0][1])


def run(family: str, action: str, fields: dict, progress: bool = True):
    """Run one parsed mm-convert command with `mmkit.convert.checkpoint_io`; returns the output path.

    Example: `run("wan", "resplit", {"source_path": "a", "target_path": "b"})`.
    """
    from mmkit.convert import checkpoint_io as io

    src, out = _one(fields, action, "src"), _one(fields, action, "out")
    init_from = _one(fields, action, "init_from")
    if action != "hf_to_mm":  # a stated source layout must be the one on disk; checked before reading
        stated, names = _layout(family, action, fields, "source")
        if stated:
            labels = {"tp": names.get("parallel.tp"), "pp_layers": names.get("parallel.pp_layers")}
            io.check_source_layout(src, tp=stated.get("tp"), pp_layers=stated.get("pp_layers"), labels=labels)
    if action == "mm_to_hf":
        return io.mm_to_hf(src, out, family=family, init_from=init_from, progress=progress)
    layout, names = _layout(family, action, fields, "target")
    if action == "hf_to_mm":
        return io.hf_to_mm(src, out, family=family, names=names, progress=progress, **layout)
    return io.resplit(src, out, family=family, init_from=init_from, names=names, progress=progress, **layout)


def main(argv: list[str] | None = None) -> int:
    """The `mm-convert` console script; returns the exit code (0 ok, 2 a user error printed on stderr).

    Example: `main(["Qwen2_5_VLConverter", "hf_to_mm", "--cfg.mm_dir", "out", "--cfg.hf_config.hf_dir", "qwen"])`.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]) or not argv:
        print(__doc__)
        return 0
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
