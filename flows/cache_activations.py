"""Flow `cache-activations`: read a corpus with the target model and keep its residual stream as Parquet.

plan      validate the recipe against the model and corpus; name the output datasets by config hash
tokens    tokenise the corpus into fixed-length contexts            -> table `tokens`
cache     run the target, keep the residual stream at chosen layers  -> table `activations`
catalog   refresh the DuckDB views so both are queryable with SQL
"""

from typing import Any

from prefect import flow

from tasks.common.activations import cache_residual_stream, plan_cache
from tasks.common.config import CacheRecipe, as_recipe
from tasks.common.corpus import tokenize_corpus
from tasks.common.orchestration import refresh_catalog_task


@flow(name="cache-activations", log_prints=True, retries=0, validate_parameters=False)
def cache_activations(recipe: CacheRecipe) -> dict[str, Any]:
    """Cache the residual stream of `recipe.model` over `recipe.corpus` at `recipe.cache.layers`."""
    recipe = as_recipe(CacheRecipe, recipe)  # the form's JSON, from a deployment
    plan = plan_cache(recipe)
    tokens = tokenize_corpus(
        home=plan.home,
        key=plan.tokens_key,
        model=recipe.model,
        corpus=recipe.corpus,
        contexts_per_shard=recipe.cache.contexts_per_shard,
    )
    activations = cache_residual_stream(recipe, plan, wait_for=[tokens])
    catalog = refresh_catalog_task(plan.home, wait_for=[activations])
    return {"tokens": tokens, "activations": activations, "catalog": catalog}
