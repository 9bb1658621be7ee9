"""The outcome-task protocol's shared parts: nested training samples, the registry, the variants a recipe trains."""

import pyarrow as pa
import pytest

from storage.errors import UserInputError
from storage.store import Dataset
from tasks.ablation.config import AblationRecipe
from tasks.ablation.task import ABLATION
from tasks.outcomes.protocol import load_rows
from tasks.outcomes.registry import check_recipe, task_of
from tasks.patching.config import PatchingRecipe
from tasks.patching.task import PATCHING
from tests.factories import tiny_ablation_recipe


def _gt(tmp_path, n_train: int, n_test: int) -> Dataset:
    gt = Dataset(tmp_path, "patching_gt", "k")
    gt.create({"stage": "test"})
    rows = [{"split": "train", "pair_id": i} for i in range(n_train)]
    rows += [{"split": "test", "pair_id": 100 + i} for i in range(n_test)]
    gt.write_shard(0, pa.Table.from_pylist(rows))
    gt.mark_complete({})
    return gt


def test_training_samples_are_nested_by_seed(tmp_path):
    gt = _gt(tmp_path, 20, 5)
    ids = {n: [r["pair_id"] for r in load_rows(gt, "train", n, seed=3)] for n in (4, 8, 16)}
    assert ids[8][:4] == ids[4] and ids[16][:8] == ids[8]  # a prefix of one permutation: data-efficiency curves nest
    assert len(set(ids[16])) == 16 and all(0 <= i < 20 for i in ids[16])
    assert [r["pair_id"] for r in load_rows(gt, "train", 8, seed=4)] != ids[8]  # another seed, another sample
    assert [r["pair_id"] for r in load_rows(gt, "train", None, seed=3)] == list(range(20))  # all, in table order
    assert [r["pair_id"] for r in load_rows(gt, "test", 99, seed=3)] == [100, 101, 102, 103, 104]  # a cap above: all
    with pytest.raises(UserInputError, match="21 exceeds the 20 training rows"):
        load_rows(gt, "train", 21, seed=3)


def test_each_recipe_type_has_its_task_and_variants():
    patching = PatchingRecipe(eval={"prompt_omissions": ["no_activation"], "rotated_basis_roles": ["self"]})
    assert task_of(patching) is PATCHING and task_of(AblationRecipe()) is ABLATION
    assert PATCHING.variants(patching) == [("self", "trained"), ("other", "trained"), ("self", "no_activation"),
                                           ("self", "rotated_basis")]  # fmt: skip
    assert ABLATION.variants(AblationRecipe()) == [("self", "trained"), ("other", "trained")]


def test_a_fitted_projection_is_refused_where_questions_carry_no_vector(tmp_path):
    recipe = tiny_ablation_recipe(tmp_path)
    other = recipe.explainers["other"].model_copy(update={"projection": "fitted"})
    recipe = recipe.model_copy(update={"explainers": {**recipe.explainers, "other": other}})
    with pytest.raises(UserInputError, match="explainers.other.projection: 'fitted' maps a vector, and ablation"):
        check_recipe(recipe)
    assert not any(tmp_path.iterdir())  # refused before anything is written
