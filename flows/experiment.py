"""Flow `experiment`: the self-vs-other matrix and the data-efficiency curves (PAPER.md §3.6, Fig. 5, Tables 2, 5, 6).

ground truth  per task, built once (the task flows' own cached stages)
grid          per task x n_train x seed: train every explainer on the first n_train training examples
              (nested subsets), evaluate every method on the same held-out set; SelfIE / zero-shot once
record        table `experiment_cells` ties each cell to its evaluation run
report        plots (metric vs n_train, self vs other) and a markdown report beside the paper's numbers
"""

from typing import Any

from prefect import flow

from flows.features import explain_features, features_ground_truth
from flows.outcomes import explain_outcomes
from storage.store import store_root
from tasks.ablation import ablation_ground_truth
from tasks.config import ExperimentRecipe
from tasks.experiment import cell_recipe, expand, record_experiment
from tasks.orchestration import refresh_catalog_task
from tasks.patching import patching_ground_truth
from tasks.report import write_report_task

GROUND_TRUTH = {"features": features_ground_truth, "patching": patching_ground_truth, "ablation": ablation_ground_truth}


@flow(name="experiment", log_prints=True)
def experiment(recipe: ExperimentRecipe) -> dict[str, Any]:
    """Every task's ground truth once, then every grid cell, then the report."""
    cells = expand(recipe)
    truths = {task: GROUND_TRUTH[task](recipe.task_recipe(task)) for task in recipe.tasks}
    run_ids = []
    for cell in cells:
        r = cell_recipe(recipe, cell)
        explain = explain_features if cell.task == "features" else explain_outcomes
        run_ids.append(explain(r, truths[cell.task])["results"]["run_id"])
    record = record_experiment(recipe, cells, run_ids)
    refresh = refresh_catalog_task(str(store_root(recipe.home)), wait_for=[record])
    report = write_report_task(str(store_root(recipe.home)), record["experiment"], wait_for=[refresh])
    return {"experiment": record, "report": report}
