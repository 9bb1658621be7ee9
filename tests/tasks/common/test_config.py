import types
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import pytest
from annotated_types import Le, Lt
from pydantic import BaseModel

from storage.errors import UserInputError
from tasks.ablation.config import AblationRecipe
from tasks.common.config import CacheRecipe, as_recipe, load_recipe, parse_yaml
from tasks.experiment.config import ExperimentRecipe
from tasks.explainer.config import CalibrateRecipe
from tasks.features.config import FeaturesRecipe
from tasks.patching.config import PatchingRecipe
from tasks.recipes import RECIPES
from tests.factories import ASKED

RECIPE_DIR = Path(__file__).parents[3] / "recipes"


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
        "explain": "explain",
        "bootstrap": "bootstrap",
    }[path.name.split("_")[0]]
    recipe = load_recipe(RECIPES[flow], path)
    assert isinstance(recipe, RECIPES[flow])
    assert flow in ("explain", "bootstrap") or "smollm2-135m-instruct" in recipe.model_dump_json()  # the checkpoint's


def test_every_config_field_is_documented():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann)

    for recipe in RECIPES.values():
        walk(recipe)


def test_an_ablation_eval_key_set_alone_keeps_prompt_omissions_empty():
    # setting one eval key builds the eval section from its field defaults: ablation's must not be patching's
    recipe = AblationRecipe.model_validate({"eval": {"n_test": 5}})
    assert recipe.eval.n_test == 5 and recipe.eval.prompt_omissions == []


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
        (FeaturesRecipe, ["explainers.self.inject_scale=.nan"], "recipe field 'explainers.self.inject_scale': input should be a finite number"),
        (CalibrateRecipe, ["explainer.weight_decay=.inf"], "recipe field 'explainer.weight_decay': input should be a finite number"),
        # a list is a set: a repeated value is a mistake, not a second run
        (ExperimentRecipe, ["grid.seeds=[1, 2, 1]"], "recipe field 'grid.seeds': 1 is given twice"),
        (ExperimentRecipe, ["grid.n_train=[64, 64]"], "recipe field 'grid.n_train': 64 is given twice"),
        (PatchingRecipe, ["eval.omission_roles=[self, self]"], "recipe field 'eval.omission_roles': 'self' is given"),
        (CalibrateRecipe, ["calibration.injections=[early_add, early_add]"], "recipe field 'calibration.injections': 'early_add' is given twice"),
        (CacheRecipe, ["cache.layers=[1, 1]"], "recipe field 'cache.layers': 1 is given twice"),
        # the field as written: a union member's tag is no part of it
        (CalibrateRecipe, ["calibration.injections=[lasers]"], "recipe field 'calibration.injections.0': input should"),
        (FeaturesRecipe, ["eval.prompt_omissions=[no_activation, 7]"], "recipe field 'eval.prompt_omissions.1': input"),
        # counts, sizes and seeds past a sane bound: runs of tens or hundreds of digits (a 400-digit batch size
        # once loaded the model and wrote a cache), then values just past the bound
        (CacheRecipe, ["cache.batch_size=" + "9" * 400], "recipe field 'cache.batch_size': input should be less than or equal to 65536; fix: give a valid value (got 9999"),
        (FeaturesRecipe, ["sae.batch_tokens=" + "1" * 30], "recipe field 'sae.batch_tokens': input should be less than or equal to 1048576"),
        (CalibrateRecipe, ["calibration.n_train=" + "7" * 50], "recipe field 'calibration.n_train': input should be less than or equal to 1000000000"),
        (CacheRecipe, ["cache.contexts_per_shard=100000"], "recipe field 'cache.contexts_per_shard': input should be less than or equal to 65536"),
        (CacheRecipe, ["corpus.n_tokens=1e13"], "recipe field 'corpus.n_tokens': input should be a valid integer"),
        (CacheRecipe, ["corpus.n_tokens=10000000000001"], "recipe field 'corpus.n_tokens': input should be less than or equal to 1000000000000"),
        (FeaturesRecipe, ["explainers.self.batch_size=65537"], "recipe field 'explainers.self.batch_size': input should be less than or equal to 65536"),
        (PatchingRecipe, ["patching.batch_size=1000000"], "recipe field 'patching.batch_size': input should be less"),
        (AblationRecipe, ["explainers.other.eval_batch_size=99999999"], "recipe field 'explainers.other.eval_batch_size': input should be less than or equal"),
        (ExperimentRecipe, ["grid.n_train=[8, 10000000000]"], "recipe field 'grid.n_train.1': input should be less than or equal to 1000000000"),
        (ExperimentRecipe, ["grid.seeds=[-1]"], "recipe field 'grid.seeds.0': input should be greater than or equal to 0"),
        (CacheRecipe, ["cache.seed=4294967296"], "recipe field 'cache.seed': input should be less than or equal to 4294967295"),
        # fields that must agree, checked together
        (CacheRecipe, ["cache.positions_per_context=128"], "recipe field 'cache.positions_per_context': 128 asked but a context of 128 tokens holds 127 storable positions (skip_first 1); fix: use at most 127"),
        (CacheRecipe, ["corpus.context_length=16", "cache.skip_first=4", "cache.positions_per_context=13"], "recipe field 'cache.positions_per_context': 13 asked but a context of 16 tokens holds 12"),
        (FeaturesRecipe, ["cache.positions_per_context=1000"], "recipe field 'cache.positions_per_context': 1000 asked"),
        (CalibrateRecipe, ["corpus.context_length=8", "cache.positions_per_context=8"], "recipe field 'cache.positions_per_context': 8"),
        (ExperimentRecipe, ["features.corpus.context_length=32", "features.cache.positions_per_context=40"], "recipe field 'features.cache.positions_per_context': 40 asked but a context of 32 tokens holds 31"),
        (CacheRecipe, ["cache.skip_first=128"], "recipe field 'cache.skip_first': 128 skips all 128 positions of a context; fix: lower it below corpus.context_length"),
        (FeaturesRecipe, ["sae.n_exemplars=5"], "recipe field 'sae.n_exemplars': 5 is fewer than min_exemplars (10), so no feature would be kept; fix: keep at least 10 exemplars"),
        (FeaturesRecipe, ["sae.min_exemplars=30"], "recipe field 'sae.n_exemplars': 20 is fewer than min_exemplars (30)"),
        (ExperimentRecipe, ["features.sae.n_exemplars=2", "features.sae.min_exemplars=3"], "recipe field 'features.sae.n_exemplars': 2 is fewer than min_exemplars (3)"),
    ],
)  # fmt: skip
def test_a_value_a_recipe_may_not_hold_is_one_line_with_the_fix(kind, overrides, message):
    with pytest.raises(UserInputError) as err:
        load_recipe(kind, overrides=overrides)
    text = str(err.value)
    assert text.startswith(message) and "; fix: " in text and "\n" not in text, text


def test_the_strict_rules_keep_what_is_right():
    for name, recipe in RECIPES.items():  # defaults hold no repeats, no inf, no booleans as numbers; they round-trip
        made = recipe.model_validate(ASKED.get(name, {}))
        assert recipe.model_validate(made.model_dump()) == made
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


def _int_fields(model: type, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted name, metadata) of every int field of `model` and the configs it holds (dict values, lists)."""
    out = []
    for name, field in model.model_fields.items():
        stack = [(field.annotation, list(field.metadata))]
        while stack:
            ann, meta = stack.pop()
            origin = get_origin(ann)
            if origin is Annotated:
                stack.append((get_args(ann)[0], [m for fi in get_args(ann)[1:] for m in getattr(fi, "metadata", [fi])]))
            elif origin in (list, dict, Union, types.UnionType):
                stack += [(a, meta) for a in get_args(ann)]
            elif isinstance(ann, type) and issubclass(ann, BaseModel):
                out += _int_fields(ann, f"{prefix}{name}.")
            elif ann is int:
                out.append((prefix + name, meta))
    return out


def test_every_int_field_has_an_upper_bound():
    # a count, size or seed without one reaches a loader, an allocation or a seeded generator unchecked
    fields = {name: meta for recipe in RECIPES.values() for name, meta in _int_fields(recipe)}
    assert len(fields) > 60
    unbounded = sorted(name for name, meta in fields.items() if not any(isinstance(m, Le | Lt) for m in meta))
    assert unbounded == []


def test_the_bounds_are_generous():
    r = load_recipe(FeaturesRecipe, overrides=["cache.batch_size=65536", "corpus.n_tokens=1000000000000",
                                               "explainers.self.batch_size=65536", "sae.seed=4294967295"])  # fmt: skip
    assert (r.cache.batch_size, r.corpus.n_tokens, r.sae.seed) == (65536, 10**12, 2**32 - 1)


def test_a_flow_parameter_is_validated_like_a_recipe_file():
    recipe = load_recipe(CacheRecipe, overrides=["corpus.context_length=16"])
    assert as_recipe(CacheRecipe, recipe) is recipe  # a recipe the CLI validated is passed through
    assert as_recipe(CacheRecipe, recipe.model_dump(mode="json")) == recipe  # a deployment's JSON form
    for data, message in [
        ({"corpus": {"context_length": 16}, "cache": {"positions_per_context": 40}},
         "recipe field 'cache.positions_per_context': 40 asked but a context of 16 tokens holds 15 storable "
         "positions (skip_first 1); fix: use at most 15, or null to store all"),
        ({"cache": {"layer": [1]}}, "recipe field 'cache.layer': unknown key; fix: remove it or correct its spelling"),
    ]:  # fmt: skip
        with pytest.raises(UserInputError) as err:
            as_recipe(CacheRecipe, data)
        assert str(err.value).startswith(message), str(err.value)


def test_fields_that_agree_pass():
    r = load_recipe(CacheRecipe, overrides=["corpus.context_length=16", "cache.positions_per_context=15"])
    assert r.cache.positions_per_context == 15
    assert load_recipe(FeaturesRecipe, overrides=["sae.n_exemplars=10"]).sae.n_exemplars == 10
