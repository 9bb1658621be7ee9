import pytest

from storage.errors import UserInputError
from tasks.common.config import ModelConfig
from tasks.experiment.config import ExperimentRecipe
from tasks.experiment.grid import Cell, cell_recipe, check_recipe, expand


def test_grid_expands_task_by_seed_by_size_with_flat_baselines_once_per_task():
    recipe = ExperimentRecipe(grid={"n_train": [256, 32, 64], "seeds": [0, 7]}, tasks=["features", "ablation"])
    cells = expand(recipe)
    assert len(cells) == 2 * 2 * 3  # tasks x seeds x distinct sizes
    assert cells[:3] == [Cell("features", 32, 0, False, False), Cell("features", 64, 0, False, False),
                         Cell("features", 256, 0, True, True)]  # fmt: skip
    assert [c for c in cells if c.flat_baselines] == [Cell("features", 256, 0, True, True),
                                                      Cell("ablation", 256, 0, True, True)]  # fmt: skip
    # the n_train-dependent controls: the largest size of every seed (default), or every cell
    assert [(c.task, c.n_train, c.seed) for c in cells if c.controls] == [
        ("features", 256, 0), ("features", 256, 7), ("ablation", 256, 0), ("ablation", 256, 7)]  # fmt: skip
    every = expand(recipe.model_copy(update={"grid": recipe.grid.model_copy(update={"controls": "every"})}))
    assert all(c.controls for c in every) and [c.flat_baselines for c in every] == [c.flat_baselines for c in cells]


def test_controls_run_only_in_their_cells():
    recipe = ExperimentRecipe(
        target=ModelConfig(name="tiny-llama"),
        features={"eval": {"prompt_omissions": ["no_activation", "no_layer"], "rotated_basis_roles": ["self"]}},
        patching={"eval": {"prompt_omissions": ["no_activation"], "rotated_basis_roles": ["self"]}},
    )
    for task in ("features", "patching"):
        without = cell_recipe(recipe, Cell(task, 8, 0, False, False)).eval
        assert without.prompt_omissions == [] and without.vector_controls is False
        assert without.rotated_basis_roles == []
        with_ = cell_recipe(recipe, Cell(task, 16, 0, True, True)).eval
        assert with_.prompt_omissions == getattr(recipe, task).eval.prompt_omissions and with_.vector_controls is True
        assert with_.rotated_basis_roles == ["self"]


def test_a_cell_is_its_task_recipe_with_this_size_seed_store_and_target():
    recipe = ExperimentRecipe(home="store-x", target=ModelConfig(name="tiny-llama"), grid={"n_train": [8, 16]})
    feats = cell_recipe(recipe, Cell("features", 8, 3, False, False))
    assert feats.home == "store-x" and feats.target.name == "tiny-llama"
    assert feats.eval.n_train == 8 and feats.eval.selfie is False
    assert {c.seed for c in feats.explainers.values()} == {3}
    patch = cell_recipe(recipe, Cell("patching", 16, 0, True, True))
    assert patch.eval.n_train == 16 and patch.eval.zero_shot is True and patch.target.name == "tiny-llama"
    # the experiment's sections are untouched
    assert recipe.features.eval.n_train is None and recipe.patching.explainers["self"].seed == 0


def test_bad_grid_and_task_sections_are_named():
    with pytest.raises(ValueError, match="n_train"):
        ExperimentRecipe(grid={"n_train": [0, 8]})
    # tiny explainers: the check resolves every explainer's model before the roles (the default other, Gemma,
    # would be converted from its GGUF first, a minute)
    recipe = ExperimentRecipe(target=ModelConfig(name="tiny-llama"), tasks=["patching"],
                              patching={"explainers": {"self": {"model": {"name": "tiny-llama"}}},
                                        "eval": {"omission_roles": ["ghost"]}})  # fmt: skip
    with pytest.raises(UserInputError, match=r"^patching\.eval\.omission_roles: \['ghost'\]"):
        check_recipe(recipe)
