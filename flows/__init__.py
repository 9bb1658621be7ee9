"""Prefect flows, one per pipeline: thin, they read like the paper's method section."""

from flows.ablation import ablation
from flows.cache_activations import cache_activations
from flows.features import features
from flows.patching import patching
from tasks import models
from tasks.activations import plan_cache
from tasks.features import check_recipe

FLOWS = {"cache-activations": cache_activations, "features": features, "patching": patching, "ablation": ablation}
# Checks run before a flow starts, so bad input is one line (and nothing is written), not a failed run.
VALIDATORS = {
    "cache-activations": plan_cache,
    "features": check_recipe,
    "patching": lambda r: models.resolve(r.target),
    "ablation": lambda r: models.resolve(r.target),
}
