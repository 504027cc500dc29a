"""Every shipped recipe parses with no unknown keys and passes validation once its paths exist."""

from pathlib import Path

import pytest

from mmkit.config import load_config, validate

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").rglob("*.toml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_is_valid(recipe, tmp_path):
    cfg = load_config(recipe)
    # point the external paths at stand-ins so only the recipe's own values are judged
    model = tmp_path / "model"
    model.mkdir()
    (model / ("model_index.json" if cfg.model.family == "wan" else "config.json")).write_text("{}")
    data = tmp_path / "data.txt"
    data.write_text("")
    overrides = load_config(recipe, {"data.paths": [str(data)]})
    if overrides.model.init_from:
        overrides.model.init_from = str(model)
    if overrides.data.precomputed_dir:
        overrides.data.precomputed_dir = str(tmp_path)
    validate(overrides, world_size=1)


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"wan_t2v.toml", "wan2_1_t2v_1_3b.toml", "wan2_1_i2v_14b.toml"} <= names
