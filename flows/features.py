"""Flow `features`: task A of the paper, feature descriptions (paper §3).

activations   cache the target's residual stream at the chosen layers (the cache-activations stages)
ground truth  train an SAE per layer; exemplars; a label per feature; split train / test by feature
explainers    fine-tune each explainer (self: the target's own weights; other: another model via Π_ℓ)
              to describe a feature from its decoder direction written into a placeholder embedding;
              optionally the prompt omissions (retrained without the placeholder or the layer number)
evaluate      describe the held-out features and the ACT vectors with every method (trained,
              nearest neighbour, SelfIE, gold) and score each description with the simulator
catalog       refresh the SQL views (metrics, predictions, runs, features, exemplars, ...)
"""

from typing import Any

from prefect import flow

from tasks.common.activations import cache_residual_stream
from tasks.common.config import as_recipe
from tasks.common.corpus import tokenize_corpus
from tasks.common.orchestration import refresh_catalog_task
from tasks.features.config import FeaturesRecipe
from tasks.features.evaluate import evaluate_task, evaluation_run_id
from tasks.features.ground_truth import build_ground_truth_task, check_recipe, ground_truth_key
from tasks.features.train import train_explainer_task, variants


def features_ground_truth(recipe: FeaturesRecipe) -> dict[str, Any]:
    """Activations, then SAEs, exemplars, labels and the split; returns what the explainer stages need."""
    cache = recipe.cache_recipe()
    plan = check_recipe(recipe)
    tokens = tokenize_corpus(plan.home, plan.tokens_key, cache.model, cache.corpus, cache.cache.contexts_per_shard)
    activations = cache_residual_stream(cache, plan, wait_for=[tokens])
    gt_key = ground_truth_key(recipe, plan)
    truth = build_ground_truth_task(recipe, plan, gt_key, wait_for=[activations])
    return {"plan": plan, "gt_key": gt_key, "truth": truth}


def explain_features(recipe: FeaturesRecipe, gt: dict[str, Any]) -> dict[str, Any]:
    """Train each explainer, evaluate every method, refresh the SQL views."""
    plan, gt_key = gt["plan"], gt["gt_key"]
    checkpoints = {
        f"{role}/{variant}": train_explainer_task(recipe, plan, gt_key, role, variant, wait_for=[gt["truth"]])["path"]
        for role, variant in variants(recipe)
    }
    results = evaluate_task(recipe, plan, gt_key, checkpoints, evaluation_run_id(recipe, gt_key))
    refresh_catalog_task(plan.home, wait_for=[results])
    return {"ground_truth": gt["truth"], "explainers": checkpoints, "results": results}


@flow(name="features", log_prints=True, retries=0, validate_parameters=False)
def features(recipe: FeaturesRecipe) -> dict[str, Any]:
    """Feature descriptions end to end: ground truth, explainers, baselines, metrics."""
    recipe = as_recipe(FeaturesRecipe, recipe)  # the form's JSON, from a deployment
    return explain_features(recipe, features_ground_truth(recipe))
