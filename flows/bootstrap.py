"""Flow `bootstrap`: a trained explainer describes what the expensive procedure left unlabelled; a sample
of its descriptions is checked against the same procedure, and both routes' cost is measured.

check     find the checkpoint, its ground truth and activation cache in the store
describe  every SAE feature without a label (and the held-out ones with `held_out`)  -> `feature_labels`
score     a seeded sample: the explainer's labels beside auto-interp's, by the simulator, with each route's
          seconds per feature                                                       -> `metrics`, `predictions`
catalog   refresh the DuckDB views; a markdown artifact sums it up
"""

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from storage.catalog import connect_read_only
from storage.store import store_root
from tasks.common.config import as_recipe
from tasks.common.orchestration import refresh_catalog_task
from tasks.features.bootstrap import check_recipe, describe_task, run_id, score_task
from tasks.features.config import BootstrapRecipe


@flow(name="bootstrap", log_prints=True, retries=0, validate_parameters=False)
def bootstrap(recipe: BootstrapRecipe) -> dict[str, Any]:
    """Describe every unlabelled SAE feature with a trained explainer; score a sample beside auto-interp."""
    recipe = as_recipe(BootstrapRecipe, recipe)  # the form's JSON, from a deployment
    ck = check_recipe(recipe)  # first: bad input fails the run in one line, before anything is written
    rid = run_id(recipe, ck)
    described = describe_task(recipe, ck)
    scored = score_task(recipe, ck, rid, wait_for=[described])
    home = store_root(recipe.home)
    refresh_catalog_task(str(home), wait_for=[scored])
    create_markdown_artifact(key="bootstrap-summary", markdown=summary_markdown(home, rid),
                             description=f"bootstrap run {rid}")  # fmt: skip
    return {"run_id": rid, "described": described, "scored": scored}


def summary_markdown(home: Path, rid: str) -> str:
    """Coverage, the sampled quality of both routes (paired gain) and their cost, from the catalog."""
    with connect_read_only(home) as con:
        rows = con.execute("select split, method, metric, value, se, n from metrics where run_id = ? order by all",
                           [rid]).fetchall()  # fmt: skip
        gain = con.execute("select gain, se, n from paired_gains where run_id = ? and rival_method = 'auto_interp'",
                           [rid]).fetchone()  # fmt: skip
    lines = [f"# Bootstrap {rid}", "", "| split | method | metric | value | se | n |", "|---|---|---|---|---|---|"]
    lines += [f"| {s} | {m} | {k} | {v:.4g} | {e:.2g} | {n} |" for s, m, k, v, e, n in rows]
    if gain:
        lines += ["", f"Explainer minus auto-interp, paired over {gain[2]} sampled features: "
                  f"{100 * gain[0]:+.1f} ± {100 * gain[1]:.1f} (simulator correlation x100)."]  # fmt: skip
    return "\n".join(lines)
