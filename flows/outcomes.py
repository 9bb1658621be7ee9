"""What the patching and ablation flows share: their body, and its second half (train explainers of outcomes,
score every method), which the experiment flow runs too."""

from collections.abc import Callable
from typing import Any, TypeVar

from storage.store import store_root
from tasks.common.config import as_recipe
from tasks.common.orchestration import refresh_catalog_task
from tasks.outcomes.evaluate import evaluate_outcomes_task, evaluation_run_id
from tasks.outcomes.registry import OutcomeRecipe, check_recipe, task_of
from tasks.outcomes.train import train_outcome_explainer_task

R = TypeVar("R", bound=OutcomeRecipe)


def run_outcome_flow(kind: type[R], recipe: R | dict[str, Any], ground_truth: Callable[[R], Any]) -> dict[str, Any]:
    """A patching or ablation flow end to end: the recipe checked, its ground truth, explainers and metrics."""
    checked = as_recipe(kind, recipe)  # the form's JSON, from a deployment
    check_recipe(checked)  # first: bad input fails the run in one line, before anything is written
    return explain_outcomes(checked, ground_truth(checked))


def explain_outcomes(recipe: OutcomeRecipe, truth: Any) -> dict[str, Any]:
    """Train each (role, variant) explainer once the ground truth exists, evaluate them all, refresh SQL."""
    checkpoints = {
        f"{role}/{variant}": train_outcome_explainer_task(recipe, role, variant, wait_for=[truth])["path"]
        for role, variant in task_of(recipe).variants(recipe)
    }
    results = evaluate_outcomes_task(recipe, checkpoints, evaluation_run_id(recipe))
    refresh_catalog_task(str(store_root(recipe.home)), wait_for=[results])
    return {"ground_truth": truth, "explainers": checkpoints, "results": results}
