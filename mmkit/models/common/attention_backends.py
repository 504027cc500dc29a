"""Attention kernels and the choice between them (`attention(q, k, v, backend="auto")`).

Candidates, each used only where it runs: PyTorch SDPA's own dispatcher (`sdpa`, the default) and its
single kernels `math`, `flash`, `efficient`, `cudnn`; `flex` (flex_attention, compiled, CUDA);
`flash_attn` and `sage` when those packages are installed. Modes:
- `runtime` (what `"auto"` means unless configured otherwise): on the first call per (shapes, dtype,
  device) every available candidate is checked against the `math` kernel and timed; the fastest whose
  output is within tolerance wins. A candidate outside tolerance is rejected and logged. The choice is
  kept in memory and in `attention_backends.json` under the user cache directory
  (`$MMKIT_CACHE_DIR`, else `$XDG_CACHE_HOME/mmkit`, else `~/.cache/mmkit`), so later processes skip
  the timing.
- `static`: the first available candidate of a fixed preference table per device type and dtype.
- manual: a candidate's name.
`MMKIT_ATTENTION_BACKEND` (a mode or a candidate name) overrides every call's choice.

Inputs are (B, H, S, D); masks, causal attention and grouped-query heads go to `sdpa` except where
a candidate declares it takes them. Single-device code: nothing here knows about process groups.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger("mmkit.attention")

ENV_BACKEND = "MMKIT_ATTENTION_BACKEND"
MODES = ("runtime", "static")
CACHE_FILE = "attention_backends.json"
# max |out - math| / max(1, max|math|) accepted per dtype: float rounding of another summation order
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@dataclass
class Backend:
    """One kernel: `fn(q, k, v, scale)` on (B, H, S, D) without mask/causal/GQA; `devices` it runs on."""

    name: str
    fn: Callable
    devices: tuple[str, ...] = ("cpu", "cuda")
    available: Callable[[], bool] = lambda: True


def _sdpa_kernel(kind):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, kind)

    def fn(q, k, v, scale=None):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)

    return fn


def _sdpa(q, k, v, scale=None):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


_flex_compiled = None


def _flex(q, k, v, scale=None):
    global _flex_compiled
    from torch.nn.attention.flex_attention import flex_attention

    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    return _flex_compiled(q, k, v, scale=scale)


def _flash_attn(q, k, v, scale=None):
    from flash_attn import flash_attn_func  # (B, S, H, D) layout

    o = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
    return o.transpose(1, 2)


def _sage(q, k, v, scale=None):
    from sageattention import sageattn

    return sageattn(q, k, v, tensor_layout="HND", sm_scale=scale)


def _installed(module: str) -> Callable[[], bool]:
    def check() -> bool:
        import importlib.util

        return importlib.util.find_spec(module) is not None

    return check


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("sdpa", _sdpa),
        Backend("math", _sdpa_kernel("MATH")),
        Backend("flash", _sdpa_kernel("FLASH_ATTENTION")),
        Backend("efficient", _sdpa_kernel("EFFICIENT_ATTENTION"), ("cuda",)),
        Backend("cudnn", _sdpa_kernel("CUDNN_ATTENTION"), ("cuda",)),
        Backend("flex", _flex, ("cuda",)),
        Backend("flash_attn", _flash_attn, ("cuda",), _installed("flash_attn")),
        Backend("sage", _sage, ("cuda",), _installed("sageattention")),
    )
}

# static mode: preference per (device type, dtype); the first available candidate is used
STATIC_TABLE = {
    ("cuda", torch.bfloat16): ["flash_attn", "cudnn", "flash", "efficient", "sdpa"],
    ("cuda", torch.float16): ["flash_attn", "cudnn", "flash", "efficient", "sdpa"],
    ("cuda", torch.float32): ["efficient", "sdpa"],
    ("cpu", torch.float32): ["flash", "sdpa"],
    ("cpu", torch.bfloat16): ["flash", "sdpa"],
}


def register_backend(name: str, fn: Callable, devices: tuple[str, ...] = ("cpu", "cuda")) -> None:
    """Add a candidate kernel `fn(q, k, v, scale=None)` (e.g. a vendor kernel).

    Example: `register_backend("npu_fa", my_npu_attention, devices=("npu",))`.
    """
    BACKENDS[name] = Backend(name, fn, devices)
    clear_choices(memory_only=True)


def cache_path() -> Path:
    """Where runtime choices persist: `$MMKIT_CACHE_DIR` / `$XDG_CACHE_HOME/mmkit` / `~/.cache/mmkit`."""
    root = os.environ.get("MMKIT_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = str(Path(xdg) / "mmkit")
    return Path(root) / CACHE_FILE


_choices: dict[str, str] = {}  # key -> backend name, this process
_lock = threading.Lock()
_default = {"backend": "sdpa", "mode": "runtime"}


def configure(backend: str | None = None, mode: str | None = None) -> None:
    """Process-wide default for calls that pass no backend (the models' calls): `backend` "sdpa"
    (PyTorch's dispatcher, the initial default), "auto", or a candidate; `mode` what "auto" means.

    Example: `configure(backend="auto", mode="runtime")`.
    """
    if backend is not None:
        check_name(backend, "attention backend")
        _default["backend"] = backend
    if mode is not None:
        if mode not in MODES:
            raise ValueError(f"attention mode={mode!r}: choose one of {MODES}")
        _default["mode"] = mode


def check_name(name: str, what: str) -> None:
    if name not in BACKENDS and name not in MODES and name != "auto":
        raise ValueError(f"{what}={name!r}: choose 'auto', one of {MODES}, or a backend {sorted(BACKENDS)}")


def clear_choices(memory_only: bool = False) -> None:
    """Forget runtime choices (this process; and the cache file unless `memory_only`)."""
    with _lock:
        _choices.clear()
        if not memory_only:
            cache_path().unlink(missing_ok=True)


def key_of(q: torch.Tensor, k: torch.Tensor) -> str:
    dev = q.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    return f"{name}|{str(q.dtype).removeprefix('torch.')}|q{tuple(q.shape)}|k{tuple(k.shape)}|torch{torch.__version__}"


def runs_on(b: Backend, device: torch.device) -> bool:
    return device.type in b.devices and b.available()


def _read_file() -> dict:
    p = cache_path()
    try:
        return json.loads(p.read_text()) if p.is_file() else {}
    except (OSError, json.JSONDecodeError):
        log.warning("attention backend cache %s unreadable; timing again", p)
        return {}


def _write_file(key: str, name: str, timings: dict) -> None:
    p = cache_path()
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        data = _read_file()
        data[key] = {"backend": name, "ms": timings}
        tmp = p.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(p)  # atomic: concurrent processes never read half a file
    except OSError as e:
        log.warning("could not write attention backend cache %s: %s", p, e)


def _time_all(fns: dict, q, k, v, scale, reps: int, min_ms: float = 20.0, max_rounds: int = 500) -> dict:
    """Best wall time (ms) of each candidate, timed in turns (one call of each per round, so drift in the
    machine's speed hits all alike), for at least `reps` rounds and until each has run `min_ms` in all
    (a fast call, ~0.2 ms, gets ~100 rounds; a slow one `reps`), at most `max_rounds`."""
    sync = torch.cuda.synchronize if q.device.type == "cuda" else (lambda: None)
    best = dict.fromkeys(fns, float("inf"))
    spent = dict.fromkeys(fns, 0.0)
    rounds = 0
    while rounds < reps or (min(spent.values()) < min_ms / 1e3 and rounds < max_rounds):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn(q, k, v, scale)
            sync()
            dt = time.perf_counter() - t0
            best[name], spent[name] = min(best[name], dt), spent[name] + dt
        rounds += 1
    return {name: t * 1e3 for name, t in best.items()}


def select_runtime(q, k, v, scale=None, reps: int = 3) -> str:
    """Time every available candidate that matches the math kernel on these inputs; return the fastest.

    Example: `select_runtime(q, k, v)  # "flash"`.
    """
    ref = BACKENDS["math"].fn(q, k, v, scale).float()
    tol = TOLERANCE.get(q.dtype, 1e-4) * max(1.0, float(ref.abs().max()))
    passing = {}
    for b in BACKENDS.values():
        if not runs_on(b, q.device):
            continue
        try:
            out = b.fn(q, k, v, scale)  # also the warm-up (compilation, autotuning)
        except Exception as e:  # a kernel that cannot take these shapes/dtype on this device
            log.info("attention backend %s unavailable for %s: %s", b.name, key_of(q, k), e)
            continue
        err = float((out.float() - ref).abs().max())
        if not err <= tol:
            log.warning(
                "attention backend %s rejected for %s: max |out - math| = %.3g > tolerance %.3g",
                b.name, key_of(q, k), err, tol,
            )  # fmt: skip
            continue
        passing[b.name] = b.fn
    timings = _time_all(passing, q, k, v, scale, reps)
    best = min(timings, key=timings.get)
    log.info("attention backend for %s: %s (ms %s)", key_of(q, k), best, timings)
    _write_file(key_of(q, k), best, timings)
    return best


def select_static(device: torch.device, dtype: torch.dtype) -> str:
    for name in STATIC_TABLE.get((device.type, dtype), ["sdpa"]):
        if name in BACKENDS and runs_on(BACKENDS[name], device):
            return name
    return "sdpa"


def resolve(q, k, v, scale, backend: str | None) -> str:
    """The backend name a call uses (environment override, then the argument, then the default)."""
    backend = os.environ.get(ENV_BACKEND) or backend or _default["backend"]
    if backend == "auto":
        backend = _default["mode"]
    if backend == "static":
        return select_static(q.device, q.dtype)
    if backend == "runtime":
        key = key_of(q, k)
        name = _choices.get(key)
        if name is None:
            with _lock:
                name = _choices.get(key) or _read_file().get(key, {}).get("backend")
                if name not in BACKENDS:
                    name = select_runtime(q, k, v, scale)
                _choices[key] = name
        return name
    if backend not in BACKENDS:
        check_name(backend, f"attention backend (${ENV_BACKEND} or backend=)")
    return backend
