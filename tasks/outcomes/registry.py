"""Which outcome task a recipe runs, and the checks of an outcome recipe before anything runs.

The one place that maps a recipe type to its task (tasks/outcomes/protocol.py); everything downstream asks the
task, never the recipe's type.
"""

from typing import Any

from storage.errors import UserInputError
from storage.store import check_store
from tasks.ablation.config import AblationRecipe
from tasks.ablation.task import ABLATION
from tasks.common import models
from tasks.common.importers import check_import
from tasks.explainer import model as ex
from tasks.explainer.config import check_roles
from tasks.outcomes.protocol import OutcomeTask
from tasks.patching.config import PatchingRecipe
from tasks.patching.task import PATCHING

OutcomeRecipe = PatchingRecipe | AblationRecipe
TASKS: dict[type, OutcomeTask] = {PatchingRecipe: PATCHING, AblationRecipe: ABLATION}


def task_of(recipe: OutcomeRecipe) -> OutcomeTask:
    return TASKS[type(recipe)]


def check_recipe(recipe: OutcomeRecipe) -> None:
    """Validate before anything runs (nothing is written, no weights are loaded): the store, the ground-truth
    source (the files to import, or the target and the fact or question file, unless the ground truth is
    already built), every explainer's model, the role lists."""
    check_store(recipe.home)
    task = task_of(recipe)
    cfg, gt = task.settings(recipe), task.ground_truth(recipe)
    imported: list[dict[str, Any]] = []
    if check_import(cfg.import_train, cfg.import_test, task.name):
        for name in ("import_train", "import_test"):
            try:
                imported += task.import_rows(getattr(cfg, name), "train")
            except UserInputError as err:
                raise UserInputError(f"{task.name}.{name}", err.problem, err.fix) from None
    else:
        models.resolve(recipe.target)
        if not gt.intact():
            task.check_source(recipe)
    sites = task.vector_sites(recipe, imported)  # where vectors enter (the same for every role)
    for role, explainer in recipe.explainers.items():
        try:
            models.resolve(explainer.model)
        except UserInputError as err:
            raise UserInputError(f"explainers.{role}.model.name", err.problem, err.fix) from None
        if explainer.projection == "fitted" and not task.carries_vector:
            raise UserInputError(f"explainers.{role}.projection", f"'fitted' maps a vector, and {task.name} "
                                 "questions carry none", "use projection 'auto'")  # fmt: skip
        if explainer.readout_steps:
            raise UserInputError(f"explainers.{role}.readout_steps", "the readout warm-up names tokens at the "
                                 f"features task's cached residuals, which {task.name} has none of", "set it to 0")  # fmt: skip
        if explainer.vector_norm == "layer_mean" and not task.carries_vector:
            raise UserInputError(f"explainers.{role}.vector_norm", f"'layer_mean' writes a vector, and {task.name} "
                                 "questions carry none", "use 'match'")  # fmt: skip
        if sites is not None:
            ex.check_injection(explainer, *sites, f"explainers.{role}")
    if recipe.eval.n_train is not None and gt.intact():  # known only once the ground truth exists
        n = sum(s == "train" for t in gt.iter_shards(columns=["split"]) for s in t.column("split").to_pylist())
        if recipe.eval.n_train > n:
            raise UserInputError("eval.n_train", f"{recipe.eval.n_train} exceeds the {n} training rows of {gt.table}",
                                 f"use at most {n}, or build more ground truth")  # fmt: skip
    check_roles(recipe.eval, recipe.explainers)
    if not task.carries_vector:
        for field in ("prompt_omissions", "rotated_basis_roles"):
            if getattr(recipe.eval, field):
                raise UserInputError(f"eval.{field}", f"{task.name} questions carry no vector, layer or token",
                                     "set it to []")  # fmt: skip
