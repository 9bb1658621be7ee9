"""Flow `experiment`: the self-vs-other matrix and the data-efficiency curves (paper §3.6, Fig. 5, Tables 2, 5, 6).

ground truth  per task, built once (the task flows' own cached stages)
grid          per task x n_train x seed: train every explainer on the first n_train training examples
              (nested subsets), evaluate every method on the same held-out set; SelfIE / zero-shot once.
              Cells run in turn, or fan out as tasks on Dask workers (recipe.runner)
record        table `experiment_cells` ties each cell to its evaluation run
report        plots (metric vs n_train, self vs other) and a markdown report beside the paper's numbers
"""

from typing import Any

from prefect import flow, task

from flows.features import explain_features, features_ground_truth
from flows.outcomes import explain_outcomes
from storage.store import store_root
from tasks.ablation.ground_truth import ablation_ground_truth
from tasks.common.config import as_recipe
from tasks.common.orchestration import refresh_catalog_task
from tasks.experiment.config import ExperimentRecipe, RunnerConfig
from tasks.experiment.grid import Cell, cell_recipe, check_recipe, expand, record_experiment
from tasks.experiment.report import write_report_task
from tasks.patching.ground_truth import patching_ground_truth

GROUND_TRUTH = {"features": features_ground_truth, "patching": patching_ground_truth, "ablation": ablation_ground_truth}


def run_cell(recipe: ExperimentRecipe, cell: Cell, truth: dict[str, Any]) -> str:
    """One grid cell: train the task's explainers on the first n_train examples, evaluate; its run id."""
    explain = explain_features if cell.task == "features" else explain_outcomes
    return explain(cell_recipe(recipe, cell), truth)["results"]["run_id"]


@flow(name="experiment-grid", retries=0)
def fan_out(recipe: ExperimentRecipe, cells: list[Cell], truths: dict[str, dict[str, Any]]) -> list[str]:
    """Every cell as a task of this subflow's task runner (Dask workers), all submitted at once."""
    cell_task = task(run_cell, name="experiment-cell")
    futures = [cell_task.submit(recipe, c, truths[c.task]) for c in cells]
    return [f.result() for f in futures]


def dask_runner(cfg: RunnerConfig) -> Any:
    """prefect-dask's task runner: an existing cluster at cfg.address, else a local one (processes)."""
    from prefect_dask import DaskTaskRunner

    if cfg.address:
        return DaskTaskRunner(address=cfg.address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": cfg.n_workers, "threads_per_worker": 1, "processes": True})


@flow(name="experiment", log_prints=True, retries=0, validate_parameters=False)
def experiment(recipe: ExperimentRecipe) -> dict[str, Any]:
    """Every task's ground truth once, then every grid cell, then the report."""
    recipe = as_recipe(ExperimentRecipe, recipe)  # the form's JSON, from a deployment
    check_recipe(recipe)  # first: bad input fails the run in one line, before anything is written
    cells = expand(recipe)
    truths = {name: GROUND_TRUTH[name](recipe.task_recipe(name)) for name in recipe.tasks}
    if recipe.runner.kind == "dask":
        run_ids = fan_out.with_options(task_runner=dask_runner(recipe.runner))(recipe, cells, truths)
    else:
        run_ids = [run_cell(recipe, cell, truths[cell.task]) for cell in cells]
    record = record_experiment(recipe, cells, run_ids)
    refresh = refresh_catalog_task(str(store_root(recipe.home)), wait_for=[record])
    report = write_report_task(str(store_root(recipe.home)), record["experiment"], wait_for=[refresh])
    return {"experiment": record, "report": report}
