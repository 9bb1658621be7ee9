"""The experiment grid (paper §3.6, §4, §5, Fig. 5): tasks x n_train x seeds, each cell a task recipe.

A cell is the task's own recipe with `eval.n_train` and the explainers' seed set, so its explainer checkpoints
and evaluation run are the same cached stages the task flows use: a finished cell is never recomputed, and a
task flow run with the same settings shares its work. Baselines that do not depend on n_train (SelfIE,
zero-shot) run in one cell per task, the largest n_train at the first seed; they are drawn as flat lines. The
controls that do depend on it (v = 0, the prompt-omission explainers) run where `grid.controls` says: by
default in the largest cell of each seed only, as the paper reports them.
Table `experiment_cells(experiment, task, n_train, seed, flat_baselines, controls, run_id)` ties cells to
result runs.
"""

from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa

from storage.errors import UserInputError
from storage.hashing import config_hash
from storage.store import Dataset, check_store, store_root
from tasks.ablation.config import AblationRecipe
from tasks.common.orchestration import stage_task
from tasks.experiment.config import ExperimentRecipe
from tasks.features.config import FeaturesRecipe
from tasks.patching.config import PatchingRecipe

STAGE_VERSION = 2  # 2: experiment_cells carries `controls`
TaskRecipe = FeaturesRecipe | PatchingRecipe | AblationRecipe


@dataclass(frozen=True)
class Cell:
    task: str
    n_train: int
    seed: int
    flat_baselines: bool  # this cell also scores the n_train-independent baselines
    controls: bool  # this cell also runs the n_train-dependent controls (v = 0, prompt omissions, rotated basis)


def expand(recipe: ExperimentRecipe) -> list[Cell]:
    """Every (task, n_train, seed) of the grid, sizes ascending within a task and seed."""
    grid = recipe.grid
    largest, first = max(grid.n_train), grid.seeds[0]
    return [Cell(task, n, seed, n == largest and seed == first, grid.controls == "every" or n == largest)
            for task in recipe.tasks for seed in grid.seeds for n in grid.n_train]  # fmt: skip


def cell_recipe(recipe: ExperimentRecipe, cell: Cell) -> TaskRecipe:
    """The task recipe of one cell: the experiment's store and target, this n_train and seed."""
    base = recipe.task_recipe(cell.task)
    flat = {"selfie": cell.flat_baselines} if cell.task == "features" else {"zero_shot": cell.flat_baselines}
    if not cell.controls:
        flat |= {"vector_controls": False, "prompt_omissions": [], "rotated_basis_roles": []}
    explainers = {role: cfg.model_copy(update={"seed": cell.seed}) for role, cfg in base.explainers.items()}
    return base.model_copy(
        update={"explainers": explainers, "eval": base.eval.model_copy(update={"n_train": cell.n_train, **flat})}
    )


def check_recipe(recipe: ExperimentRecipe) -> None:
    """Validate the store, then every task section before anything runs (its field names prefixed with the task)."""
    from tasks.features.ground_truth import check_recipe as check_features
    from tasks.outcomes.registry import check_recipe as check_outcomes

    check_store(recipe.home)
    for task in recipe.tasks:
        try:
            (check_features if task == "features" else check_outcomes)(recipe.task_recipe(task))
        except UserInputError as err:
            raise UserInputError(f"{task}.{err.field}", err.problem, err.fix) from None


def experiment_key(recipe: ExperimentRecipe) -> str:
    return config_hash("experiment", STAGE_VERSION, recipe.model_copy(update={"home": None}))


def experiment_dataset(recipe: ExperimentRecipe) -> Dataset:
    return Dataset(store_root(recipe.home), "experiment_cells", experiment_key(recipe))


@stage_task("record-experiment", output=lambda p: experiment_dataset(p["recipe"]))
def record_experiment(recipe: ExperimentRecipe, cells: list[Cell], run_ids: list[str]) -> dict[str, Any]:
    """Write `experiment_cells`: which evaluation run each grid cell produced."""
    out = experiment_dataset(recipe)
    if out.complete_or_invalidate():
        return {"path": str(out.path), **out.summary()}
    rows = [{"experiment": out.key, **asdict(c), "run_id": r} for c, r in zip(cells, run_ids, strict=True)]
    out.create({"stage": "experiment", "version": STAGE_VERSION, "recipe": recipe.model_dump(mode="json")})
    out.write_shard(0, pa.Table.from_pylist(rows))
    summary = {"experiment": out.key, "cells": len(rows), "tasks": list(recipe.tasks)}
    out.mark_complete(summary)
    return {"path": str(out.path), **summary}
