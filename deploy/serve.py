"""Deployments of every flow, and `selfexplain serve`: one process serving them all on a single machine.

Each flow takes one parameter, `recipe`, a pydantic model: the Prefect UI renders it as a form with every
field's description, and the server refuses invalid values (enforce_parameter_schema) naming the field.
The defaults bound to each deployment are the repository's SmolLM2 recipes. The nightly data-efficiency
sweep runs the full experiment recipe on a cron schedule with a deployment concurrency limit of 1: a second
trigger waits until the running one ends. Every model-holding task also takes a slot of the global
concurrency limit `gpu` (created here with `gpu_slots` slots), so runs of different deployments never share
an accelerator.
"""

from pathlib import Path
from typing import Any

from flows import FLOWS
from tasks.common.config import load_recipe
from tasks.common.orchestration import ensure_gpu_limit
from tasks.recipes import RECIPES

RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes"
RECIPE_FILES = {
    "cache-activations": "cache_smollm2.yaml",
    "calibrate": "calibrate_smollm2.yaml",
    "features": "features_smollm2.yaml",
    "patching": "patching_smollm2.yaml",
    "ablation": "ablation_smollm2.yaml",
    "experiment": "demo_smollm2.yaml",
    "explain": "explain_smollm2.yaml",
    "bootstrap": "bootstrap_smollm2.yaml",
}
NIGHTLY = "nightly-data-efficiency"
NIGHTLY_CRON = "0 2 * * *"  # 02:00 UTC
NIGHTLY_RECIPE = "experiment_smollm2.yaml"


def default_parameters(flow: str, recipe_file: str, home: str | None) -> dict[str, Any]:
    """{'recipe': ...} from a repository recipe, with the store root set when given."""
    recipe = load_recipe(RECIPES[flow], RECIPE_DIR / recipe_file)
    if home is not None:
        recipe = recipe.model_copy(update={"home": home})
    return {"recipe": recipe.model_dump(mode="json")}


def deployments(home: str | None = None) -> list:
    """A deployment per flow (named like the flow) plus the nightly sweep."""
    out = [
        FLOWS[name].to_deployment(
            name=name,
            parameters=default_parameters(name, recipe_file, home),
            enforce_parameter_schema=True,
            description=(FLOWS[name].description or "").splitlines()[0],
            tags=["selfexplain"],
        )
        for name, recipe_file in RECIPE_FILES.items()
    ]
    out.append(
        FLOWS["experiment"].to_deployment(
            name=NIGHTLY,
            cron=NIGHTLY_CRON,
            parameters=default_parameters("experiment", NIGHTLY_RECIPE, home),
            concurrency_limit=1,
            enforce_parameter_schema=True,
            description="Nightly data-efficiency sweep: the full experiment grid (self vs other, n_train curves).",
            tags=["selfexplain", "nightly"],
        )
    )
    return out


def serve(home: str | None = None, gpu_slots: int = 1) -> None:
    """Create the `gpu` limit, then serve every deployment from this process until interrupted."""
    from prefect import serve as prefect_serve

    ensure_gpu_limit(gpu_slots)
    prefect_serve(*deployments(home))
