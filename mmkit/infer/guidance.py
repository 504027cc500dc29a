"""Which classifier-free-guidance branch a model call belongs to.

`cfg_velocity` (samplers.py) runs the model once per branch inside `cfg_branch("cond")` /
`cfg_branch("uncond")`; hooks and caches read `current_cfg_branch()` to keep state per branch (a cached
residual of the conditional pass is no use to the unconditional one). The mark is a contextvar, so
each thread (and each asyncio task) sees its own.

This file holds only the mark; per-branch hook state is `accel.hooks.BranchState`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

BRANCHES = ("cond", "uncond")

_branch: ContextVar[str | None] = ContextVar("mmkit_cfg_branch", default=None)


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
