"""The second half of the patching and ablation flows: train explainers of outcomes, score every method."""

from typing import Any

from storage.store import store_root
from tasks.common.orchestration import refresh_catalog_task
from tasks.outcomes.evaluate import evaluate_outcomes_task, evaluation_run_id
from tasks.outcomes.registry import OutcomeRecipe, task_of
from tasks.outcomes.train import train_outcome_explainer_task


def explain_outcomes(recipe: OutcomeRecipe, truth: Any) -> dict[str, Any]:
    """Train each (role, variant) explainer once the ground truth exists, evaluate them all, refresh SQL."""
    checkpoints = {
        f"{role}/{variant}": train_outcome_explainer_task(recipe, role, variant, wait_for=[truth])["path"]
        for role, variant in task_of(recipe).variants(recipe)
    }
    results = evaluate_outcomes_task(recipe, checkpoints, evaluation_run_id(recipe))
    refresh_catalog_task(str(store_root(recipe.home)), wait_for=[results])
    return {"ground_truth": truth, "explainers": checkpoints, "results": results}
