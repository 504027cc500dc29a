"""Which classifier-free-guidance branch a model call belongs to.

`cfg_velocity` (samplers.py) runs the model once per branch inside `cfg_branch("cond")` /
`cfg_branch("uncond")`; hooks and caches read `current_cfg_branch()` to keep state per branch (a cached
residual of the conditional pass is no use to the unconditional one). The mark is a contextvar, so
each thread (and each asyncio task) sees its own.

Under CFG parallelism (`infer/parallel.py`) each half of a cfg group runs one branch; `cfg_peers(...)`
marks its calls with the pair's process group and the global rank of its cond half, for hooks that need
the other branch's prediction of the same step (the CFG cache).

This file holds only the marks; per-branch hook state is `accel.hooks.BranchState`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

BRANCHES = ("cond", "uncond")

_branch: ContextVar[str | None] = ContextVar("mmkit_cfg_branch", default=None)
_peers: ContextVar[tuple | None] = ContextVar("mmkit_cfg_peers", default=None)


@contextlib.contextmanager
def cfg_branch(name: str) -> Iterator[None]:
    """Mark the model calls inside the block as classifier-free-guidance branch `name`.

    Example:
        >>> with cfg_branch("uncond"):
        ...     v_u = model(x, t, **uncond)
    """
    if name not in BRANCHES:
        raise ValueError(f"cfg_branch({name!r}): choose one of {BRANCHES}")
    token = _branch.set(name)
    try:
        yield
    finally:
        _branch.reset(token)


def current_cfg_branch() -> str | None:
    """The branch of the model call in progress ("cond" / "uncond"), None outside guidance.

    Example: `key = current_cfg_branch() or "cond"` inside a hook's `pre_forward`.
    """
    return _branch.get()


@contextlib.contextmanager
def cfg_peers(group, cond_rank: int) -> Iterator[None]:
    """Mark the model calls inside the block as one half of a CFG-parallel pair: `group` holds this rank
    and its peer, `cond_rank` is the global rank that runs the cond branch.

    Example:
        >>> with cfg_branch("uncond"), cfg_peers(layout.cfg_group, cond_rank=0):
        ...     v_u = model(x, t, **uncond)
    """
    token = _peers.set((group, cond_rank))
    try:
        yield
    finally:
        _peers.reset(token)


def current_cfg_peers() -> tuple | None:
    """(process group, global rank of the cond half) under CFG parallelism, None in one process."""
    return _peers.get()
