"""Sharded, atomic, resumable training checkpoints with torch.distributed.checkpoint (DCP).

Layout of `checkpoint.dir`:
```
config.toml                    the resolved run config (mmkit.config.save_resolved)
latest                         text: the name of the newest complete step folder, e.g. "step_200"
step_200/
  dcp/shard-0000R-model-00001-of-00001.safetensors   DCP shards (one file per writing rank):
                               model.<fqn>, optim.state.<fqn>.<key>, ema.<fqn>; offsets of sharded
                               (DTensor) pieces in each file's safetensors metadata
  config.toml                  the resolved config of the run that saved it (when given)
  train_state.json             step, data position, LR-scheduler state, world size, what is inside
  ranks/rank_0000R.json        per rank: RNG states (python, numpy, torch cpu, cuda) and the
                               optimizer's non-tensor hyper-parameters for that rank's parameters
  manifest.json                size + sha256 of every file above (checkpoint/files.py), written last
```
Tensors go through DCP's safetensors storage (`HuggingFaceStorageWriter/Reader`), everything else is
JSON: nothing is ever unpickled. DCP records where each shard of each tensor lives, so a checkpoint
saved by N processes in one layout (FSDP2, TP, plain) loads into M processes in another: the state
dicts come from `torch.distributed.checkpoint.state_dict.get_state_dict` and are resharded on load.

Atomicity: every rank writes into `<dir>/.tmp-step_N`; after a barrier, rank 0 writes the manifest,
fsyncs, renames it to `step_N`, then replaces `latest` (temp file + os.replace). Non-finite weights
are never written (NonFiniteWeightsError); a file-system failure is one CheckpointWriteError. A crash at any point leaves `latest`
naming the previous complete checkpoint; a leftover `.tmp-*` folder is deleted by the next save or
load. Works in one process without `init_process_group` and under torchrun (gloo/nccl).

When to save and what to resume from (the `checkpoint.*` policy) is `mmkit.train.checkpoint`'s; this
file is the format. `read_checkpoint_info` describes a checkpoint from its small files (for exporters).

Example:
    >>> save_checkpoint("ckpt", 100, model, opt, sched, data_state={"samples_seen": 800})
    >>> st = load_checkpoint("ckpt", model, opt, sched)                  # st.step == 100
    >>> sd = export_model_state("ckpt")                                   # full tensors, one process
"""

from __future__ import annotations

import base64
import errno
import json
import os
import random
import re
import shutil
import signal
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from mmkit.checkpoint.files import (
    MANIFEST,
    DamagedFileError,
    check_safetensors,
    verify_manifest,
    write_manifest,
)
from mmkit.parallel.comm import local_tensor

FORMAT_VERSION = 1
STEP_DIR_RE = re.compile(r"^step_(\d+)$")
TMP_PREFIX = ".tmp-"
LATEST = "latest"
# Flattened optimizer state dicts are keyed by parameter name, which is what makes them reshardable.
_OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


class CheckpointWriteError(ValueError):
    """A checkpoint could not be written (not a folder, read-only, disk full); the previous one is intact."""


class NonFiniteWeightsError(ValueError):
    """The weights to be saved or exported hold NaN or inf."""


# Fault injection for the kill -9 test: MMKIT_CKPT_KILL="<point>:<step>" sends SIGKILL to this process at
# that point of the save of that step; points: before_rename (the temp folder is complete, not yet
# renamed), after_rename (renamed, `latest` not yet updated).
KILL_ENV = "MMKIT_CKPT_KILL"


def _fault_point(point: str, step: int) -> None:
    if os.environ.get(KILL_ENV) == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class ResumeState:
    """What `load_checkpoint` restored besides the tensors: the step to continue after and the data position."""

    step: int
    data_state: dict = field(default_factory=dict)
    path: Path | None = None
    scheduler: dict | None = None  # the saved LR-scheduler state (None when the run saved none)


# ---------------------------------------------------------------------------------------------------
# Small helpers: ranks, fsync, JSON
# ---------------------------------------------------------------------------------------------------
def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without torch.distributed."""
    return (dist.get_rank(), dist.get_world_size()) if _dist_on() else (0, 1)


def _barrier() -> None:
    if _dist_on():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    """Make a rename/creation inside `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    """Write JSON and fsync it; atomically (temp + os.replace) so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_ready(obj: Any, what: str) -> Any:
    """Check `obj` survives JSON unchanged in meaning (tuples become lists); raise naming `what` if not."""
    try:
        return json.loads(json.dumps(obj))
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"checkpoint: {what} must be JSON-serialisable (numbers, strings, lists, dicts): {e}"
        ) from None


def _quiet_no_dist():
    """DCP warns on every single-process save/load; that mode is intended here."""
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    return ctx


# ---------------------------------------------------------------------------------------------------
# RNG states, as JSON
# ---------------------------------------------------------------------------------------------------
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict:
    """Every RNG this process uses (python, numpy, torch CPU, CUDA devices) as JSON-ready data.

    Example: `s = rng_state(); torch.rand(3); set_rng_state(s)` and `torch.rand(3)` repeats.
    """
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch_cpu": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned. Example: `set_rng_state(rng_state())`."""
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch_cpu"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


# ---------------------------------------------------------------------------------------------------
# Finding checkpoints
# ---------------------------------------------------------------------------------------------------
def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Complete `step_N` folders in `ckpt_dir`, oldest first. Example: `list_checkpoints("ckpt")[-1]`."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if p.is_dir() and (m := STEP_DIR_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def find_latest(ckpt_dir: str | os.PathLike) -> Path | None:
    """The folder `<ckpt_dir>/latest` names; without a pointer, the newest complete `step_N`; else None.

    Example: `find_latest("outputs/run1/ckpt")` -> `Path("outputs/run1/ckpt/step_200")`.
    """
    d = Path(ckpt_dir)
    pointer = d / LATEST
    if pointer.is_file():
        target = d / pointer.read_text().strip()
        if (target / "train_state.json").is_file():
            return target
        warnings.warn(
            f"checkpoint: {pointer} names {target.name}, which is missing; using the newest step folder",
            stacklevel=2,
        )
    steps = list_checkpoints(d)
    return steps[-1] if steps else None


def resolve_step_dir(path: str | os.PathLike) -> Path:
    """A step folder, or a checkpoint dir (-> its latest step folder); FileNotFoundError if neither.

    Example: `resolve_step_dir("ckpt")` -> `Path("ckpt/step_200")`; its `config.toml` is the run's config.
    """
    p = Path(path)
    if (p / "train_state.json").is_file():
        return p
    latest = find_latest(p) if p.is_dir() else None
    if latest is None:
        raise FileNotFoundError(
            f"checkpoint: {str(p)!r} is neither a step_N checkpoint folder nor a checkpoint dir with one; "
            "check checkpoint.resume / checkpoint.dir"
        )
    return latest


def clean_tmp(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Delete leftover `.tmp-step_N` folders of killed saves (rank 0 only); returns what was removed."""
    d = Path(ckpt_dir)
    if rank_world()[0] != 0 or not d.is_dir():
        return []
    removed = [p for p in d.iterdir() if p.name.startswith(TMP_PREFIX + "step_") and p.is_dir()]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


# ---------------------------------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------------------------------
def _split_optim(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Flattened optimizer state -> (tensors for DCP, non-tensor hyper-parameters for JSON)."""
    osd = get_optimizer_state_dict(model, optimizer, options=_OPTIM_OPTIONS)
    tensors = {k: v for k, v in osd.items() if isinstance(v, torch.Tensor)}
    others = {k: v for k, v in osd.items() if not isinstance(v, torch.Tensor)}
    return tensors, others


def _untied(sd: dict) -> tuple[dict, dict[str, str]]:
    """Drop second names of shared tensors (tied embeddings: LM head = token embedding), which DCP's
    safetensors storage cannot write twice; returns (state, {alias: kept name}) to re-tie on load."""
    seen: dict = {}
    out, aliases = {}, {}
    for k, v in sd.items():
        t = local_tensor(v)
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else None
        if key is not None and key in seen:
            aliases[k] = seen[key]
            continue
        if key is not None:
            seen[key] = k
        out[k] = v
    return out, aliases


def nonfinite_names(state: dict, limit: int = 5) -> list[str]:
    """Names (up to `limit`) of floating tensors in a nested `{name: tensor}` state that hold NaN or inf,
    over this process's local shards; one host sync for the whole state (not one per tensor).

    Example: `nonfinite_names({"model": model.state_dict()})` -> `[]` for healthy weights.
    """
    flat = [
        (k, local_tensor(v))
        for k, v in _flat_items(state)
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel()
    ]
    if not flat:
        return []
    ok = torch.stack([t.isfinite().all() for _, t in flat]).cpu()  # (n,) one transfer
    return [k for (k, _), good in zip(flat, ok.tolist()) if not good][:limit]


def _flat_items(state: dict, prefix: str = ""):
    for k, v in state.items():
        if isinstance(v, dict):
            yield from _flat_items(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any (so all ranks raise together); `device` is where
    the process group's backend reduces (CPU for gloo, the accelerator for nccl / hccl)."""
    if not _dist_on():
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32, device=device if dist.get_backend() != "gloo" else "cpu")
    dist.all_reduce(t)
    return bool(t.item())


def _write_failed(d: Path, step: int, e: BaseException) -> CheckpointWriteError:
    """One message for a save that failed on the file system; the previous checkpoint is untouched."""
    inner = e
    if not isinstance(e, OSError):  # DCP wraps a writer's exception per rank
        failures = getattr(e, "failures", None) or {}
        inner = next((f[0] for f in failures.values() if isinstance(f, tuple | list) and f), e)
    why = {
        errno.ENOSPC: "the disk is full",
        errno.EACCES: "permission denied (read-only folder?)",
        errno.EROFS: "the file system is read-only",
        errno.EEXIST: "a file of that name is in the way",
        errno.ENOTDIR: "a file is in the way where a folder should be",
        errno.EDQUOT: "the disk quota is exceeded",
    }.get(getattr(inner, "errno", None), str(inner))
    prev = find_latest(d) if d.is_dir() else None
    return CheckpointWriteError(
        f"checkpoint.dir={str(d)!r}: could not save step {step}: {why}"
        + (f"; the previous checkpoint {prev} is intact" if prev else "")
        + ". Free space or choose a writable checkpoint.dir, then run the same command again to resume"
    )


def save_checkpoint(
    ckpt_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    *,
    ema: Any = None,
    data_state: dict | None = None,
    save_rng: bool = True,
    keep_last: int = 0,
    config: Any = None,
) -> Path:
    """Save everything needed to continue training at `step` as `<ckpt_dir>/step_<step>`; every rank calls it.

    `ema` is anything with `state_dict() -> {name: tensor}` (mmkit.train.ema.EMA); `data_state` is a
    JSON-serialisable dict from the data pipeline (a global position, e.g. samples consumed, so it
    stays valid under another process count). `keep_last` > 0 deletes older step folders. `config` (a
    mmkit Config) is written as `step_N/config.toml`, so a step folder alone says what model it holds.
    Example: `save_checkpoint("ckpt", 100, model, opt, sched, data_state={"samples_seen": 800})`.
    """
    rank, world = rank_world()
    d = Path(ckpt_dir)
    name = f"step_{step}"
    final, tmp = d / name, d / f"{TMP_PREFIX}{name}"
    pointer = d / LATEST
    if pointer.is_file() and pointer.read_text().strip() == name and final.is_dir():
        return final  # this step is already the latest checkpoint (e.g. interval save == final save)
    data_state = _json_ready(data_state or {}, "data_state")
    sched_state = (
        _json_ready(scheduler.state_dict(), "the LR scheduler state") if scheduler is not None else None
    )
    state: dict[str, Any] = {"model": _untied(get_model_state_dict(model))[0]}
    hparams: dict = {}
    if optimizer is not None:
        state["optim"], hparams = _split_optim(model, optimizer)
    if ema is not None:
        state["ema"] = ema.state_dict()
    bad = nonfinite_names(state)
    device = next((local_tensor(p).device for p in model.parameters()), torch.device("cpu"))
    if _any_rank(bool(bad), device):
        prev = find_latest(d) if d.is_dir() else None
        raise NonFiniteWeightsError(
            f"step {step}: not saved, the weights hold NaN/inf ({', '.join(bad) or 'on another rank'})"
            + (f"; the newest checkpoint, {prev}, is kept" if prev else "")
            + ". Lower optim.lr or set train.grad_clip, and resume from it"
        )
    try:
        _save_files(d, tmp, final, step, state, hparams, world, save_rng, config, data_state, sched_state,
                    optimizer is not None, ema is not None)  # fmt: skip
    except (OSError, CheckpointException) as e:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a partial save; frees the space it took
        raise _write_failed(d, step, e) from None
    if rank == 0 and keep_last > 0:
        for old in list_checkpoints(d)[:-keep_last]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _save_files(d, tmp, final, step, state, hparams, world, save_rng, config, data_state, sched_state,
                has_optim, has_ema) -> None:  # fmt: skip
    """The writes of `save_checkpoint`, in order: tensors, per-rank JSON, then rank 0 publishes."""
    rank = rank_world()[0]
    if rank == 0:
        d.mkdir(parents=True, exist_ok=True)
        clean_tmp(d)
    _barrier()

    # 1. Tensors, sharded: each rank writes the pieces it owns (replicated tensors once).
    writer = HuggingFaceStorageWriter(str(tmp / "dcp"), save_distributed=True)
    ctx = _quiet_no_dist()
    try:
        dcp.save(state, storage_writer=writer, no_dist=not _dist_on())
    finally:
        ctx.__exit__(None, None, None)

    # 2. Per-rank JSON: RNG streams differ per rank; optimizer hyper-parameters cover this rank's params.
    per_rank = {"optim_hparams": _json_ready(hparams, "optimizer hyper-parameters")}
    if save_rng:
        per_rank["rng"] = rng_state()
    _write_json(tmp / "ranks" / f"rank_{rank:05d}.json", per_rank)
    _barrier()

    # 3. Rank 0 publishes: config, train_state.json, fsync, rename, then `latest`.
    if rank == 0:
        if config is not None:
            from mmkit.config import save_resolved

            save_resolved(config, tmp)
        _write_json(
            tmp / "train_state.json",
            {
                "format": FORMAT_VERSION,
                "step": step,
                "world_size": world,
                "data_state": data_state,
                "scheduler": sched_state,
                "has_optim": has_optim,
                "has_ema": has_ema,
                "has_rng": save_rng,
                "finite": True,  # checked before writing
                "manifest": True,  # written next; its absence later means damage
                "torch": torch.__version__,
            },
        )
        write_manifest(tmp)  # sizes + sha256 of every file, before anything names this folder
        _publish(tmp, final, d, step)


def _publish(tmp: Path, final: Path, ckpt_dir: Path, step: int = -1) -> None:
    """fsync the finished temp folder, rename it into place, then point `latest` at it (rank 0)."""
    for sub in (tmp / "dcp", tmp / "ranks", tmp):
        _fsync_dir(sub)
    _fault_point("before_rename", step)
    if final.exists():  # a stale folder of the same step from a run that died before updating `latest`
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(ckpt_dir)
    _fault_point("after_rename", step)
    pointer_tmp = ckpt_dir / f"{LATEST}.tmp-{os.getpid()}"
    with open(pointer_tmp, "w") as f:
        f.write(final.name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer_tmp, ckpt_dir / LATEST)
    _fsync_dir(ckpt_dir)


# ---------------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    """A checkpoint's JSON file; a damaged one is a DamagedFileError naming it."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise DamagedFileError(path, f"unreadable JSON ({e})", _DAMAGED_FIX) from None


_DAMAGED_FIX = "this checkpoint is damaged; resume from an earlier step_N folder (checkpoint.resume)"


def _read_rank_files(step_dir: Path) -> dict[int, dict]:
    out = {}
    for p in sorted((step_dir / "ranks").glob("rank_*.json")):
        out[int(p.stem.split("_")[1])] = _read_json(p)
    return out


def verify_step(step_dir: str | os.PathLike, checksums: bool = True) -> list[str]:
    """Problems of one step folder, each naming a file ([] = intact): its manifest (sizes, sha256), or
    for a folder saved before manifests, the train state and each tensor file's header and size.

    Example: `verify_step("ckpt/step_4")` -> `[]`.
    """
    d = Path(step_dir)
    problems = verify_manifest(d, checksums)
    if problems:
        return problems
    state = d / "train_state.json"
    if not state.is_file():
        return [f"{state}: missing"]
    try:
        meta = _read_json(state)
        if not isinstance(meta, dict) or "step" not in meta:
            return [f"{state}: not a training state (no 'step')"]
    except DamagedFileError as e:
        return [str(e)]
    if (d / MANIFEST).is_file():
        return []  # verified above
    if meta.get("manifest"):
        return [f"{d / MANIFEST}: missing"]  # saved with one
    files = sorted((d / "dcp").glob("*.safetensors"))
    if not files:
        return [f"{d / 'dcp'}: no tensor files (*.safetensors)"]
    for f in files:
        try:
            check_safetensors(f)
        except DamagedFileError as e:
            problems.append(str(e))
    return problems


def find_intact(ckpt_dir: str | os.PathLike, checksums: bool = True) -> tuple[Path | None, list[str]]:
    """(the newest step folder of `ckpt_dir` that verifies, one line per newer folder passed over).

    A save killed after its rename but before `latest` was updated leaves a complete, verified folder
    newer than `latest`; it is used. Example: `step_dir, skipped = find_intact("ckpt")`.
    """
    skipped = []
    for step_dir in reversed(list_checkpoints(ckpt_dir)):
        problems = verify_step(step_dir, checksums)
        if not problems:
            return step_dir, skipped
        skipped.append(f"{step_dir.name} is damaged ({'; '.join(problems[:3])})")
    return None, skipped


def _restore_tuples(value: Any, template: Any) -> Any:
    """JSON turned tuples (AdamW's betas) into lists; give them back the live optimizer's types."""
    if isinstance(template, tuple) and isinstance(value, list):
        return tuple(value)
    return value


def _flat_shapes(state: dict, prefix: str = "") -> dict[str, torch.Size]:
    """{"model": {"a.b": t}} -> {"model.a.b": global shape}, the keys DCP stores (DTensor shapes are global)."""
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(_flat_shapes(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v.shape
    return out


def _short(e: BaseException) -> str:
    """The first line of an exception (DCP's wrap the per-rank tracebacks into its text)."""
    failures = getattr(e, "failures", None)
    if failures:
        e = next(iter(failures.values()))[0]
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _read_dcp_metadata(step_dir: Path) -> dict:
    """The DCP metadata of a checkpoint, after a header check of each tensor file (names the file)."""
    files = sorted((step_dir / "dcp").glob("*.safetensors"))
    if not files:
        raise DamagedFileError(step_dir / "dcp", "holds no tensor files (*.safetensors)", _DAMAGED_FIX)
    for f in files:
        check_safetensors(f, _DAMAGED_FIX)
    try:
        return HuggingFaceStorageReader(str(step_dir / "dcp")).read_metadata().state_dict_metadata
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise DamagedFileError(
            step_dir / "dcp", f"unreadable tensor index ({_short(e)})", _DAMAGED_FIX
        ) from None


def _dcp_load(state: dict, step_dir: Path) -> None:
    """Fill `state`'s tensors in place from the checkpoint, after checking names and shapes match."""
    saved = _read_dcp_metadata(step_dir)
    want = _flat_shapes(state)
    missing = [k for k in want if k not in saved]
    wrong = [
        f"{k} {tuple(saved[k].size)} vs {tuple(s)}"
        for k, s in want.items()
        if k in saved and saved[k].size != s
    ]
    if missing or wrong:
        detail = (f"missing {len(missing)}, e.g. {missing[:3]}; " if missing else "") + (
            f"shape mismatch (saved vs model) {wrong[:3]}" if wrong else ""
        )
        raise ValueError(
            f"checkpoint {step_dir} does not match the model being loaded: {detail}. Check model.family / "
            "model.flavor against the run that saved it (or --checkpoint.no_load_optim if only the optimizer changed)"
        )
    ctx = _quiet_no_dist()
    try:
        dcp.load(
            state, storage_reader=HuggingFaceStorageReader(str(step_dir / "dcp")), no_dist=not _dist_on()
        )
    except (CheckpointException, OSError, RuntimeError, ValueError) as e:
        raise DamagedFileError(
            step_dir / "dcp", f"the tensors cannot be read ({_short(e)})", _DAMAGED_FIX
        ) from None
    finally:
        ctx.__exit__(None, None, None)


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    *,
    ema: Any = None,
    load_optim: bool = True,
    load_rng: bool = True,
) -> ResumeState:
    """Restore a checkpoint into live objects (every rank calls it); returns the step and data position.

    `path` is a `step_N` folder or a checkpoint dir (its `latest` is used). `load_optim=False`
    (checkpoint.no_load_optim) keeps the fresh optimizer and LR schedule, as MindSpeed's --no-load-optim.
    RNG states are restored when the checkpoint has them and the process count is unchanged
    (otherwise a warning; the streams of a different layout cannot be continued bit-exactly).
    Example: `st = load_checkpoint("ckpt", model, opt, sched); start_step = st.step`.
    """
    rank, world = rank_world()
    ckpt_dir_guess = Path(path)
    if rank == 0 and ckpt_dir_guess.is_dir() and not (ckpt_dir_guess / "train_state.json").is_file():
        clean_tmp(ckpt_dir_guess)
    step_dir = resolve_step_dir(path)
    meta = _read_json(step_dir / "train_state.json")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        got = meta.get("format") if isinstance(meta, dict) else meta
        raise ValueError(f"checkpoint {step_dir}: format {got!r} is not {FORMAT_VERSION}")
    use_optim = load_optim and optimizer is not None
    if use_optim and not meta.get("has_optim"):
        use_optim = False
        if rank == 0:
            warnings.warn(
                f"checkpoint {step_dir} has no optimizer state: the optimizer (AdamW moments) is NOT restored "
                "and starts fresh, as with --checkpoint.no_load_optim",
                stacklevel=2,
            )
    if ema is not None and not meta["has_ema"]:
        raise ValueError(
            f"checkpoint {step_dir} has no EMA weights; resume with train.ema=false or start a new run"
        )

    model_sd, aliases = _untied(get_model_state_dict(model))
    state: dict[str, Any] = {"model": model_sd}
    hparams_live: dict = {}
    if use_optim:
        state["optim"], hparams_live = _split_optim(model, optimizer)
    if ema is not None:
        state["ema"] = ema.state_dict()
    _dcp_load(state, step_dir)

    set_model_state_dict(model, {**state["model"], **{a: state["model"][o] for a, o in aliases.items()}})
    ranks = _read_rank_files(step_dir)
    missing = [r for r in range(int(meta.get("world_size", 1))) if r not in ranks]
    if missing and rank == 0:
        names = ", ".join(f"ranks/rank_{r:05d}.json" for r in missing[:4])
        warnings.warn(
            f"checkpoint {step_dir}: {names} missing: the RNG states"
            + (" and optimizer hyper-parameters (the config's are used)" if use_optim else "")
            + " of those ranks are NOT restored (the run continues, but not bit-identically)",
            stacklevel=2,
        )
    if use_optim:
        saved: dict = {}
        for r in sorted(ranks):  # union over the saving ranks: under pp each held only its stage
            saved.update(ranks[r].get("optim_hparams", {}))
        hparams = {k: _restore_tuples(saved.get(k, v), v) for k, v in hparams_live.items()}
        set_optimizer_state_dict(model, optimizer, {**state["optim"], **hparams}, options=_OPTIM_OPTIONS)
        if scheduler is not None and meta["scheduler"] is not None:
            sched = dict(meta["scheduler"])
            if len(sched.get("base_lrs", [])) != len(optimizer.param_groups):
                # another layout can hold a different number of parameter groups on this rank
                sched["base_lrs"] = [g["initial_lr"] for g in optimizer.param_groups]
                sched["_last_lr"] = [g["lr"] for g in optimizer.param_groups]
            scheduler.load_state_dict(sched)
    if ema is not None:
        ema.load_state_dict(state["ema"])

    if load_rng and not meta.get("has_rng", False) and rank == 0:
        warnings.warn(
            f"checkpoint {step_dir} was saved without RNG states (checkpoint.no_save_rng): RNG states NOT "
            "restored (the run continues, but not bit-identically)",
            stacklevel=2,
        )
    elif load_rng:
        if meta["world_size"] == world and rank in ranks and "rng" in ranks[rank]:
            set_rng_state(ranks[rank]["rng"])
        elif meta["world_size"] == world:
            pass  # the missing rank file was named above
        elif rank == 0:
            warnings.warn(
                f"checkpoint {step_dir}: saved by {meta['world_size']} processes, loading into {world}; "
                "RNG states not restored (the run continues, but not bit-identically)",
                stacklevel=2,
            )
    return ResumeState(
        step=int(meta["step"]), data_state=meta["data_state"], path=step_dir, scheduler=meta.get("scheduler")
    )


def export_model_state(path: str | os.PathLike, which: str = "model") -> dict[str, torch.Tensor]:
    """Full (unsharded) model tensors of a checkpoint, read in this process: `{param name: tensor}`.

    `path` is a step folder or a checkpoint dir. `which="ema"` gives the EMA weights where the run kept
    them (frozen weights from the model). For the HF exporter; call it on one rank.
    Example: `sd = export_model_state("ckpt")`; `sd["blocks.0.attn1.to_q.weight"].shape`.
    """
    if which not in ("model", "ema"):
        raise ValueError(f"export_model_state: which={which!r}; use 'model' or 'ema'")
    step_dir = resolve_step_dir(path)
    problems = verify_manifest(step_dir)
    if problems:
        raise DamagedFileError(
            step_dir, "damaged: " + "; ".join(problems[:3]), "export an earlier step_N folder"
        )
    md = _read_dcp_metadata(step_dir)
    prefixes = ("model.",) if which == "model" else ("model.", "ema.")
    if which == "ema" and not any(k.startswith("ema.") for k in md):
        raise ValueError(
            f"checkpoint {step_dir} has no EMA weights (train.ema was off); export which='model'"
        )
    flat = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in md.items() if k.startswith(prefixes)}
    ctx = _quiet_no_dist()
    try:
        dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(step_dir / "dcp")), no_dist=True)
    except (CheckpointException, OSError, RuntimeError, ValueError) as e:
        raise DamagedFileError(
            step_dir / "dcp", f"the tensors cannot be read ({_short(e)})", _DAMAGED_FIX
        ) from None
    finally:
        ctx.__exit__(None, None, None)
    out = {k[len("model.") :]: v for k, v in flat.items() if k.startswith("model.")}
    out.update({k[len("ema.") :]: v for k, v in flat.items() if k.startswith("ema.")})
    return out


# ---------------------------------------------------------------------------------------------------
# Describe a checkpoint without reading its tensors
# ---------------------------------------------------------------------------------------------------
@dataclass
class CheckpointInfo:
    """What an mmkit training checkpoint holds, read from its small files (no tensors loaded)."""

    step_dir: Path  # the step_N folder
    step: int
    config_file: Path  # the run's resolved config.toml
    family: str
    task: str
    flavor: str
    init_from: Path | None  # as the run config names it (may no longer exist)
    has_ema: bool


def read_checkpoint_info(ckpt: str | os.PathLike) -> CheckpointInfo:
    """Check that `ckpt` is an mmkit checkpoint (a step_N folder or a checkpoint.dir) and describe it.

    Raises FileNotFoundError naming the missing file, ValueError for an unknown family.
    Example: `info = read_checkpoint_info("outputs/ckpt/wan_t2v_tiny")`; `info.family, info.step`.
    """
    from mmkit import registry
    from mmkit.config import ModelConfig, read_config_file
    from mmkit.models.common.hf_io import read_json

    p = Path(ckpt)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if (p / "train_state.json").is_file():
        step_dir = p
    else:
        step_dir = find_latest(p) if p.is_dir() else None
        if step_dir is None:
            raise FileNotFoundError(
                f"{p} is not an mmkit checkpoint: it has no train_state.json (a step_N folder) and no "
                "`latest` pointer or step_N folders (a checkpoint.dir). Pass the checkpoint.dir of the "
                "`mmkit train` run, or one of its step_N folders"
            )
    dcp_dir = step_dir / "dcp"
    if not dcp_dir.is_dir() or not any(dcp_dir.glob("*.safetensors")):
        raise FileNotFoundError(
            f"checkpoint {step_dir} is incomplete: {dcp_dir} holds no DCP tensor shards (*.safetensors); "
            "export an earlier step_N folder"
        )
    config_file = next(
        (d / "config.toml" for d in (step_dir, step_dir.parent) if (d / "config.toml").is_file()), None
    )
    if config_file is None:
        raise FileNotFoundError(
            f"checkpoint {step_dir}: no config.toml in it or in {step_dir.parent}; the export needs the run's "
            "resolved config (model.family, model.init_from). Copy the run's config.toml into the step folder"
        )
    model = read_config_file(config_file).get("model", {})
    family = model.get("family", ModelConfig().family)  # a config without it has the default
    if family not in registry.names():
        raise ValueError(
            f"{config_file}: model.family={family!r} has no HF exporter; supported: {', '.join(registry.names())}"
        )
    state = read_json(step_dir / "train_state.json", "checkpoint train state")
    init_from = model.get("init_from")
    return CheckpointInfo(
        step_dir=step_dir,
        step=int(state.get("step", 0)),
        config_file=config_file,
        family=family,
        task=model.get("task", registry.get(family).tasks[0]),
        flavor=model.get("flavor", "tiny"),
        init_from=Path(init_from) if init_from else None,
        has_ema=bool(state.get("has_ema", False)),
    )
