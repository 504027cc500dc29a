"""The one configuration tree of a training run: dataclasses, file loading, CLI overrides, validation.

A run is `Config` = seven sections (`model`, `data`, `train`, `optim`, `checkpoint`, `parallel`,
`logging`). Every field carries its documentation in `field(metadata={"help": ...})`; `describe()`
prints them all, and `save_resolved` writes them as comments next to the values.

Sources, later wins: dataclass defaults < a TOML file (YAML too if PyYAML is importable) < dotted
command-line overrides `--section.field value`. Values are coerced to the field's declared type
(`int`, `float`, `bool`, `str`, lists such as `[12,16]` or `a.txt,b.txt`, nested lists, `none` for an
optional field). Unknown sections or fields are an error that names the closest valid one.
`validate` checks every value before any compute and raises one `ConfigError` listing each bad
field, its value and the fix.

What this module does not hold: model hyper-parameters (they come from `model.flavor` or the HF
folder in `model.init_from`), and layout checks that need the model (heads vs tp, pipeline layers),
which live in `mmkit/parallel/`.

Example:
    >>> cfg = parse_cli(["--config", "recipes/tiny/wan_t2v.toml", "--train.steps", "20"])
    >>> cfg.train.steps, cfg.grad_accum_steps
    (20, 1)
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import sys
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib


class ConfigError(ValueError):
    """A user-fixable configuration problem (unknown key, bad type, impossible value)."""


def _f(default: Any, help: str) -> Any:
    """A dataclass field with its documentation; lists get a fresh copy per instance."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


# ---------------------------------------------------------------------------------------------------
# The tree
# ---------------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    """What to train and how its parts are held."""

    family: str = _f("wan", "model family: 'wan' (Wan2.1 video DiT) or 'qwen2_5_vl' (Qwen2.5-VL)")
    flavor: str = _f(
        "tiny",
        "named size used when init_from is unset: wan: tiny, 1.3B, 14B, i2v-14B-480P, i2v-14B-720P; "
        "qwen2_5_vl: tiny, 3B, 7B, 32B, 72B. With init_from, the folder's config decides the architecture",
    )
    init_from: str | None = _f(
        None, "Hugging Face folder (diffusers or transformers layout) to initialise the weights from"
    )
    task: str = _f("t2v", "t2v or i2v (wan), sft (qwen2_5_vl)")
    freeze_vision: bool = _f(False, "qwen2_5_vl: keep the vision tower's weights fixed")
    freeze_merger: bool = _f(False, "qwen2_5_vl: keep the patch merger (vision->LLM projector) fixed")
    freeze_llm: bool = _f(False, "qwen2_5_vl: keep the language model (and LM head) fixed")
    activation_checkpointing: str = _f(
        "none", "recompute activations in backward: none, full (every block) or selective (every k-th)"
    )
    ac_every_k: int = _f(1, "selective activation checkpointing: checkpoint every k-th block (k >= 1)")
    compile: str = _f(
        "none",
        "torch.compile every block (after TP/CP/checkpointing, before FSDP2): none, inductor, or aot_eager "
        "(no codegen; for checks). Off by default: no gain on CPU, and compiling costs seconds per shape",
    )
    dtype: str = _f(
        "fp32",
        "storage dtype of the frozen parts (text encoder, VAE, CLIP, frozen towers): fp32, bf16 or fp16. "
        "Trainable parameters are always fp32 (the optimizer's master weights)",
    )


@dataclass
class DataConfig:
    """Where samples come from and how they are shaped."""

    paths: list[str] = _f(
        [],
        "dataset files: video data.txt files (lines '<video_root>,<annotation.json>') or SFT JSON/JSONL "
        "messages files. CLI: a comma list 'a.txt,b.txt' or '[a.txt, b.txt]'",
    )
    media_root: str | None = _f(None, "sft: folder that relative image/video paths are resolved against")
    num_frames: int = _f(81, "video: frames per sample, of the form 4k+1 (the Wan VAE's temporal stride)")
    height: int = _f(480, "video: frame height in pixels after resize + centre crop (multiple of 16)")
    width: int = _f(832, "video: frame width in pixels after resize + centre crop (multiple of 16)")
    train_fps: float = _f(16.0, "video: frames are sampled at this rate (frames per second)")
    max_samples: int | None = _f(None, "use at most this many samples (per dataset); unset = all")
    cutoff_len: int = _f(4096, "sft: maximum tokens per sample")
    packing: bool = _f(False, "sft: pack several samples into one row, attention kept inside each sample")
    text_dropout: float = _f(
        0.1, "video: probability of replacing the caption with the empty prompt (classifier-free guidance)"
    )
    mask_type_ratios: list[float] | None = _f(
        None,
        "opensoraplan i2v: relative weights of the mask types [t2iv, i2v, transition, continuation, clear, "
        "random_temporal]; unset = the release's [1, 8, 8, 2, 0, 1] (mask_config.yaml)",
    )
    mask_draws: int = _f(
        0,
        "opensoraplan i2v: fixed mask draws per sample for the random mask types (continuation, "
        "random_temporal); 0 = a fresh draw at every visit. `mmkit data features` encodes max(1, this) masked "
        "videos per sample and type, training on them picks one per visit; raw videos with the same value "
        "draw the same masks",
    )
    precomputed_dir: str | None = _f(
        None, "video: folder of precomputed VAE latents + text embeddings; unset = encode on the fly"
    )
    num_workers: int = _f(0, "DataLoader worker processes (0 = load in the training process)")


@dataclass
class TrainConfig:
    """Steps, batch sizes, precision and the diffusion loss."""

    steps: int = _f(1000, "optimizer steps to train for")
    seed: int = _f(0, "seed for every RNG; the same config and seed give the same loss curve on CPU")
    global_batch: int = _f(
        8, "samples per optimizer step over all processes; = micro_batch x data-parallel size x accumulation"
    )
    micro_batch: int = _f(1, "samples per forward/backward on one process")
    device: str = _f("auto", "auto, cpu, cuda, npu or mps (an index like cuda:1 is allowed)")
    mixed_precision: str = _f(
        "fp32", "compute dtype: bf16 (autocast, fp32 master weights and reductions) or fp32"
    )
    grad_clip: float = _f(1.0, "clip the global gradient norm to this value; 0 = no clipping")
    ema: bool = _f(False, "keep an exponential moving average of the trainable weights")
    ema_decay: float = _f(0.9999, "EMA decay per step, in (0, 1)")
    loss: str = _f(
        "flow",
        "video: 'flow' (flow matching, target noise - x0) or 'v_pred_zero_snr' (v-prediction, "
        "zero-terminal-SNR rescale). sft always uses next-token cross-entropy",
    )
    timestep_sampling: str = _f("uniform", "video: how training timesteps are drawn: uniform or logit_normal")
    logit_mean: float = _f(0.0, "logit_normal timestep sampling: mean of the normal before the sigmoid")
    logit_std: float = _f(1.0, "logit_normal timestep sampling: std of the normal before the sigmoid (> 0)")
    snr_gamma: float = _f(
        5.0, "v_pred_zero_snr (opensoraplan): min-SNR weights min(snr, gamma)/(snr+1); 0 = off"
    )
    timestep_strata: int = _f(
        1,
        "v_pred_zero_snr (opensoraplan): explicit uniform sampling, [0, 1000) cut into this many strata and "
        "each sample drawn from stratum (its position in the epoch order mod n); n = data-parallel size "
        "gives the original's per-rank strata",
    )
    flow_shift: float = _f(
        5.0, "video: shift of the flow-matching sigma schedule, sigma' = s*sigma/(1+(s-1)*sigma)"
    )
    nan_policy: str = _f(
        "stop",
        "a step whose loss or gradient norm is NaN/inf is never applied: 'stop' ends the run there (nothing "
        "saved from it); 'skip' drops that update, counts it and goes on",
    )
    max_bad_steps: int = _f(5, "nan_policy=skip: stop after this many non-finite steps in a row")


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule (mmkit/train/optim.py, mmkit/train/lr.py)."""

    lr: float = _f(1e-4, "peak learning rate, reached at the end of warmup")
    weight_decay: float = _f(0.01, "AdamW decoupled weight decay (not applied to biases, norms, 1-D params)")
    betas: list[float] = _f([0.9, 0.999], "AdamW (beta1, beta2), each in [0, 1)")
    eps: float = _f(1e-8, "AdamW epsilon")
    warmup_steps: int = _f(0, "linear warmup from lr/warmup_steps to lr over this many steps")
    schedule: str = _f("cosine", "after warmup: cosine (decays to min_lr at train.steps) or constant")
    min_lr: float = _f(0.0, "cosine schedule: final learning rate (<= lr)")


@dataclass
class CheckpointConfig:
    """Sharded DCP checkpoints (mmkit/checkpoint/dcp.py; the policy in mmkit/train/checkpoint.py)."""

    dir: str | None = _f(
        None, "folder for step_N checkpoints, the 'latest' pointer and the resolved config; unset = none"
    )
    interval: int = _f(0, "save every this many steps (and at the end); 0 = only at the end")
    keep_last: int = _f(0, "keep only the newest K step folders; 0 = keep all")
    no_save_rng: bool = _f(False, "do not save RNG states (MindSpeed --no-save-rng)")
    no_load_optim: bool = _f(
        False,
        "on resume, load weights, step and data position but not optimizer / LR state (--no-load-optim)",
    )
    resume: str = _f(
        "auto",
        "auto (latest in dir, if any), none (start fresh) or a path (a step_N folder or a checkpoint dir)",
    )
    fork: str | None = _f(
        None,
        "save into this new folder instead of dir (resuming from dir or checkpoint.resume): continues an "
        "earlier step without touching the later steps already in dir",
    )


@dataclass
class ParallelConfig:
    """Process layout. Product of the sizes (dp_replicate x dp_shard x tp x pp x cp) = world size."""

    dp_replicate: int = _f(1, "data-parallel replicas (HSDP's replicate dimension when dp_shard > 1)")
    dp_shard: int = _f(
        -1,
        "data-parallel shards (FSDP2: params, grads and optimizer state sharded); -1 = fill the world size",
    )
    tp: int = _f(1, "tensor-parallel degree")
    sequence_parallel: bool | None = _f(
        None, "shard norms/dropout over the sequence with tp; unset = on when tp > 1"
    )
    pp: int = _f(1, "pipeline-parallel stages")
    pp_layers: list[int] | list[list[int]] | None = _f(
        None, "layers per pipeline stage, e.g. [12,16]; nested lists for virtual stages; unset = even split"
    )
    pp_schedule: str = _f("1f1b", "pipeline schedule: gpipe, 1f1b or interleaved_1f1b")
    cp: int = _f(1, "context-parallel degree (the sequence is split over cp processes)")
    cp_algo: str = _f(
        "ulysses", "context-parallel algorithm: ulysses, ring or hybrid (ulysses inside, ring across)"
    )
    ulysses_degree: int | None = _f(None, "hybrid cp: size of the Ulysses groups (divides cp)")
    ring_window: int | None = _f(
        None, "ring cp: inner window size for the double-ring variant; unset = single ring"
    )


@dataclass
class LoggingConfig:
    """Console, JSONL, TensorBoard (mmkit/train/metrics.py)."""

    log_interval: int = _f(10, "write metrics (console line, JSONL, TensorBoard) every this many steps")
    metrics_file: str | None = _f(
        None, "JSONL metrics file, one line per logged step (alias: --metrics-file)"
    )
    tensorboard_dir: str | None = _f(None, "folder for TensorBoard event files; unset = no TensorBoard")
    log_tps: bool = _f(False, "show tokens/s on the console line (alias: --log-tps); the JSONL always has it")
    peak_tflops: float | None = _f(
        None, "peak TFLOP/s of one device for MFU; unset = device table, or measured once on CPU"
    )
    progress_bar: bool = _f(True, "show a tqdm progress bar with ETA")


@dataclass
class Config:
    """A whole run. Build with `load_config` / `parse_cli`, check with `validate`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def dp_size(self) -> int:
        """Data-parallel size dp_replicate x dp_shard (after `validate` resolved dp_shard=-1)."""
        assert self.parallel.dp_shard > 0, "call validate(cfg) first: it resolves parallel.dp_shard=-1"
        return self.parallel.dp_replicate * self.parallel.dp_shard

    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches per optimizer step on each process: global_batch / (micro_batch x dp_size)."""
        return self.train.global_batch // (self.train.micro_batch * self.dp_size)


SECTIONS: dict[str, type] = typing.get_type_hints(Config)  # section name -> its dataclass
# Flags tooling uses without the section prefix.
ALIASES = {"metrics-file": "logging.metrics_file", "log-tps": "logging.log_tps"}

_CHOICES = {
    "model.activation_checkpointing": ("none", "full", "selective"),
    "model.compile": ("none", "inductor", "aot_eager"),
    "model.dtype": ("fp32", "bf16", "fp16"),
    "train.mixed_precision": ("bf16", "fp32"),
    "train.loss": ("flow", "v_pred_zero_snr"),
    "train.timestep_sampling": ("uniform", "logit_normal"),
    "train.nan_policy": ("stop", "skip"),
    "optim.schedule": ("cosine", "constant"),
    "parallel.pp_schedule": ("gpipe", "1f1b", "interleaved_1f1b"),
    "parallel.cp_algo": ("ulysses", "ring", "hybrid"),
}


def _hints(klass: type) -> dict[str, Any]:
    return typing.get_type_hints(klass)


def field_names() -> list[str]:
    """Every dotted field name, e.g. `["model.family", ..., "logging.progress_bar"]`."""
    return [f"{s}.{f.name}" for s, k in SECTIONS.items() for f in dataclasses.fields(k)]


# Names other tools use for a field; spelling distance alone would match "learning_rate" to "ema_decay".
SYNONYMS = {
    "learning_rate": "optim.lr",
    "lr": "optim.lr",
    "max_steps": "train.steps",
    "num_steps": "train.steps",
    "train_steps": "train.steps",
    "batch_size": "train.global_batch",
    "warmup": "optim.warmup_steps",
    "output_dir": "checkpoint.dir",
    "save_dir": "checkpoint.dir",
    "save_interval": "checkpoint.interval",
}


def _synonym(name: str, known: list[str]) -> str | None:
    """The field another tool's name for it means, spelled as in `known` (with or without `--`)."""
    target = SYNONYMS.get(name.lstrip("-").rpartition(".")[2].replace("-", "_"))
    if target is None:
        return None
    return next((k for k in known if k.lstrip("-") == target), None)


def _unknown(kind: str, name: str, known: list[str], hint_pool: list[str] | None = None) -> ConfigError:
    """An unknown-key error naming the closest valid name (from `known`, else from `hint_pool`)."""
    syn = _synonym(name, known) or (_synonym(name, hint_pool) if hint_pool else None)
    if syn is not None:
        return ConfigError(f"unknown {kind} {name!r}; did you mean {syn!r}?")
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    if not close and hint_pool:
        close = difflib.get_close_matches(name, hint_pool, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid: {', '.join(known)}"
    return ConfigError(f"unknown {kind} {name!r}{hint}")


# ---------------------------------------------------------------------------------------------------
# Type coercion
# ---------------------------------------------------------------------------------------------------
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) if isinstance(tp, type) else str(tp).replace("typing.", "")


def _parse_list_text(text: str) -> list:
    """CLI text -> list: JSON (`[12,16]`, `[[1,2],[3]]`, `["a","b"]`) or a bare comma list (`a,b`, `[a, b]`)."""
    text = text.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            if "[" in text[1:]:
                raise ValueError("nested lists must be JSON, e.g. [[12,16],[8,8]]") from None
            text = text[1:-1] if text.endswith("]") else text[1:]
    return [part.strip() for part in text.split(",") if part.strip()]


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a file or CLI value to type `tp` (a field annotation), or raise a ConfigError naming `where`.

    Example: `coerce("[12,16]", list[int] | None, "parallel.pp_layers")` -> `[12, 16]`.
    """
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (
            value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", ""))
        ):
            return None
        for arm in args:
            if arm is type(None):
                continue
            try:
                return coerce(value, arm, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}={value!r}: expected {_type_name(tp)}")
    if origin is list:
        (elem,) = typing.get_args(tp)
        items = value
        if isinstance(value, str):
            try:
                items = _parse_list_text(value)
            except ValueError as e:
                raise ConfigError(f"{where}={value!r}: {e}") from None
        if not isinstance(items, list | tuple):
            raise ConfigError(f"{where}={value!r}: expected a list ({_type_name(tp)}), e.g. [1, 2]")
        return [coerce(v, elem, f"{where}[{i}]") for i, v in enumerate(items)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"{where}={value!r}: expected a boolean (true or false)")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{where}={value!r}: expected an integer, e.g. 8")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{where}={value!r}: expected a number, e.g. 1e-4")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        raise ConfigError(f'{where}={value!r}: expected a string; quote it in the file, e.g. "{value}"')
    raise AssertionError(f"{where}: unsupported field type {tp}")


# ---------------------------------------------------------------------------------------------------
# Building a Config from files and overrides
# ---------------------------------------------------------------------------------------------------
def set_value(cfg: Config, dotted: str, value: Any) -> None:
    """Set `section.field` on `cfg` after coercing `value` to the field's type (unknown keys: ConfigError).

    Example: `set_value(cfg, "train.steps", "20")` sets `cfg.train.steps = 20`.
    """
    dotted = ALIASES.get(dotted, dotted)
    section, _, name = dotted.partition(".")
    if section not in SECTIONS:
        raise _unknown("config section", section, list(SECTIONS), field_names())
    klass = SECTIONS[section]
    hints = _hints(klass)
    name = name.replace("-", "_")
    if name not in hints:
        # A field given under the wrong section ("train.lr") is found by searching every dotted name.
        others = [n for n in field_names() if n.split(".")[1] == name]
        if others:
            raise ConfigError(f"unknown field {dotted!r}; did you mean {others[0]!r}?")
        raise _unknown("field", f"{section}.{name}", [f"{section}.{n}" for n in hints], field_names())
    setattr(getattr(cfg, section), name, coerce(value, hints[name], f"{section}.{name}"))


def config_from_dict(d: dict, base: Config | None = None, source: str = "config") -> Config:
    """A Config from nested `{section: {field: value}}` (a parsed TOML/YAML file), strictly checked.

    Example: `config_from_dict({"train": {"steps": 10}})`.
    """
    cfg = _copy(base or Config())
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a table of sections, got {type(d).__name__}")
    for section, values in d.items():
        if section not in SECTIONS:
            raise ConfigError(
                f"{source}: " + str(_unknown("config section", section, list(SECTIONS), field_names()))
            )
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{section}] must be a table of fields, got {values!r}")
        for name, value in values.items():
            try:
                set_value(cfg, f"{section}.{name}", value)
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None
    return cfg


def _copy(cfg: Config) -> Config:
    return Config(**{s: dataclasses.replace(getattr(cfg, s)) for s in SECTIONS})


def read_config_file(path: str | os.PathLike) -> dict:
    """Parse a TOML (or, with PyYAML installed, YAML) config file into nested dicts.

    Example: `read_config_file("recipes/tiny/wan_t2v.toml")["train"]["steps"]`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config: no such file {str(path)!r}")
    suffix = path.suffix.lower()
    if suffix == ".toml":
        try:
            with open(path, "rb") as f:
                return tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{path}: YAML configs need PyYAML (pip install pyyaml), or use TOML") from None
        try:
            return yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
    raise ConfigError(f"--config {path}: unknown file type {suffix!r}; use .toml (or .yaml/.yml)")


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults < file at `path` < `overrides` (`{"train.steps": 20}`); not yet validated.

    Example: `cfg = validate(load_config("recipes/tiny/wan_t2v.toml", {"train.steps": 5}))`.
    """
    cfg = Config() if path is None else config_from_dict(read_config_file(path), source=str(path))
    for key, value in (overrides or {}).items():
        set_value(cfg, key, value)
    return cfg


def parse_overrides(argv: list[str]) -> tuple[str | None, list[tuple[str, Any]]]:
    """Split `[--config F] --a.b v --flag ...` into the config path and (dotted key, raw value) pairs.

    A flag without a value (`--checkpoint.no_save_rng`, or followed by another `--flag`) means true.
    Example: `parse_overrides(["--train.steps", "5", "--checkpoint.no_save_rng"])`
    -> `(None, [("train.steps", "5"), ("checkpoint.no_save_rng", True)])`.
    """
    config_path, pairs, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.field value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is None or nxt.startswith("--"):
                value = True
            else:
                value, i = nxt, i + 1
        i += 1
        if key == "config":
            if value is True:
                raise ConfigError("--config needs a file path, e.g. --config recipes/tiny/wan_t2v.toml")
            config_path = value
            continue
        key = ALIASES.get(key, key)
        if "." not in key:
            raise _unknown(
                "option", f"--{key}", [f"--{n}" for n in field_names()] + [f"--{a}" for a in ALIASES]
            )
        pairs.append((key, value))
    return config_path, pairs


def parse_cli(argv: list[str] | None = None, world_size: int | None = None) -> Config:
    """`mmkit train` arguments -> a validated Config. `-h`/`--help` prints every field and exits.

    Example: `parse_cli(["--config", "recipes/tiny/wan_t2v.toml", "--train.steps", "20",
    "--metrics-file", "out/metrics.jsonl"])`.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print("usage: mmkit train --config FILE.toml [--section.field VALUE ...]\n")
        print(describe())
        raise SystemExit(0)
    config_path, pairs = parse_overrides(argv)
    cfg = load_config(config_path)
    for key, value in pairs:
        if value is True:
            section, _, name = key.partition(".")
            klass = SECTIONS.get(section)
            hint = _hints(klass).get(name.replace("-", "_")) if klass else None
            if hint is not None and hint not in (bool, bool | None):
                raise ConfigError(f"--{key} needs a value (type {_type_name(hint)})")
        set_value(cfg, key, value)
    return validate(cfg, world_size)


# ---------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------
def _world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


class _Errors(list):
    """Collects `section.field=value: what is wrong; the fix` lines for one ConfigError."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg

    def bad(self, name: str, why: str) -> None:
        if any(line.startswith(f"{name}=") for line in self):
            return  # one problem per field: a NaN is not also "out of range"
        section, _, fld = name.partition(".")
        self.append(f"{name}={getattr(getattr(self.cfg, section), fld)!r}: {why}")


def validate(cfg: Config, world_size: int | None = None) -> Config:
    """Check every field before any compute; resolve `parallel.dp_shard=-1` and `sequence_parallel`.

    `world_size` defaults to the WORLD_SIZE environment variable (torchrun sets it), else 1. The rules are
    per section, then the model family's own (`FamilySpec.validate` in `models/<family>/spec.py`).
    Raises one ConfigError listing each problem as `section.field=value: what is wrong; the fix`.
    Example: `validate(Config(), world_size=1).dp_size` -> `1`.
    """
    from mmkit import registry

    world = _world_size_from_env() if world_size is None else world_size
    errs = _Errors(cfg)
    for name, choices in _CHOICES.items():
        section, _, fld = name.partition(".")
        if getattr(getattr(cfg, section), fld) not in choices:
            errs.bad(name, f"choose one of {', '.join(choices)}")
    if cfg.model.family not in registry.names():
        errs.bad("model.family", f"choose one of {', '.join(registry.names())}")
        spec = None
    else:
        spec = registry.get(cfg.model.family)
    nonfinite = _check_finite(cfg, errs)
    _check_model(cfg, spec, errs)
    _check_data(cfg, errs)
    _check_train(cfg, errs)
    _check_optim(cfg, errs, nonfinite)
    _check_checkpoint(cfg, errs)
    _check_parallel(cfg, world, errs)
    _check_batch(cfg, errs)
    _check_logging(cfg, errs)
    if spec is not None:
        errs.extend(spec.validate(cfg, world))
    if errs:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errs))
    return cfg


def _check_model(cfg: Config, spec, errs: _Errors) -> None:
    m = cfg.model
    if spec is not None:
        if m.task not in spec.tasks:
            errs.bad("model.task", f"family {m.family!r} supports task {' or '.join(spec.tasks)}")
        flavors = list(dict.fromkeys(["tiny", *spec.flavor_names()]))
        if m.init_from is None and m.flavor not in flavors:
            errs.bad(
                "model.flavor",
                f"unknown {m.family} flavor; choose one of {', '.join(flavors)} or set init_from",
            )
    if m.init_from is not None and not Path(m.init_from).is_dir():
        errs.bad(
            "model.init_from",
            "no such folder; give a Hugging Face model folder (with config.json or model_index.json)",
        )
    if m.ac_every_k < 1:
        errs.bad("model.ac_every_k", "must be >= 1 (1 = every block)")


def _check_data(cfg: Config, errs: _Errors) -> None:
    d = cfg.data
    for i, path in enumerate(d.paths):
        if not Path(path).exists():
            errs.append(f"data.paths[{i}]={path!r}: no such file; give an existing data.txt / JSON(L) file")
    if d.packing and cfg.model.task != "sft":
        errs.bad("data.packing", "applies to task sft only; set it to false")
    if d.max_samples is not None and d.max_samples < 1:
        errs.bad("data.max_samples", "must be >= 1, or unset for all samples")
    if d.cutoff_len < 1:
        errs.bad("data.cutoff_len", "must be >= 1 token")
    if d.num_workers < 0:
        errs.bad("data.num_workers", "must be >= 0")
    if d.precomputed_dir is not None and not Path(d.precomputed_dir).is_dir():
        errs.bad("data.precomputed_dir", "no such folder; precompute features first or unset it")


def _check_train(cfg: Config, errs: _Errors) -> None:
    t = cfg.train
    for name in ("steps", "global_batch", "micro_batch"):
        if getattr(t, name) < 1:
            errs.bad(f"train.{name}", "must be >= 1")
    if t.grad_clip < 0:
        errs.bad("train.grad_clip", "must be >= 0 (0 disables clipping)")
    if not 0.0 < t.ema_decay < 1.0:
        errs.bad("train.ema_decay", "must be in (0, 1), e.g. 0.9999")
    if t.logit_std <= 0:
        errs.bad("train.logit_std", "must be > 0")
    if t.flow_shift <= 0:
        errs.bad("train.flow_shift", "must be > 0 (1 = no shift)")
    if t.max_bad_steps < 1:
        errs.bad("train.max_bad_steps", "must be >= 1 (1 = stop at the first non-finite step)")
    from mmkit.device import DEVICES

    if t.device.split(":")[0] not in DEVICES:
        errs.bad("train.device", f"choose one of {', '.join(DEVICES)}")


def _check_finite(cfg: Config, errs: _Errors) -> list[str]:
    """NaN anywhere, and inf in a rate, is an error of its own field (not of a field compared with it);
    returns the names found, so the rules comparing fields skip them."""
    bad = []
    for section, klass in SECTIONS.items():
        for f in dataclasses.fields(klass):
            v = getattr(getattr(cfg, section), f.name)
            vals = v if isinstance(v, list) else [v]
            if any(isinstance(x, float) and math.isnan(x) for x in vals):
                errs.bad(f"{section}.{f.name}", "is not a number; give a finite value")
                bad.append(f"{section}.{f.name}")
    for name in ("optim.lr", "optim.min_lr"):
        section, _, fld = name.partition(".")
        v = getattr(getattr(cfg, section), fld)
        if name not in bad and math.isinf(v):
            errs.bad(name, "must be finite, e.g. 1e-4")
            bad.append(name)
    return bad


def _check_optim(cfg: Config, errs: _Errors, nonfinite: list[str]) -> None:
    o, steps = cfg.optim, cfg.train.steps
    if "optim.lr" in nonfinite or "optim.min_lr" in nonfinite:
        pass  # reported as such; comparing them with each other would blame the wrong field
    elif o.lr <= 0:
        errs.bad("optim.lr", "must be > 0, e.g. 1e-4")
    if o.weight_decay < 0:
        errs.bad("optim.weight_decay", "must be >= 0")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        errs.bad("optim.betas", "must be two values in [0, 1), e.g. [0.9, 0.999]")
    if o.eps <= 0:
        errs.bad("optim.eps", "must be > 0, e.g. 1e-8")
    if o.warmup_steps < 0:
        errs.bad("optim.warmup_steps", "must be >= 0")
    elif o.warmup_steps > steps >= 1:
        # a short smoke run of a long recipe: allowed, the rate simply never reaches optim.lr
        warnings.warn(
            f"optim.warmup_steps={o.warmup_steps} is longer than train.steps={steps}: the learning rate "
            f"reaches only {steps / o.warmup_steps:.2g} x optim.lr; set optim.warmup_steps <= {steps} for the full rate",
            stacklevel=3,
        )
    if not nonfinite and not 0.0 <= o.min_lr <= max(o.lr, 0.0):
        errs.bad("optim.min_lr", f"must be in [0, optim.lr={o.lr}]")


def _unwritable(path: Path) -> str | None:
    """Why checkpoints cannot be written into folder `path` (created if missing), or None."""
    if path.exists():
        if not path.is_dir():
            return "is a file, not a folder; give a folder path"
        if not os.access(path, os.W_OK | os.X_OK):
            return "is not writable (read-only?); choose a writable folder"
        return None
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot be created: {parent} is a file; give another folder path"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot be created: {parent} is not writable; choose a writable folder"
    return None


def _check_checkpoint(cfg: Config, errs: _Errors) -> None:
    c = cfg.checkpoint
    for name in ("dir", "fork"):
        value = getattr(c, name)
        why = _unwritable(Path(value)) if value else None
        if why:
            errs.bad(f"checkpoint.{name}", why)
    if c.fork and c.dir and Path(c.fork).resolve() == Path(c.dir).resolve():
        errs.bad("checkpoint.fork", "is checkpoint.dir itself; give a new folder for the continuation")
    if c.interval < 0:
        errs.bad("checkpoint.interval", "must be >= 0 (0 = save only at the end)")
    if c.keep_last < 0:
        errs.bad("checkpoint.keep_last", "must be >= 0 (0 = keep all)")
    if c.resume not in ("auto", "none") and not Path(c.resume).exists():
        errs.bad(
            "checkpoint.resume",
            "no such checkpoint; use auto, none, or an existing step_N folder / checkpoint dir",
        )


def _check_parallel(cfg: Config, world: int, errs: _Errors) -> None:
    """Sizes against the world size (resolving dp_shard=-1), and the context-parallel options."""
    p = cfg.parallel
    sizes_ok = True
    for name in ("dp_replicate", "tp", "pp", "cp"):
        if getattr(p, name) < 1:
            errs.bad(f"parallel.{name}", "must be >= 1")
            sizes_ok = False
    if p.dp_shard == 0 or p.dp_shard < -1:
        errs.bad("parallel.dp_shard", "must be >= 1, or -1 to fill the world size")
        sizes_ok = False
    if sizes_ok:
        others = p.dp_replicate * p.tp * p.pp * p.cp
        if p.dp_shard == -1:
            if world % others:
                errs.append(
                    f"parallel: dp_replicate x tp x pp x cp = {others} does not divide the world size {world}; "
                    f"launch a multiple of {others} processes or change the sizes"
                )
            else:
                p.dp_shard = world // others
        elif others * p.dp_shard != world:
            errs.append(
                f"parallel: dp_replicate({p.dp_replicate}) x dp_shard({p.dp_shard}) x tp({p.tp}) x pp({p.pp}) "
                f"x cp({p.cp}) = {others * p.dp_shard} != world size {world}; make the product {world} "
                "(dp_shard=-1 fills it automatically)"
            )
    if p.sequence_parallel is None:
        p.sequence_parallel = p.tp > 1
    if p.cp_algo == "hybrid" and p.cp >= 1:
        u = p.ulysses_degree
        if u is None or u < 1 or p.cp % u:
            errs.bad(
                "parallel.ulysses_degree",
                f"hybrid cp needs a Ulysses group size that divides cp={p.cp}, e.g. 2",
            )
    if p.ring_window is not None and p.ring_window < 1:
        errs.bad("parallel.ring_window", "must be >= 1, or unset for a single ring")
    elif p.ring_window is not None and p.cp >= 1 and p.cp_algo in ("ring", "hybrid"):
        u = p.ulysses_degree if p.cp_algo == "hybrid" and p.ulysses_degree else 1
        ring = p.cp // u if u >= 1 and p.cp % u == 0 else p.cp
        if ring % p.ring_window:
            errs.bad(
                "parallel.ring_window",
                f"the double ring splits the ring of {ring} ranks into inner rings of ring_window ranks; "
                f"use a divisor of {ring}: {[w for w in range(1, ring + 1) if ring % w == 0]}",
            )
    if p.cp > 1 and p.cp_algo not in ("ring", "hybrid") and p.ring_window is not None:
        errs.bad(
            "parallel.ring_window", f"only applies to cp_algo ring or hybrid, not {p.cp_algo!r}; unset it"
        )


def _check_batch(cfg: Config, errs: _Errors) -> None:
    """The global batch splits into micro-batches over the data-parallel ranks (needs a resolved dp_shard)."""
    p, t = cfg.parallel, cfg.train
    if p.dp_shard > 0 and t.micro_batch >= 1 and t.global_batch >= 1:
        dp = p.dp_replicate * p.dp_shard
        unit = t.micro_batch * dp
        if t.global_batch % unit:
            lo = max(unit, t.global_batch // unit * unit)
            errs.append(
                f"train.global_batch={t.global_batch}: not divisible by micro_batch ({t.micro_batch}) x "
                f"data-parallel size ({dp}) = {unit}; set it to a multiple of {unit} (e.g. {lo} or {lo + unit}) "
                "or change train.micro_batch"
            )


def _check_logging(cfg: Config, errs: _Errors) -> None:
    lg = cfg.logging
    if lg.log_interval < 1:
        errs.bad("logging.log_interval", "must be >= 1")
    if lg.peak_tflops is not None and lg.peak_tflops <= 0:
        errs.bad("logging.peak_tflops", "must be > 0, or unset")


# ---------------------------------------------------------------------------------------------------
# Writing and describing
# ---------------------------------------------------------------------------------------------------
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)  # 'inf', 'nan', '1e-05', '0.5' are all valid TOML floats
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string: JSON's escapes are a subset of TOML's
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise AssertionError(f"cannot write {v!r} to TOML")


def to_toml(cfg: Config) -> str:
    """The config as TOML text, each field preceded by its documentation; unset (None) fields are comments.

    Example: `print(to_toml(cfg))`; `config_from_dict(tomllib.loads(to_toml(cfg))) == cfg`.
    """
    lines = ["# mmkit resolved config (written by mmkit.config.save_resolved)"]
    for section, klass in SECTIONS.items():
        lines += ["", f"[{section}]"]
        for f in dataclasses.fields(klass):
            lines.append(f"# {f.metadata['help']}")
            value = getattr(getattr(cfg, section), f.name)
            lines.append(f"# {f.name} = (unset)" if value is None else f"{f.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


# Fields that name files or folders: saved configs hold them absolute, so resume and export work from
# any working directory.
PATH_FIELDS = (
    "model.init_from", "data.paths", "data.media_root", "data.precomputed_dir", "checkpoint.dir",
    "checkpoint.resume", "checkpoint.fork", "logging.metrics_file", "logging.tensorboard_dir",
)  # fmt: skip


def absolute_paths(cfg: Config) -> Config:
    """A copy of `cfg` with every path field absolute (`checkpoint.resume` auto/none kept).

    Example: `absolute_paths(cfg).model.init_from` -> `"/home/me/outputs/wan-tiny"`.
    """
    out = _copy(cfg)
    for name in PATH_FIELDS:
        section, _, fld = name.partition(".")
        v = getattr(getattr(out, section), fld)
        if v is None or (name == "checkpoint.resume" and v in ("auto", "none")):
            continue
        absolute = [os.path.abspath(x) for x in v] if isinstance(v, list) else os.path.abspath(v)
        setattr(getattr(out, section), fld, absolute)
    return out


def save_resolved(cfg: Config, directory: str | os.PathLike, name: str = "config.toml") -> Path:
    """Write the resolved config as `<directory>/config.toml` (atomically, paths absolute); returns its path.

    Example: `save_resolved(cfg, cfg.checkpoint.dir)`; re-run with `mmkit train --config <that file>`.
    """
    cfg = absolute_paths(cfg)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / name
    tmp = out.with_name(f".{name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(to_toml(cfg))
        f.flush()
        os.fsync(f.fileno())  # durable before the rename makes it visible
    os.replace(tmp, out)
    return out


def describe() -> str:
    """Every field as `--section.field (type, default): help`, for `mmkit train --help`.

    Example: `print(describe())`.
    """
    out = []
    for section, klass in SECTIONS.items():
        out.append(f"[{section}] {klass.__doc__}")
        hints = _hints(klass)
        for f in dataclasses.fields(klass):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append(f"  --{section}.{f.name} ({_type_name(hints[f.name])}, default {default!r})")
            out.append(f"      {f.metadata['help']}")
    out.append("aliases: " + ", ".join(f"--{a} = --{t}" for a, t in ALIASES.items()))
    return "\n".join(out)
