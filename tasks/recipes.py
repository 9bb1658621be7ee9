"""Every flow's recipe type, by flow name: what the CLI (`selfexplain run|recipe <flow>`) and the deployments
validate a YAML recipe against."""

from tasks.ablation.config import AblationRecipe
from tasks.common.config import CacheRecipe, StrictModel
from tasks.experiment.config import ExperimentRecipe
from tasks.explainer.config import CalibrateRecipe, ExplainRecipe
from tasks.features.config import BootstrapRecipe, FeaturesRecipe
from tasks.patching.config import PatchingRecipe

RECIPES: dict[str, type[StrictModel]] = {
    "calibrate": CalibrateRecipe,
    "cache-activations": CacheRecipe,
    "features": FeaturesRecipe,
    "patching": PatchingRecipe,
    "ablation": AblationRecipe,
    "experiment": ExperimentRecipe,
    "explain": ExplainRecipe,
    "bootstrap": BootstrapRecipe,
}
