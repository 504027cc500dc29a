"""OpenSoraPlan plan pieces that need no process group: the Skiparse work split under context
parallelism and the refusal of a cp degree whose split cannot hold whole heads (before any compute)."""

from types import SimpleNamespace

import pytest
import torch.nn as nn

from mmkit import registry
from mmkit.parallel.plans.opensoraplan import OpenSoraPlanPlan, skiparse_split


def test_skiparse_split_groups_then_heads():
    assert [skiparse_split(cp, 4) for cp in (2, 3, 4, 6, 8, 12)] == [
        (2, 1), (1, 3), (4, 1), (2, 3), (4, 2), (4, 3),
    ]  # fmt: skip


def test_cp_whose_head_split_does_not_divide_the_heads_is_refused():
    spec = registry.get("opensoraplan")
    plan = OpenSoraPlanPlan.__new__(OpenSoraPlanPlan)
    nn.Module.__init__(plan)
    plan.inner = spec.build_model(spec.flavor("tiny"))  # 2 heads
    plan.dims = SimpleNamespace(cp=3, tp=1)
    with pytest.raises(
        ValueError,
        match=r"parallel.cp=3: .* heads over 3, and the 2 heads .* divide by 3; use a degree in \[2, 4, 8\]",
    ):
        plan.apply()
