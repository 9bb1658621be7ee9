from pathlib import Path

import pytest

from storage.errors import UserInputError
from tasks.config import (
    RECIPES,
    AblationRecipe,
    CacheRecipe,
    CalibrateRecipe,
    ExperimentRecipe,
    FeaturesRecipe,
    PatchingRecipe,
    load_recipe,
    parse_yaml,
)

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


@pytest.mark.parametrize(
    "kind, overrides, message",
    [
        # true/false is not a number
        (CacheRecipe, ["cache.layers=[true]"], "recipe field 'cache.layers': true/false is not a number"),
        (CacheRecipe, ["cache.batch_size=true"], "recipe field 'cache.batch_size': true/false is not a number"),
        (FeaturesRecipe, ["eval.selfie_scales=[1, false]"], "recipe field 'eval.selfie_scales': true/false is not"),
        (CacheRecipe, ["model.memory_fraction=true"], "recipe field 'model.memory_fraction': true/false is not"),
        # inf and nan are not values of any float field
        (FeaturesRecipe, ["sae.lr=.inf"], "recipe field 'sae.lr': input should be a finite number"),
        (FeaturesRecipe, ["explainers.self.inject_scale=.nan"], "recipe field 'explainers.self.inject_scale': input "
                                                                "should be a finite number"),
        (CalibrateRecipe, ["explainer.weight_decay=.inf"], "recipe field 'explainer.weight_decay': input should be a "
                                                           "finite number"),
        # a list is a set: a repeated value is a mistake, not a second run
        (ExperimentRecipe, ["grid.seeds=[1, 2, 1]"], "recipe field 'grid.seeds': 1 is given twice"),
        (ExperimentRecipe, ["grid.n_train=[64, 64]"], "recipe field 'grid.n_train': 64 is given twice"),
        (PatchingRecipe, ["eval.ablation_roles=[self, self]"], "recipe field 'eval.ablation_roles': 'self' is given"),
        (CalibrateRecipe, ["calibration.injections=[early_add, early_add]"], "recipe field 'calibration.injections': "
                                                                             "'early_add' is given twice"),
        (CacheRecipe, ["cache.layers=[1, 1]"], "recipe field 'cache.layers': 1 is given twice"),
        # the field as written: a union member's tag is no part of it
        (CalibrateRecipe, ["calibration.injections=[lasers]"], "recipe field 'calibration.injections.0': input should"),
        (FeaturesRecipe, ["eval.prompt_ablations=[no_activation, 7]"], "recipe field 'eval.prompt_ablations.1': input"),
    ],
)  # fmt: skip
def test_what_lax_validation_would_take_is_refused(kind, overrides, message):
    with pytest.raises(UserInputError) as err:
        load_recipe(kind, overrides=overrides)
    assert str(err.value).startswith(message) and "; fix: " in str(err.value), str(err.value)


def test_the_strict_rules_keep_what_is_right():
    for recipe in RECIPES.values():  # defaults hold no repeats, no inf, no booleans as numbers; they round-trip
        assert recipe.model_validate(recipe().model_dump()) == recipe()
    r = load_recipe(FeaturesRecipe, overrides=["sae.lr=1", "explainers.self.lr=1e-3", "eval.selfie=false"])
    assert r.sae.lr == 1.0 and r.explainers["self"].lr == 0.001 and r.eval.selfie is False  # YAML reads 1e-3 as text
    assert load_recipe(ExperimentRecipe, overrides=["grid.n_train=[16, 8]"]).grid.n_train == [8, 16]


@pytest.mark.parametrize(
    "text, message",
    [
        ("a: 1\na: 2\n", "x at line 2: the key 'a' is given twice (first at line 1); fix: give each key once"),
        ("a:\n  b: 1\n  c: 2\n  b: 3\n", "x at line 4: the key 'b' is given twice (first at line 2)"),
        ("{a: 1, a: 1}", "x at line 1: the key 'a' is given twice"),
        ("a: !!python/object/apply:os.system [ls]", "x at line 1: the tag '!!python/object/apply:os.system' is not"),
        ("a: !!python/name:os.system", "x at line 1: the tag '!!python/name:os.system' is not allowed"),
        ("a: !custom 1", "x at line 1: the tag '!custom' is not allowed"),
        ("~: 1", "x at line 1: the key None is not a name"),
        ("'': 1", "x at line 1: the key '' is not a name"),
        ("on: 1", "x at line 1: the key True is not a name"),
        ("3.5: 1", "x at line 1: the key 3.5 is not a name"),
        ("a: &a [*a]", "x at line 1: an alias refers to the value that holds it"),
        ("a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n" + "".join(f"b{i}: &b{i} [{', '.join([f'*{p}'] * 10)}]\n"
         for i, p in enumerate(["a", "b0", "b1"])), "x at line 4: its aliases expand to more than 10000 values"),
        ("a: [1, 2", "x is not valid YAML at line 1: expected ',' or ']'"),
        ("a: b: c", "x is not valid YAML at line 1: mapping values are not allowed here"),
    ],
)  # fmt: skip
def test_recipe_yaml_refuses_what_safe_load_takes_silently(text, message):
    with pytest.raises(UserInputError) as err:
        parse_yaml(text, "--config", "x")
    assert str(err.value).startswith("--config: " + message), str(err.value)


def test_recipe_yaml_keeps_merge_keys_and_modest_aliases():
    text = "base: &b {lr: 0.1, seed: 1}\nself:\n  <<: *b\n  seed: 2\nboth: [*b, *b]\n"
    assert parse_yaml(text, "--config", "x") == {
        "base": {"lr": 0.1, "seed": 1}, "self": {"lr": 0.1, "seed": 2}, "both": [{"lr": 0.1, "seed": 1}] * 2}  # fmt: skip


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("latin1.yaml", "model:\n  name: caf\xe9\n".encode("latin-1"), "is not UTF-8 text (byte 18)"),
        ("utf16.yaml", "model: {}\n".encode("utf-16"), "is not UTF-8 text (byte 0)"),
        ("bom.yaml", "\ufeffcache:\n  seed: 3\n".encode(), None),  # a UTF-8 byte-order mark is UTF-8
        ("dir.yaml", None, "is a folder, not a recipe file"),
    ],
)
def test_recipe_files_are_utf8_files(tmp_path, name, text, message):
    path = tmp_path / name
    path.mkdir() if text is None else path.write_bytes(text)
    if message is None:
        assert load_recipe(CacheRecipe, path).cache.seed == 3
        return
    with pytest.raises(UserInputError) as err:
        load_recipe(CacheRecipe, path)
    assert str(err.value).startswith("--config: ") and message in str(err.value), str(err.value)
