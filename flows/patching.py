"""Flow `patching`: task B, activation patching (paper §4).

pairs     counterfactual pairs (x, x') from the fact base: same relation, other subject and object
sweep     for every layer chunk and aligned position, replace the residual at t in every chunk layer by
          the chunk-mean of h(x') at t'; record the greedy next token beside the clean one
balance   cap (token type x chunk x changed) cells, then even out changed / unchanged
          (or: import a public act_patch dataset instead of the three steps above)
train     each explainer learns "would the output change, and to what?" with v as a continuous token;
          the '- activation' explainer learns the same without v
evaluate  trained, zero-vector, no-activation, untrained zero-shot and majority answers on the test rows
catalog   refresh the SQL views (`patching_gt`, `patching_sweep`, `metrics`, `predictions`)
"""

from typing import Any

from prefect import flow

from flows.outcomes import explain_outcomes
from tasks.common.config import as_recipe
from tasks.outcomes.registry import check_recipe
from tasks.patching.config import PatchingRecipe
from tasks.patching.ground_truth import patching_ground_truth


@flow(name="patching", log_prints=True, retries=0, validate_parameters=False)
def patching(recipe: PatchingRecipe) -> dict[str, Any]:
    """Activation patching end to end: ground truth, explainers, baselines, metrics."""
    recipe = as_recipe(PatchingRecipe, recipe)  # the form's JSON, from a deployment
    check_recipe(recipe)  # first: bad input fails the run in one line, before anything is written
    truth = patching_ground_truth(recipe)
    return explain_outcomes(recipe, truth)
