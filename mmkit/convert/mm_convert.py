"""MindSpeed-MM converter fields mapped onto mmkit's conversions (`ops.py`), for the `mm-convert` command
(`mmkit/cli/mm_convert.py` parses the command line).

MindSpeed's field names are accepted in both its VLM spelling (`mm_dir` / `hf_config.hf_dir` /
`save_hf_dir` / `source_dir` / `target_dir`) and its Sora/Wan spelling (`source_path` / `target_path` /
`hf_dir`). Layouts are validated exactly as `mmkit convert` does, with the same errors, naming these
fields. A source layout given for mm_to_hf / resplit is checked against the checkpoint's layout.json
(mmkit reads the source layout from disk). The family is the registry's (`registry.by_converter`).

Example:
    >>> run("wan", "resplit", {"source_path": "a", "target_path": "b", "target_parallel_config.tp_size": 2})
"""

from __future__ import annotations

from mmkit import registry
from mmkit.checkpoint.layouts import has_vision_tower
from mmkit.convert import ops

ACTIONS = ("hf_to_mm", "mm_to_hf", "resplit", "vae_convert")
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
    # the family's VAE between its release file and the diffusers layout (`FamilySpec.vae_convert`)
    "vae_convert": {"source_path": "src", "target_path": "out", "to": "to"},
}
_REQUIRED = {
    "hf_to_mm": {"src": "hf_config.hf_dir", "out": "mm_dir"},
    "mm_to_hf": {"src": "mm_dir", "out": "save_hf_dir"},
    "resplit": {"src": "source_dir", "out": "target_dir"},
    "vae_convert": {"src": "source_path", "out": "target_path"},
}


class UsageError(ValueError):
    """A command line mm-convert cannot run."""


def _layout(family: str, action: str, fields: dict, role: str) -> tuple[dict, dict[str, str]]:
    """`{tp, pp_layers, vit_pp_layers}` from the fields of one role ("target" / "source"), plus the names
    layout errors should use for them (the fields as the user typed them)."""
    spec = registry.get(family)
    vision = has_vision_tower(family)  # a VLM: its LLM split is llm_pp_layers, its tower's vit_pp_layers
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
        if not vision and name.endswith("llm_pp_layers"):
            raise UsageError(
                f"cfg.{name}: {spec.converter} takes its pipeline split as cfg.{name.replace('llm_', '')}"
            )
        out["pp_layers"] = value if value != [] else None  # [] = no pipeline split (MindSpeed's spelling)
        names["parallel.pp_layers"], names["parallel.pp"] = f"cfg.{name}", "pp size"
    if "vit_pp_layers" in got:
        name, value = got["vit_pp_layers"]
        if not vision:
            raise UsageError(
                f"cfg.{name}: {spec.title} has no vision tower; drop it (its pipeline split is cfg.{name.replace('vit_', '')})"
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
    """Run one parsed mm-convert command with `mmkit.convert.ops`; returns the output path.

    `fields["overwrite"]` (the `--overwrite` flag) lets an earlier mmkit output at the target be replaced.

    Example: `run("wan", "resplit", {"source_path": "a", "target_path": "b"})`.
    """
    fields = dict(fields)
    overwrite = bool(fields.pop("overwrite", False))
    src, out = _one(fields, action, "src"), _one(fields, action, "out")
    if action == "vae_convert":
        to = str(fields.get("to", "auto"))
        convert = registry.get(family).resolve("vae_convert")
        return convert(src, out, to=to, progress=progress, overwrite=overwrite)
    init_from = _one(fields, action, "init_from")
    if action != "hf_to_mm":  # a stated source layout must be the one on disk; checked before reading
        stated, names = _layout(family, action, fields, "source")
        if stated:
            labels = {"tp": names.get("parallel.tp"), "pp_layers": names.get("parallel.pp_layers")}
            ops.check_source_layout(
                src, tp=stated.get("tp"), pp_layers=stated.get("pp_layers"), labels=labels
            )
    if action == "mm_to_hf":
        return ops.mm_to_hf(
            src, out, family=family, init_from=init_from, progress=progress, overwrite=overwrite
        )
    layout, names = _layout(family, action, fields, "target")
    common = dict(family=family, names=names, progress=progress, overwrite=overwrite, **layout)
    if action == "hf_to_mm":
        return ops.hf_to_mm(src, out, **common)
    return ops.resplit(src, out, init_from=init_from, **common)
