"""Prefect flows, one per pipeline: thin, they read like the paper's method section."""

from flows.ablation import ablation
from flows.cache_activations import cache_activations
from flows.calibrate import calibrate
from flows.experiment import experiment
from flows.features import features
from flows.patching import patching
from tasks.activations import plan_cache
from tasks.calibrate import check_recipe as check_calibrate_recipe
from tasks.experiment import check_recipe as check_experiment_recipe
from tasks.explain_outcomes import check_recipe as check_outcome_recipe
from tasks.features import check_recipe

FLOWS = {"cache-activations": cache_activations, "calibrate": calibrate, "features": features, "patching": patching,
         "ablation": ablation, "experiment": experiment}  # fmt: skip
# Checks run before a flow starts, so bad input is one line (and nothing is written), not a failed run.
VALIDATORS = {
    "cache-activations": plan_cache,
    "calibrate": check_calibrate_recipe,
    "features": check_recipe,
    "patching": check_outcome_recipe,
    "ablation": check_outcome_recipe,
    "experiment": check_experiment_recipe,
}
