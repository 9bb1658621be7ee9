"""A grid of two seeds: the seed a cell hands its task recipe reaches every method's training subset."""

import numpy as np

from tasks.common.config import ModelConfig
from tasks.experiment.config import ExperimentRecipe
from tasks.experiment.grid import cell_recipe, expand
from tasks.explainer.config import ExplainerConfig
from tasks.features.ground_truth import FeatureSet
from tasks.features.train import grid_seed, training_subset


def test_every_method_of_a_cell_draws_the_cells_training_subset():
    """Two seeds: each cell's explainers (trained with their own cfg.seed) and its nearest-neighbour baseline
    and metrics rows (grid_seed) all use the cell's seed, so they see one training subset."""
    recipe = ExperimentRecipe(
        target=ModelConfig(name="tiny-llama"), tasks=["features"], grid={"n_train": [4, 12], "seeds": [0, 5]},
        features={"explainers": {"self": ExplainerConfig(seed=1), "other": ExplainerConfig(seed=2)}},
    )  # fmt: skip
    fs = FeatureSet(np.arange(20) % 2, np.arange(20), [f"f{i}" for i in range(20)], np.array(["train"] * 20),
                    np.zeros((20, 2), dtype=np.float32))  # fmt: skip
    cells = expand(recipe)
    assert [(c.n_train, c.seed) for c in cells] == [(4, 0), (12, 0), (4, 5), (12, 5)]
    subsets = {}
    for cell in cells:
        r = cell_recipe(recipe, cell)
        assert grid_seed(r) == cell.seed and {cfg.seed for cfg in r.explainers.values()} == {cell.seed}
        drawn = {role: training_subset(fs, r.eval.n_train, cfg.seed).ids() for role, cfg in r.explainers.items()}
        baseline = training_subset(fs, r.eval.n_train, grid_seed(r)).ids()
        assert drawn == {"self": baseline, "other": baseline}
        subsets[(cell.n_train, cell.seed)] = set(baseline)
    for seed in (0, 5):  # nested within a seed, different across seeds
        assert subsets[(4, seed)] < subsets[(12, seed)]
    assert subsets[(4, 0)] != subsets[(4, 5)]
