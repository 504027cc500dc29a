"""What a training run leaves behind for tests/distributed/test_layouts.py, and how two runs are compared.

`Recorder(trainer).fit()` trains and records, without touching the trainer's code:
- what the optimizer saw: every parameter's whole gradient (`full_tensor()` of DTensor shards) at the run's
  first step (every step with `all_steps=True`, for the single-process reference), taken when
  `optimizer.step` is called, i.e. after the plan's `finalize_grads`, the division by the global count and
  clipping; after the last step the AdamW moments (exp_avg, exp_avg_sq) and the weights, gathered whole;
- proof that the layout was applied: bytes sent per collective kind during step 1 (`CommStats`), every
  parameter's DTensor mesh / placements / local shape, the sequence length the first block sees on this
  rank, and per block how often its forward ran (twice per micro-batch when checkpointed: forward +
  recompute) and how often it took the lean path of selective AC (`prenorm=` reaches its self-attention).
`save(path)` writes one file per rank (`torch.save`); `load_ranks(dir)` merges a layout's rank files.

`compare(ref, got, tol)` checks per tensor: max |got - ref| <= tol * max |ref| (the tensor's own scale),
so scaling one small tensor's gradient by 2 or 0.5 fails although the global norm hardly moves.

Example:
    rec = Recorder(Trainer(cfg), all_steps=True)
    rec.fit()
    errs = compare(rec.grads[1], other_grads, tol=1e-5, what="grads step 1")
"""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from mmkit.common import clean_name
from mmkit.parallel.ac import block_lists


def whole(t: torch.Tensor) -> torch.Tensor:
    """A detached full copy (DTensor shards gathered: a collective over the tensor's mesh)."""
    t = t.full_tensor() if isinstance(t, DTensor) else t
    return t.detach().clone()


def _placement(p: torch.Tensor) -> dict:
    if not isinstance(p, DTensor):
        return {"mesh": [], "placements": [], "local": tuple(p.shape), "global": tuple(p.shape)}
    return {
        "mesh": list(p.device_mesh.mesh_dim_names or ()),
        "placements": [str(pl) for pl in p.placements],  # "S(0)", "R"
        "local": tuple(p.to_local().shape),
        "global": tuple(p.shape),
    }


class Recorder:
    """Records a trainer's gradients, moments, weights and layout evidence (see the module docstring).

    Example: `rec = Recorder(trainer); rec.fit(); rec.save(out / f"rank{rank}.pt")`.
    """

    def __init__(self, trainer, all_steps: bool = False):
        self.trainer, self.all_steps = trainer, all_steps
        # names as the model spells them (wrapper prefixes of AC / compile dropped); tied weights under each name
        self.params = {clean_name(n): p for n, p in trainer.owned.named_parameters(remove_duplicate=False)}
        self.grads: dict[int, dict[str, torch.Tensor]] = {}
        self.moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.weights: dict[str, torch.Tensor] = {}
        self.placements = {n: _placement(p) for n, p in self.params.items()}
        self.comm: dict[str, int] = {}  # bytes per collective kind during the run's first step
        self.first_step: int | None = None
        self.seq_len: int | None = None  # tokens per rank entering the first block
        lists = block_lists(trainer.model)
        self.blocks = [getattr(b, "_checkpoint_wrapped_module", b) for b in lists[0]] if lists else []
        self.block_calls = [0] * len(self.blocks)
        self.lean_calls = [0] * len(self.blocks)
        self.micro_steps = 0  # micro-batches this rank ran (steps x accumulation)
        self._hooks = []
        self._cs = None
        self._cs_start = None

    # ---- hooks -------------------------------------------------------------------------------------
    def _install_hooks(self) -> None:
        for i, blk in enumerate(self.blocks):
            self._hooks.append(blk.register_forward_pre_hook(self._block_hook(i)))
            attn = getattr(blk, "attn", None)  # Wan: the lean path passes prenorm= to self-attention
            if attn is not None:
                self._hooks.append(attn.register_forward_pre_hook(self._lean_hook(i), with_kwargs=True))

    def _block_hook(self, i: int):
        def hook(mod, args):
            self.block_calls[i] += 1
            if i == 0 and self.seq_len is None:
                self.seq_len = int(args[0].shape[1])  # (B, S_local, D)

        return hook

    def _lean_hook(self, i: int):
        def hook(mod, args, kwargs):
            if kwargs.get("prenorm") is not None:
                self.lean_calls[i] += 1

        return hook

    def _wrap_step(self) -> None:
        tr = self.trainer
        orig = tr.opt.step

        @functools.wraps(orig)  # keeps the LR scheduler's marker on the wrapped method (no warning)
        def step(*args, **kwargs):
            if all(float(g["lr"]) == 0.0 for g in tr.opt.param_groups):  # DCP filling in the AdamW state on
                return orig(*args, **kwargs)  # resume (zero grads, lr 0), not a training step
            s = tr.sched.last_epoch + 1  # the step being taken (the scheduler steps after the optimizer)
            if self.first_step is None:
                self.first_step = s
                if self._cs is not None:
                    self.comm = tr_delta(self._cs_start, self._cs.snapshot())
            self.micro_steps += tr.accum
            if self.all_steps or s == self.first_step:
                self.grads[s] = {n: whole(p.grad) for n, p in self.params.items() if p.grad is not None}
            out = orig(*args, **kwargs)
            if s == tr.cfg.train.steps:
                for n, p in self.params.items():
                    st = tr.opt.state.get(p)
                    if st:
                        self.moments[n] = (whole(st["exp_avg"]), whole(st["exp_avg_sq"]))
                    self.weights[n] = whole(p)
            return out

        tr.opt.step = step

    def fit(self) -> None:
        """`trainer.fit()` with the recording installed (hooks and the collective counter removed after)."""
        from mmkit.tools.commstats import CommStats

        self._install_hooks()
        self._wrap_step()
        if self.trainer.world > 1:
            self._cs = CommStats().install()
            self._cs_start = self._cs.snapshot()
        try:
            self.trainer.fit()
        finally:
            if self._cs is not None:
                self._cs.uninstall()
            for h in self._hooks:
                h.remove()
            del self.trainer.opt.step  # the instance attribute: back to the class method

    # ---- results -----------------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "grads": self.grads,
            "moments": self.moments,
            "weights": self.weights,
            "placements": self.placements,
            "comm": self.comm,
            "first_step": self.first_step,
            "seq_len": self.seq_len,
            "block_calls": self.block_calls,
            "lean_calls": self.lean_calls,
            "micro_steps": self.micro_steps,
        }

    def save(self, path: Path) -> None:
        torch.save(self.state(), path)


def tr_delta(before: dict, after: dict) -> dict[str, int]:
    """Bytes per collective kind sent between two CommStats snapshots."""
    b, a = before["bytes"], after["bytes"]
    return {k: a.get(k, 0) - b.get(k, 0) for k in a if a.get(k, 0) != b.get(k, 0)}


def load_ranks(folder: Path) -> list[dict]:
    """The `Recorder` states of one layout, one per rank (`rank<r>.pt`), in rank order."""
    files = sorted(folder.glob("rank*.pt"), key=lambda f: int(f.stem[4:]))
    assert files, f"no recorder files in {folder}"
    return [torch.load(f, weights_only=False) for f in files]


def merged(states: list[dict], key: str, step: int | None = None) -> dict[str, torch.Tensor]:
    """One name -> tensor dict from every rank's `key` ("grads" at `step`, "moments", "weights"). Ranks that
    hold the same parameter (tp, dp replicas, a tied weight's two stages) must agree exactly."""
    out: dict = {}
    for r, st in enumerate(states):
        part = st[key][step] if step is not None else st[key]
        for n, t in part.items():
            if n in out:
                same = (
                    all(torch.equal(a, b) for a, b in zip(out[n], t))
                    if isinstance(t, tuple)
                    else (torch.equal(out[n], t))
                )
                assert same, f"{key} of {n}: rank {r} holds a different copy than an earlier rank"
            else:
                out[n] = t
    return out


def rel_err(ref: torch.Tensor, got: torch.Tensor) -> float:
    """max |got - ref| / max |ref| (0 when both are zero)."""
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    err = float((got.double() - ref.double()).abs().max()) if ref.numel() else 0.0
    return err / scale if scale > 0 else err


def compare(ref: dict, got: dict, tol: float, what: str, names: set[str] | None = None) -> float:
    """Every tensor of `ref` (or of `names`) is in `got`, same shape, within `tol` of its own scale (see the
    module docstring); tuples (AdamW moments) compare each part. Returns the largest error seen."""
    names = set(ref) if names is None else names
    missing = sorted(names - set(got))
    assert not missing, f"{what}: no tensor for {missing[:4]} ({len(missing)} missing)"
    worst, bad = 0.0, []
    for n in sorted(names):
        pairs = zip(ref[n], got[n]) if isinstance(ref[n], tuple) else [(ref[n], got[n])]
        for j, (a, b) in enumerate(pairs):
            assert a.shape == b.shape, f"{what}: {n} has shape {tuple(b.shape)}, reference {tuple(a.shape)}"
            e = rel_err(a, b)
            worst = max(worst, e)
            if e > tol:
                bad.append(f"{n}{f'[{j}]' if isinstance(ref[n], tuple) else ''}: {e:.1e}")
    assert not bad, f"{what}: {len(bad)} tensors off by more than {tol:.0e} of their scale: {bad[:6]}"
    return worst


def comm_counter(states: list[dict]) -> Counter:
    """Bytes per collective kind in step 1, summed over the ranks."""
    c: Counter = Counter()
    for st in states:
        c.update(st["comm"])
    return c
