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

from flows.outcomes import run_outcome_flow
from tasks.patching.config import PatchingRecipe
from tasks.patching.ground_truth import patching_ground_truth


@flow(name="patching", log_prints=True, retries=0, validate_parameters=False)
def patching(recipe: PatchingRecipe) -> dict[str, Any]:
    """Activation patching end to end: ground truth, explainers, baselines, metrics."""
    return run_outcome_flow(PatchingRecipe, recipe, patching_ground_truth)
