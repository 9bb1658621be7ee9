"""Flow `ablation`: task C ground truth (PAPER.md §5).

ask       every question with the paper's system prompt, with and without a hint naming a random letter
label     changed = the two greedy letters differ; the content is the no-hint letter
catalog   refresh the SQL views (`ablation_gt`)
"""

from typing import Any

from prefect import flow

from storage.store import store_root
from tasks.ablation import ablation_ground_truth
from tasks.config import AblationRecipe
from tasks.orchestration import refresh_catalog_task


@flow(name="ablation", log_prints=True)
def ablation(recipe: AblationRecipe) -> dict[str, Any]:
    """Hint-ablation ground truth of the target."""
    truth = ablation_ground_truth(recipe)
    refresh_catalog_task(str(store_root(recipe.home)), wait_for=[truth])
    return {"ground_truth": truth}
