"""Flow `calibrate`: can the explainer read the target's residual at all, and through which injection?

activations  cache the target's residual stream at the chosen layers (the cache-activations stages)
explainers   per injection mode (input embedding, residual after block ℓ, early norm-matched addition):
             fine-tune the explainer to answer `the token "t"` for the residual of token t at layer ℓ
evaluate     name held-out tokens with v, with v = 0, with shuffled v, and untrained; exact match per layer
catalog      refresh the SQL views; a table artifact of exact match per mode and layer
"""

from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact

from tasks.common.activations import cache_residual_stream
from tasks.common.config import as_recipe
from tasks.common.corpus import tokenize_corpus
from tasks.common.orchestration import refresh_catalog_task
from tasks.explainer.calibrate import check_recipe, evaluate_task, run_id, summary_table, train_explainer_task
from tasks.explainer.config import CalibrateRecipe


@flow(name="calibrate", log_prints=True, retries=0, validate_parameters=False)
def calibrate(recipe: CalibrateRecipe) -> dict[str, Any]:
    """Token readout under every injection mode of `recipe.calibration.injections`, with its controls."""
    recipe = as_recipe(CalibrateRecipe, recipe)  # the form's JSON, from a deployment
    plan = check_recipe(recipe)
    cache = recipe.cache_recipe()
    tokens = tokenize_corpus(plan.home, plan.tokens_key, cache.model, cache.corpus, cache.cache.contexts_per_shard)
    activations = cache_residual_stream(cache, plan, wait_for=[tokens])
    results = {}
    for injection in recipe.calibration.injections:
        explainer = train_explainer_task(recipe, plan, injection, wait_for=[activations])
        rid = run_id(recipe, plan, injection)
        results[injection] = evaluate_task(recipe, plan, injection, explainer["path"], rid)
    refresh_catalog_task(plan.home, wait_for=list(results.values()))
    create_table_artifact(
        key="calibrate-exact-match",
        table=summary_table(plan.home, [r["run_id"] for r in results.values()]),
        description="Held-out token exact match x100 (± SE) per injection mode and layer, with its controls",
    )
    return {"activations": activations, "results": results}
