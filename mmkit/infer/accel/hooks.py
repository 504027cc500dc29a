"""Hooks installed on an `nn.Module` from outside, for caches and other inference accelerations.

A `ModelHook` sees every call of the module it is registered on: `pre_forward` may rewrite the
arguments, `new_forward` may replace the call (a cache returning a stored output), `post_forward` may
rewrite the output. The model file is never edited: `HookRegistry` puts one wrapper in the module
instance's `forward` attribute (the class's `forward` is untouched) and removing the last hook
restores what was there before, leaving no attribute behind.

Hook state is kept per classifier-free-guidance branch (`BranchState`, keyed by
`guidance.current_cfg_branch()`), and pipelines call `reset_all(transformer)` when a generation
starts, so no state leaks from one video into the next.

Example:
    >>> class CountCalls(ModelHook):
    ...     def init_state(self):
    ...         return {"calls": 0}
    ...     def pre_forward(self, module, *args, **kwargs):
    ...         self.state["calls"] += 1  # counted separately for "cond" and "uncond"
    ...         return args, kwargs
    >>> HookRegistry.get_or_create(model.blocks[0]).register_hook(CountCalls(), "count")

A wrapper that computes a module's call another way (the sequence-parallel DiT forward, which runs the
model's stages on this process's token shard) calls `call_as(module, fn, ...)`: the module's hooks run
around `fn` as around the module's own forward, and `token_shards(...)` tells hooks that reduce over the
tokens (the adaptive cache's signal) which tokens are real and which processes hold the others
(`token_sums`).

This file holds the mechanism only; each technique lives in its own file (cache/<technique>.py).
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from mmkit.infer.guidance import current_cfg_branch

_REGISTRY_ATTR = "_mmkit_hooks"  # instance attribute holding a module's HookRegistry while it has hooks
_NONE = object()  # "the instance had no forward attribute of its own"


class BranchState:
    """One state object per classifier-free-guidance branch, made by `factory()` on first use.

    Branch None is the model called outside guidance (no `cfg_branch` block).
    Example:
        >>> s = BranchState(lambda: {"calls": 0})
        >>> s.current()["calls"] += 1  # the branch of the call in progress
        >>> s.get("uncond"), s.branches()
    """

    def __init__(self, factory: Callable[[], Any] = dict):
        self.factory = factory
        self._by_branch: dict[str | None, Any] = {}

    def get(self, branch: str | None) -> Any:
        if branch not in self._by_branch:
            self._by_branch[branch] = self.factory()
        return self._by_branch[branch]

    def current(self) -> Any:
        return self.get(current_cfg_branch())

    def branches(self) -> dict[str | None, Any]:
        """The states made so far, by branch."""
        return dict(self._by_branch)

    def reset(self) -> None:
        self._by_branch.clear()


class ModelHook:
    """Base hook: override any of `init_state`, `pre_forward`, `new_forward`, `post_forward`.

    `self.state` is the state of the current guidance branch (`init_state()` on first use);
    `state_for(branch)` reads another branch's; `reset_state()` drops all of them.
    A hook instance is registered on one module at a time.
    Example: `HookRegistry.get_or_create(block).register_hook(MyHook(), "my_hook")`.
    """

    def init_state(self) -> Any:
        """A fresh state for one branch (called on first use after a reset)."""
        return {}

    def _branch_states(self) -> BranchState:
        # created lazily, so subclasses need not call super().__init__()
        states = self.__dict__.get("_mmkit_states")
        if states is None:
            states = self.__dict__["_mmkit_states"] = BranchState(self.init_state)
        return states

    @property
    def state(self) -> Any:
        return self._branch_states().current()

    def state_for(self, branch: str | None) -> Any:
        return self._branch_states().get(branch)

    def branch_states(self) -> dict[str | None, Any]:
        """Every branch's state made since the last reset, by branch."""
        return self._branch_states().branches()

    def reset_state(self) -> None:
        self._branch_states().reset()

    def pre_forward(self, module: nn.Module, *args, **kwargs) -> tuple[tuple, dict]:
        return args, kwargs

    def new_forward(self, module: nn.Module, *args, **kwargs):
        """The call itself; the default runs the rest of the chain (later hooks, then the module)."""
        return self.call_inner(*args, **kwargs)

    def post_forward(self, module: nn.Module, output):
        return output

    def call_inner(self, *args, **kwargs):
        """Run what this hook wraps: the hooks registered after it, then the module's own forward."""
        inner = self.__dict__.get("_mmkit_inner")
        assert inner is not None, f"{type(self).__name__} is not registered on a module"
        return inner(*args, **kwargs)


def _wrap(module: nn.Module, hook: ModelHook, inner: Callable) -> Callable:
    hook.__dict__["_mmkit_inner"] = inner

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        args, kwargs = hook.pre_forward(module, *args, **kwargs)
        return hook.post_forward(module, hook.new_forward(module, *args, **kwargs))

    return forward


class HookRegistry:
    """The hooks of one module, in registration order; the first registered is the outermost
    (its `pre_forward` runs first and its `post_forward` last).

    Example:
        >>> reg = HookRegistry.get_or_create(model.blocks[0])
        >>> reg.register_hook(CountCalls(), "count")
        >>> reg.remove_hook("count")  # model.blocks[0].forward is the class's forward again
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.hooks: dict[str, ModelHook] = {}
        self._saved_forward = module.__dict__.get("forward", _NONE)  # restored when the last hook goes
        self._stand_in: Callable | None = None  # `call_as`: what runs in place of the module's forward

    @staticmethod
    def get(module: nn.Module) -> HookRegistry | None:
        """The module's registry, or None while it has no hooks. Example: `HookRegistry.get(block)`."""
        return module.__dict__.get(_REGISTRY_ATTR)

    @classmethod
    def get_or_create(cls, module: nn.Module) -> HookRegistry:
        """The module's registry, attached to it until its last hook is removed."""
        registry = cls.get(module)
        if registry is None:
            registry = module.__dict__[_REGISTRY_ATTR] = cls(module)
        return registry

    def register_hook(self, hook: ModelHook, name: str) -> None:
        """Add `hook` innermost of the hooks already there. Example: `reg.register_hook(h, "cache")`."""
        assert self.module.__dict__.get(_REGISTRY_ATTR) is self, "use HookRegistry.get_or_create(module)"
        if name in self.hooks:
            raise ValueError(f"a hook named {name!r} is already registered on {type(self.module).__name__}")
        if hook.__dict__.get("_mmkit_inner") is not None:
            raise ValueError(f"{type(hook).__name__} instance is already registered; make one per module")
        self.hooks[name] = hook
        self._install()

    def remove_hook(self, name: str) -> ModelHook:
        """Remove and return hook `name`; the last removal restores the module's original forward."""
        if name not in self.hooks:
            raise KeyError(
                f"no hook named {name!r} on {type(self.module).__name__} (have {list(self.hooks)})"
            )
        hook = self.hooks.pop(name)
        hook.__dict__.pop("_mmkit_inner", None)
        self._install()
        return hook

    def get_hook(self, name: str) -> ModelHook | None:
        return self.hooks.get(name)

    def _install(self) -> None:
        attrs = self.module.__dict__
        if not self.hooks:  # restore exactly what was there: the instance's own forward, or none
            attrs.pop(_REGISTRY_ATTR, None)
            if self._saved_forward is _NONE:
                attrs.pop("forward", None)
            else:
                attrs["forward"] = self._saved_forward
            return
        own = self._saved_forward
        if own is _NONE:
            own = types.MethodType(type(self.module).forward, self.module)

        @functools.wraps(own)
        def inner(*args, **kwargs):
            return (self._stand_in or own)(*args, **kwargs)

        for hook in reversed(self.hooks.values()):
            inner = _wrap(self.module, hook, inner)
        attrs["forward"] = inner


def reset_all(module: nn.Module) -> None:
    """Reset the state of every hook on `module` and its submodules (a generation starts).

    Example: `reset_all(pipe.transformer)`.
    """
    for m in module.modules():
        registry = m.__dict__.get(_REGISTRY_ATTR)
        if registry is not None:
            for hook in registry.hooks.values():
                hook.reset_state()


def register(module: nn.Module, hook: ModelHook, name: str) -> None:
    """Add `hook` to `module` under `name`. Example: `register(block, CountBlock(counter), "mmkit_cache_dit")`."""
    HookRegistry.get_or_create(module).register_hook(hook, name)


def unregister(module: nn.Module, name: str) -> None:
    """Remove the hook `name` from `module`, if it has one. Example: `unregister(block, "mmkit_cache_dit")`."""
    registry = HookRegistry.get(module)
    if registry is not None and registry.get_hook(name) is not None:
        registry.remove_hook(name)


def call_as(module: nn.Module, fn: Callable, *args, **kwargs):
    """`fn(*args, **kwargs)` run as `module`'s forward: the hooks registered on `module` see the call
    (they may rewrite its arguments or output, or replace it) and `fn` runs where the module's own
    forward would. Without hooks it is just `fn(...)`.

    Example (a sequence-parallel wrapper keeping the transformer's step caches):
        >>> v = call_as(self.inner, self.sharded_forward, latents, timestep, text_context)
    """
    registry = module.__dict__.get(_REGISTRY_ATTR)
    if registry is None:
        return fn(*args, **kwargs)
    previous, registry._stand_in = registry._stand_in, fn
    try:
        return module.forward(*args, **kwargs)
    finally:
        registry._stand_in = previous


class TokenShards:
    """A call computed on a shard of the token sequence (dim 1 of (B, S_local, ...) activations) by each
    process of `group`; `valid` (S_local,) bool marks this rank's real tokens (padding False).

    Example: `with token_shards(TokenShards(sp_group, valid)): v = call_as(model, sharded, x, t, ctx)`.
    """

    def __init__(self, group, valid: torch.Tensor):
        self.group, self.valid = group, valid


_shards: ContextVar[TokenShards | None] = ContextVar("mmkit_token_shards", default=None)


@contextlib.contextmanager
def token_shards(shards: TokenShards | None) -> Iterator[None]:
    """Mark the calls inside the block as computed on `shards` (None: the whole sequence here)."""
    token = _shards.set(shards)
    try:
        yield
    finally:
        _shards.reset(token)


def token_sums(*xs: torch.Tensor) -> list[float]:
    """The sum of each (B, S_local, ...) tensor over the whole sequence's real tokens, as one process
    computes it: per-token sums in float32, then over tokens in float64. Under `token_shards` the
    per-rank partial sums are all-gathered and added in rank order, so every rank gets the same bits.

    Example: `num, den = token_sums((r - ref).abs(), ref.abs())`.
    """
    shards = _shards.get()
    parts = []
    for x in xs:
        rows = x.float().flatten(2).sum(-1)  # (B, S_local) per-token sums, float32
        if shards is not None:
            rows = rows[:, shards.valid]
        parts.append(rows.double().sum())
    local = torch.stack(parts)  # (n,) float64, on the activations' device (the backend's)
    if shards is None or shards.group is None:
        return local.tolist()
    import torch.distributed as dist

    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(shards.group))]
    dist.all_gather(gathered, local, group=shards.group)
    total = gathered[0].clone()
    for g in gathered[1:]:  # rank order: the same additions on every rank
        total += g
    return total.tolist()
