from pathlib import Path

import pytest

from storage.errors import UserInputError
from tasks.config import RECIPES, AblationRecipe, CacheRecipe, load_recipe

RECIPE_DIR = Path(__file__).parents[2] / "recipes"


def test_defaults_validate_and_layers_are_sorted():
    r = load_recipe(CacheRecipe, overrides=["cache.layers=[15, 3]", "corpus.n_tokens=1000"])
    assert r.cache.layers == [3, 15] and r.corpus.n_tokens == 1000


@pytest.mark.parametrize(
    "overrides, field, fix",
    [
        (["model.nme=x"], "recipe field 'model.nme': unknown key", "remove it"),
        (["bogus=1"], "recipe field 'bogus': unknown key", "remove it"),
        (["corpus.n_tokens=lots"], "recipe field 'corpus.n_tokens'", "give a valid value"),
        (["corpus.n_tokens=0"], "recipe field 'corpus.n_tokens'", "give a valid value"),
        (["cache.dtype=int8"], "recipe field 'cache.dtype'", "give a valid value"),
        (["cache.layers=[1, 1]"], "recipe field 'cache.layers'", "give a valid value"),
        (["cache.layers"], "--set: 'cache.layers' has no '='", "section.key=value"),
    ],
)
def test_bad_overrides_name_field_and_fix(overrides, field, fix):
    with pytest.raises(UserInputError) as err:
        load_recipe(CacheRecipe, overrides=overrides)
    assert str(err.value).startswith(field) and fix in str(err.value) and "\n" not in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(UserInputError, match="not found"):
        load_recipe(CacheRecipe, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(UserInputError, match="not valid YAML at line"):
        load_recipe(CacheRecipe, bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(UserInputError, match="mapping"):
        load_recipe(CacheRecipe, scalar)


@pytest.mark.parametrize("path", sorted(RECIPE_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    flow = {
        "cache": "cache-activations",
        "calibrate": "calibrate",
        "features": "features",
        "patching": "patching",
        "ablation": "ablation",
        "demo": "experiment",
        "experiment": "experiment",
    }[path.name.split("_")[0]]
    recipe = load_recipe(RECIPES[flow], path)
    assert isinstance(recipe, RECIPES[flow]) and "smollm2-135m-instruct" in recipe.model_dump_json()


def test_every_config_field_is_documented():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann)

    for recipe in RECIPES.values():
        walk(recipe)


def test_an_ablation_eval_key_set_alone_keeps_prompt_ablations_empty():
    # setting one eval key builds the eval section from its field defaults: ablation's must not be patching's
    recipe = AblationRecipe.model_validate({"eval": {"n_test": 5}})
    assert recipe.eval.n_test == 5 and recipe.eval.prompt_ablations == []
