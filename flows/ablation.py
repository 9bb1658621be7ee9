"""Flow `ablation`: task C, input ablation (paper §5).

ask       every question with the paper's system prompt, with and without a hint naming a random letter
label     changed = the two greedy letters differ; the content is the no-hint letter
          (or: import a public input_ablation dataset instead)
train     each explainer reads the hinted prompt and learns whether removing the hint changes the answer
evaluate  trained, untrained zero-shot, majority and position-bias answers on the test questions
catalog   refresh the SQL views (`ablation_gt`, `metrics`, `predictions`)
"""

from typing import Any

from prefect import flow

from flows.outcomes import run_outcome_flow
from tasks.ablation.config import AblationRecipe
from tasks.ablation.ground_truth import ablation_ground_truth


@flow(name="ablation", log_prints=True, retries=0, validate_parameters=False)
def ablation(recipe: AblationRecipe) -> dict[str, Any]:
    """Input ablation end to end: ground truth, explainers, baselines, metrics."""
    return run_outcome_flow(AblationRecipe, recipe, ablation_ground_truth)
