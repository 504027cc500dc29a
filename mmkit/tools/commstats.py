"""Count the bytes this rank sends through torch.distributed, by kind of operation (for benchmarks).

`CommStats` wraps the Python entry points of torch.distributed collectives and point-to-point ops
(`dist.all_reduce`, `dist.all_gather_single`, `dist.reduce_scatter_single`, `dist.all_to_all_single`,
`dist.batch_isend_irecv`, ...) and of the functional collectives that DTensor's redistribute calls
(`torch.distributed._functional_collectives.all_gather_single`, `.reduce_scatter_single`,
`.all_reduce`, ...), in every loaded module that holds a reference to them, and restores the
originals on exit. FSDP2 goes through `dist.all_gather_single` / `dist.reduce_scatter_single`, the
pipelining schedules through `dist.isend` / `dist.irecv` / `dist.batch_isend_irecv`, and mmkit's
own code through the `dist.*` functions, so a training step is covered.

What "sent" means (bytes leaving this rank per call; the "bus bandwidth" factors of nccl-tests,
https://github.com/NVIDIA/nccl-tests/blob/master/doc/PERFORMANCE.md; n = group size, integer
division):
- all_reduce:       2 (n-1)/n x tensor bytes  (ring all-reduce: a reduce-scatter and an all-gather)
- all_gather:       (n-1)/n x output bytes = (n-1) x input bytes
- reduce_scatter:   (n-1)/n x input bytes
- all_to_all:       the input chunks addressed to the other ranks ((n-1)/n x input for equal splits)
- broadcast/reduce: tensor bytes (factor 1: a pipelined chain forwards the whole tensor once per rank)
- gather/scatter:   what actually leaves the rank: a non-root's input / the root's chunks for others
- p2p:              the tensor of every send/isend (batch_isend_irecv: its isend ops); receives 0
- barrier:          counted as calls, 0 bytes
Groups of one rank send 0 bytes. Only the outermost wrapped call counts (dist.all_gather_into_tensor
calls dist.all_gather_single: one call, counted once). These are algorithmic volumes, not what a
backend's implementation puts on the wire (gloo may pick other algorithms).

Not seen by the wrappers: ProcessGroup methods called directly (`pg.allreduce([t])`), C++ code
that issues collectives itself (e.g. autograd of the functional collectives when a caller
differentiates through them instead of through DTensor). `CommStats(audit=True)` also runs a
TorchDispatchMode that records every c10d / functional-collective op issued outside a wrapped call
in `missed` (slow: every op goes through Python; use it to check coverage, not for timing).
Caveats: a module imported while installed that did `from torch.distributed import all_reduce`
keeps the wrapper, which still works but counts into the uninstalled instance; and a
`dist.P2POp(dist.isend, ...)` must be built and batched on the same side of install/uninstall
(torch tells sends from receives by comparing `op.op is isend`).

Example:
    with CommStats() as cs:
        loss = model(batch); loss.backward()
    cs.bytes  # {"all_gather": 98304, "reduce_scatter": 98304, "all_reduce": 16}
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
from collections import Counter
from collections.abc import Callable
from types import ModuleType

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["CommStats", "KINDS"]

KINDS = (
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "all_to_all",
    "broadcast",
    "reduce",
    "gather",
    "scatter",
    "p2p",
)
_COMM_NAMESPACES = ("c10d", "_c10d_functional", "_c10d_functional_autograd", "_dtensor")
_NOT_COMM_OPS = ("wait_tensor", "mesh_get_process_group", "_wrap_tensor_autograd")

_tls = threading.local()  # .depth: nesting of wrapped calls on this thread
_ACTIVE: list[CommStats] = []  # at most one installed at a time


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _sum_bytes(ts) -> int:
    return sum(_nbytes(t) for t in ts or ())


# ---------------------------------------------------------------- groups


def _c10d_group(a: dict) -> tuple[int, int]:
    """(group size, this rank's index in it) of a torch.distributed call; rank -1 if not a member."""
    group = a.get("group")
    return dist.get_world_size(group), dist.get_rank(group)


def _funcol_group(a: dict) -> tuple[int, int]:
    """(group size, rank in group) of a functional collective's group (PG, name, mesh, (mesh, dim))."""
    from torch.distributed import _functional_collectives as funcol

    g = funcol._resolve_group(a["group"], a.get("tag", ""))
    if isinstance(g, str):
        from torch._C._distributed_c10d import _resolve_process_group

        g = _resolve_process_group(g)
    return g.size(), g.rank()


def _root_is_me(a: dict, key: str, size_rank: tuple[int, int]) -> bool:
    """Whether this rank is the root of gather/scatter (`dst`/`src` global, or `group_dst`/`group_src`)."""
    group_key = f"group_{key}"
    if a.get(group_key) is not None:
        return a[group_key] == size_rank[1]
    root = a.get(key)
    return (0 if root is None else root) == dist.get_rank()


def _a2a_sent(inp: torch.Tensor, splits, n: int, r: int) -> int:
    """Bytes of the input rows addressed to other ranks (equal chunks when `splits` is None)."""
    total = _nbytes(inp)
    if not splits:
        return total * (n - 1) // n
    row = total // max(inp.shape[0], 1) if inp.dim() else total
    return row * (sum(splits) - splits[r])


# ---------------------------------------------------------------- rules: call arguments -> (kind, bytes)
# Each rule gets the bound arguments `a` and (n, r); it returns (kind, bytes sent). r < 0: not a member.


def _all_reduce(key: str, many: bool = False):
    return lambda a, n, r: (
        "all_reduce",
        2 * (n - 1) * (_sum_bytes(a[key]) if many else _nbytes(a[key])) // n,
    )


def _all_gather(key: str, many: bool = False):
    return lambda a, n, r: ("all_gather", (n - 1) * (_sum_bytes(a[key]) if many else _nbytes(a[key])))


def _reduce_scatter(key: str, many: bool = False):
    return lambda a, n, r: (
        "reduce_scatter",
        (n - 1) * (_sum_bytes(a[key]) if many else _nbytes(a[key])) // n,
    )


def _gather(a, n, r):
    return "gather", 0 if _root_is_me(a, "dst", (n, r)) else _nbytes(a["tensor"])


def _scatter(a, n, r):
    if not _root_is_me(a, "src", (n, r)) or not a.get("scatter_list"):
        return "scatter", 0
    return "scatter", sum(_nbytes(t) for j, t in enumerate(a["scatter_list"]) if j != r)


def _batch_p2p(a, n, r):
    sends = [op.tensor for op in a["p2p_op_list"] if getattr(op.op, "__name__", "") == "isend"]
    return "p2p", _sum_bytes(sends)


_C10D_RULES: dict[str, Callable] = {
    "all_reduce": _all_reduce("tensor"),
    "all_reduce_coalesced": _all_reduce("tensors", many=True),
    "all_gather": _all_gather("tensor"),
    "all_gather_single": _all_gather("input_tensor"),
    "all_gather_into_tensor": _all_gather("input_tensor"),
    "_all_gather_base": _all_gather("input_tensor"),
    "all_gather_coalesced": _all_gather("input_tensor_list", many=True),
    "reduce_scatter": _reduce_scatter("input_list", many=True),
    "reduce_scatter_single": _reduce_scatter("input"),
    "reduce_scatter_tensor": _reduce_scatter("input"),
    "_reduce_scatter_base": _reduce_scatter("input"),
    "all_to_all_single": lambda a, n, r: (
        "all_to_all",
        _a2a_sent(a["input"], a.get("input_split_sizes"), n, r),
    ),
    "all_to_all": lambda a, n, r: (
        "all_to_all",
        sum(_nbytes(t) for j, t in enumerate(a["input_tensor_list"]) if j != r),
    ),
    "broadcast": lambda a, n, r: ("broadcast", _nbytes(a["tensor"]) if n > 1 else 0),
    "reduce": lambda a, n, r: ("reduce", _nbytes(a["tensor"]) if n > 1 else 0),
    "gather": _gather,
    "scatter": _scatter,
    "send": lambda a, n, r: ("p2p", _nbytes(a["tensor"])),
    "isend": lambda a, n, r: ("p2p", _nbytes(a["tensor"])),
    "recv": lambda a, n, r: ("recv", 0),
    "irecv": lambda a, n, r: ("recv", 0),
    "batch_isend_irecv": _batch_p2p,
    "barrier": lambda a, n, r: ("barrier", 0),
}
_FUNCOL_RULES: dict[str, Callable] = {
    "all_reduce": _all_reduce("self"),
    "all_reduce_coalesced": _all_reduce("self", many=True),
    "all_gather_single": _all_gather("self"),
    "all_gather_single_autograd": _all_gather("self"),
    "all_gather_tensor": _all_gather("self"),
    "all_gather_tensor_autograd": _all_gather("self"),
    "all_gather_single_coalesced": _all_gather("self", many=True),
    "all_gather_into_tensor_coalesced": _all_gather("self", many=True),
    "reduce_scatter_single": _reduce_scatter("self"),
    "reduce_scatter_single_autograd": _reduce_scatter("self"),
    "reduce_scatter_tensor": _reduce_scatter("self"),
    "reduce_scatter_tensor_autograd": _reduce_scatter("self"),
    "reduce_scatter_single_coalesced": _reduce_scatter("self", many=True),
    "reduce_scatter_tensor_coalesced": _reduce_scatter("self", many=True),
    "all_to_all_single": lambda a, n, r: (
        "all_to_all",
        _a2a_sent(a["self"], a.get("input_split_sizes"), n, r),
    ),
    "all_to_all_single_autograd": lambda a, n, r: (
        "all_to_all",
        _a2a_sent(a["self"], a.get("input_split_sizes"), n, r),
    ),
    "broadcast": lambda a, n, r: ("broadcast", _nbytes(a["self"]) if n > 1 else 0),
}


class CommStats:
    """Bytes sent and calls made by this rank, per op kind, while installed (see the module docstring).

    `bytes` / `calls`: dicts kind -> int (kinds in `KINDS`, plus "recv" and "barrier" in `calls`);
    `missed`: with `audit=True`, c10d op name -> calls that bypassed the wrappers. Use it as a
    context manager, or `install()` / `uninstall()` around a longer run; `snapshot()` and `delta()`
    turn the running totals into per-step numbers.

    Example:
        with CommStats() as cs:
            dist.all_reduce(torch.ones(1024))  # 4 KiB fp32 over 2 ranks
        assert cs.bytes == {"all_reduce": 4096} and cs.calls == {"all_reduce": 1}
    """

    def __init__(self, audit: bool = False):
        self.audit = audit
        self.bytes: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self.missed: Counter[str] = Counter()
        self.wrapped: list[str] = []  # "module.function" names that were wrapped
        self._lock = threading.Lock()
        self._patches: list[tuple[ModuleType, str, object]] = []
        self._mode = None

    # ---- results ---------------------------------------------------------------------------------
    @property
    def total_bytes(self) -> int:
        """All bytes sent so far. Example: `cs.total_bytes` -> `8192`."""
        return sum(self.bytes.values())

    def snapshot(self) -> dict:
        """A copy of the running totals: {"bytes": {kind: int}, "calls": {kind: int}}.

        Example: `a = cs.snapshot(); step(); per_step = CommStats.delta(a, cs.snapshot())`.
        """
        with self._lock:
            return {"bytes": dict(self.bytes), "calls": dict(self.calls)}

    @staticmethod
    def delta(before: dict, after: dict) -> dict:
        """`after - before` of two snapshots, kinds with zero change dropped.

        Example: `CommStats.delta({"bytes": {"p2p": 8}, "calls": {}}, {"bytes": {"p2p": 24}, "calls": {}})`
        -> `{"bytes": {"p2p": 16}, "calls": {}}`.
        """
        out = {}
        for key in ("bytes", "calls"):
            b, a = before.get(key, {}), after.get(key, {})
            out[key] = {
                k: a.get(k, 0) - b.get(k, 0) for k in sorted(set(a) | set(b)) if a.get(k, 0) != b.get(k, 0)
            }
        return out

    def reset(self) -> None:
        """Zero all counters. Example: `cs.reset()`."""
        with self._lock:
            self.bytes.clear()
            self.calls.clear()
            self.missed.clear()

    def _record(self, kind: str, nbytes: int) -> None:
        with self._lock:
            self.calls[kind] += 1
            if nbytes:
                self.bytes[kind] += nbytes

    # ---- install / uninstall ---------------------------------------------------------------------
    def __enter__(self) -> CommStats:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def install(self) -> CommStats:
        """Wrap the collectives in every loaded module that references them; returns self.

        Raises RuntimeError if another CommStats is installed. Example: `cs = CommStats().install()`.
        """
        if _ACTIVE:
            raise RuntimeError("CommStats: another instance is installed; uninstall it first (one at a time)")
        from torch.distributed import _functional_collectives as funcol
        from torch.distributed import distributed_c10d as c10d

        wrappers: dict[int, object] = {}  # id(original) -> wrapper
        for mod, rules, group_of in (
            (c10d, _C10D_RULES, _c10d_group),
            (funcol, _FUNCOL_RULES, _funcol_group),
        ):
            for name, rule in rules.items():
                orig = getattr(mod, name, None)
                if orig is None or id(orig) in wrappers:
                    continue
                wrappers[id(orig)] = self._wrap(orig, rule, group_of)
                self.wrapped.append(f"{mod.__name__}.{name}")
        # patch every reference, so `from torch.distributed import all_reduce` style imports are covered
        for mod in list(sys.modules.values()):
            try:
                items = list(vars(mod).items())
            except TypeError:
                continue
            for attr, val in items:
                w = wrappers.get(id(val))
                if w is not None:
                    setattr(mod, attr, w)
                    self._patches.append((mod, attr, val))
        _ACTIVE.append(self)
        if self.audit:
            self._mode = _AuditMode(self)
            self._mode.__enter__()
        return self

    def uninstall(self) -> None:
        """Put every original function back (and leave the audit mode). Example: `cs.uninstall()`."""
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
        for mod, attr, orig in reversed(self._patches):
            setattr(mod, attr, orig)
        self._patches.clear()
        self.wrapped.clear()
        if self in _ACTIVE:
            _ACTIVE.remove(self)

    def _wrap(self, orig: Callable, rule: Callable, group_of: Callable) -> Callable:
        sig = inspect.signature(orig)

        @functools.wraps(orig)
        def wrapper(*args, **kwargs):
            depth = getattr(_tls, "depth", 0)
            if depth == 0:  # outermost wrapped call: this is the communication
                a = sig.bind(*args, **kwargs)
                a.apply_defaults()
                n, r = group_of(a.arguments)
                if r >= 0:  # a rank outside the group takes no part
                    self._record(*rule(a.arguments, n, r))
            _tls.depth = depth + 1
            try:
                return orig(*args, **kwargs)
            finally:
                _tls.depth = depth

        return wrapper


class _AuditMode(TorchDispatchMode):
    """Records c10d / functional-collective ops that run outside any wrapped call in `stats.missed`."""

    def __init__(self, stats: CommStats):
        super().__init__()
        self.stats = stats

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ns = getattr(func, "namespace", "")
        if ns in _COMM_NAMESPACES and getattr(_tls, "depth", 0) == 0:
            name = func._schema.name.split("::")[-1]
            if name not in _NOT_COMM_OPS:
                with self.stats._lock:
                    self.stats.missed[f"{ns}.{name}"] += 1
        return func(*args, **(kwargs or {}))
