"""Prefect flows, one per pipeline: thin, they read like the paper's method section.

Each flow first validates its recipe itself (tasks.common.config.as_recipe, with Prefect's parameter validation off,
so a cross-field mistake reads as the CLI's line, not as Prefect's multi-line report), then runs its recipe's
check (VALIDATORS below: the same ones the CLI runs before it starts a flow), so a run started from a
deployment (the UI, the API, a schedule) refuses bad input before anything is written, with the one-line
UserInputError as its failure message. No flow is retried as a whole (retries=0, whatever
PREFECT_FLOW_DEFAULT_RETRIES says): bad input would fail again, and transient failures are retried by the
tasks that meet them (tasks.common.orchestration.retry_transient).
"""

from flows.ablation import ablation
from flows.bootstrap import bootstrap
from flows.cache_activations import cache_activations
from flows.calibrate import calibrate
from flows.experiment import experiment
from flows.explain import explain
from flows.features import features
from flows.patching import patching
from tasks.common.activations import plan_cache
from tasks.experiment.grid import check_recipe as check_experiment_recipe
from tasks.explainer.calibrate import check_recipe as check_calibrate_recipe
from tasks.explainer.explain import check_recipe as check_explain_recipe
from tasks.features.bootstrap import check_recipe as check_bootstrap_recipe
from tasks.features.ground_truth import check_recipe
from tasks.outcomes.registry import check_recipe as check_outcome_recipe

FLOWS = {"cache-activations": cache_activations, "calibrate": calibrate, "features": features, "patching": patching,
         "ablation": ablation, "experiment": experiment, "explain": explain, "bootstrap": bootstrap}  # fmt: skip
# Checks run before a flow starts, so bad input is one line (and nothing is written), not a failed run.
VALIDATORS = {
    "cache-activations": plan_cache,
    "calibrate": check_calibrate_recipe,
    "features": check_recipe,
    "patching": check_outcome_recipe,
    "ablation": check_outcome_recipe,
    "experiment": check_experiment_recipe,
    "explain": check_explain_recipe,
    "bootstrap": check_bootstrap_recipe,
}
