"""Flow `explain`: ask a trained features explainer about a text, an SAE feature or a vector.

check     find the checkpoint; check the layer, the position, the feature or the vector against it
explain   the target runs on the text (for a text), the explainer describes what it is handed
artifact  the explanations as a table artifact of the run (the UI's Artifacts tab); nothing is written
"""

from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact

from tasks.common.config import as_recipe
from tasks.explainer.config import ExplainRecipe
from tasks.explainer.explain import check_recipe, explain_task


@flow(name="explain", log_prints=True, retries=0, validate_parameters=False)
def explain(recipe: ExplainRecipe) -> dict[str, Any]:
    """Explain a text's residual, an SAE feature or a vector with a trained explainer."""
    recipe = as_recipe(ExplainRecipe, recipe)  # the form's JSON, from a deployment
    ck = check_recipe(recipe)  # first: bad input fails the run in one line, before a model loads
    rows = explain_task(recipe)
    asked = recipe.text if recipe.text is not None else recipe.feature or recipe.vector
    create_table_artifact(table=rows, key="explanations",
                          description=f"explainer {ck.key or ck.path} on {asked!r}")  # fmt: skip
    return {"explainer": ck.key or str(ck.path), "rows": rows}
