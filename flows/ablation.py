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

from flows.outcomes import explain_outcomes
from tasks.ablation.config import AblationRecipe
from tasks.ablation.ground_truth import ablation_ground_truth
from tasks.common.config import as_recipe
from tasks.outcomes.registry import check_recipe


@flow(name="ablation", log_prints=True, retries=0, validate_parameters=False)
def ablation(recipe: AblationRecipe) -> dict[str, Any]:
    """Input ablation end to end: ground truth, explainers, baselines, metrics."""
    recipe = as_recipe(AblationRecipe, recipe)  # the form's JSON, from a deployment
    check_recipe(recipe)  # first: bad input fails the run in one line, before anything is written
    truth = ablation_ground_truth(recipe)
    return explain_outcomes(recipe, truth)
