"""Named Wan2.1 flavors build with the parameter counts of the public checkpoints (on the meta device)."""

import pytest
import torch

from mmkit.models.wan.config import FLAVORS, WanConfig
from mmkit.models.wan.model import WanTransformer


@pytest.mark.parametrize(
    "flavor, billions",
    [("1.3B", 1.42), ("14B", 14.29), ("i2v-14B-480P", 16.40), ("i2v-14B-720P", 16.40)],
)
def test_flavor_sizes(flavor, billions):
    with torch.device("meta"):
        model = WanTransformer(FLAVORS[flavor])
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / 1e9 - billions) < 0.01, n


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="image_dim and added_kv_proj_dim"):
        WanConfig(image_dim=1280).validate()
    with pytest.raises(ValueError, match="attention_head_dim=5"):
        WanConfig(attention_head_dim=5).validate()
    with pytest.raises(ValueError, match="patch_size"):
        WanConfig.from_dict({"patch_size": [1, 2]})
