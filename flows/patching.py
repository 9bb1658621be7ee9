"""Flow `patching`: task B ground truth (PAPER.md §4).

pairs     counterfactual pairs (x, x') from the fact base: same relation, other subject and object
sweep     for every layer chunk and aligned position, replace the residual at t in every chunk layer by
          the chunk-mean of h(x') at t'; record the greedy next token beside the clean one
balance   cap (token type x chunk x changed) cells, then even out changed / unchanged
catalog   refresh the SQL views (`patching_gt`, `patching_sweep`)
"""

from typing import Any

from prefect import flow

from storage.store import store_root
from tasks.config import PatchingRecipe
from tasks.orchestration import refresh_catalog_task
from tasks.patching import patching_ground_truth


@flow(name="patching", log_prints=True)
def patching(recipe: PatchingRecipe) -> dict[str, Any]:
    """Activation-patching ground truth of the target."""
    truth = patching_ground_truth(recipe)
    refresh_catalog_task(str(store_root(recipe.home)), wait_for=[truth])
    return {"ground_truth": truth}
