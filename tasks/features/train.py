"""Task A, feature descriptions: training an explainer on the ground truth's training features (nested subsets
by n_train, one per grid seed), to a checkpoint in dataset `explainers`."""

from pathlib import Path
from typing import Any

import numpy as np

from storage.errors import UserInputError
from storage.hashing import config_hash
from storage.store import Dataset
from tasks.common import models
from tasks.common.activations import CachePlan, activations_dataset
from tasks.common.corpus import ContextTexts
from tasks.common.orchestration import progress_reporter, stage_task
from tasks.explainer import model as ex
from tasks.explainer.projection import fit_projection, residual_stats
from tasks.explainer.train import train_to_checkpoint
from tasks.features.config import FeaturesRecipe
from tasks.features.ground_truth import STAGE_VERSION, FeatureSet, load_feature_set
from tasks.features.prompts import feature_queries
from tasks.features.sae import layer_activations


def grid_seed(recipe: FeaturesRecipe) -> int:
    """The seed of this run's explainers (the experiment grid's seed; the self explainer's when they differ):
    nearest neighbour draws the same training subset, and every metrics row carries it."""
    return recipe.explainers.get("self", next(iter(recipe.explainers.values()))).seed


def training_subset(fs: FeatureSet, n_train: int | None, seed: int) -> FeatureSet:
    train = fs.take(fs.split == "train")
    if n_train is not None and n_train > len(train.layer):
        raise UserInputError("eval.n_train", f"{n_train} exceeds the {len(train.layer)} labelled training features",
                             f"use at most {len(train.layer)}, or cache more tokens / label more features")  # fmt: skip
    if n_train is None or n_train == len(train.layer):
        return train
    keep = np.zeros(len(train.layer), dtype=bool)
    keep[np.random.default_rng(seed).permutation(len(train.layer))[:n_train]] = True
    return train.take(keep)


def explainer_names(recipe: FeaturesRecipe) -> list[str]:
    """Every explainer the recipe trains: each role, then `<role>/<ablation>` per prompt ablation, then
    `<role>/rotated_basis` per rotated-basis role."""
    ev = recipe.eval
    return [*recipe.explainers, *(f"{r}/{a}" for r in ev.ablation_roles for a in ev.prompt_ablations),
            *(f"{r}/{ex.ROTATED}" for r in ev.rotated_basis_roles)]  # fmt: skip


def explainer_key(recipe: FeaturesRecipe, gt_key: str, name: str) -> str:
    """Key of explainer `name` (see explainer_names): its ground truth, config, prompt mode and n_train."""
    cfg = recipe.explainers[name.split("/")[0]]
    return config_hash(
        "explainer", STAGE_VERSION, {"gt": gt_key, "role": name, "cfg": cfg, "n_train": recipe.eval.n_train}
    )


def explainer_dataset(recipe: FeaturesRecipe, plan: CachePlan, gt_key: str, name: str) -> Dataset:
    return Dataset(Path(plan.home), "explainers", explainer_key(recipe, gt_key, name))


def train_explainer(recipe: FeaturesRecipe, plan: CachePlan, gt_key: str, name: str, progress=None) -> dict[str, Any]:
    """Train explainer `name` (see explainer_names) on the train features; checkpoint under
    tables/explainers/<key>. A '- activation' explainer is text-only: its queries carry no vector; a
    rotated-basis explainer reads Qv through the trained prompts."""
    role, _, mode = name.partition("/")
    cfg = recipe.explainers[role]
    out = explainer_dataset(recipe, plan, gt_key, name)
    if out.is_complete():
        return {"path": str(out.path), **out.summary()}
    fs = training_subset(load_feature_set(Path(plan.home), gt_key), recipe.eval.n_train, cfg.seed)
    target = models.load_config(recipe.target)

    def cached() -> dict[int, dict[str, np.ndarray]]:
        return {layer: layer_activations(activations_dataset(plan), layer) for layer in recipe.cache.layers}

    # SAE decoder rows are directions (differences of residuals): nothing to centre (residual_inputs False)
    summary = train_to_checkpoint(
        out, cfg, None if mode == "no_activation" else target.hidden_size, target.num_hidden_layers,
        lambda e: feature_queries(fs.direction, fs.layer, fs.label, fs.ids(), e.chat, cfg.seed, mode or "trained"),
        {"role": name, "gt": gt_key, "task": "features", "target": recipe.target.model_dump(),
         "layers": recipe.cache.layers, "plan": plan.model_dump(exclude={"home"})}, progress,
        ex.rotation_seed(cfg, mode),
        lambda e: fit_projection(e, cached(), ContextTexts(Path(plan.home), plan.tokens_key), cfg.fit_ridge,
                                 cfg.fit_rows, residual_inputs=False, seed=cfg.seed),
        lambda: residual_stats(cached(), residual_inputs=False),
    )  # fmt: skip
    return {"path": str(out.path), **summary}


@stage_task(
    "train-explainer",
    gpu=True,
    output=lambda p: explainer_dataset(p["recipe"], p["plan"], p["gt_key"], p["name"]),
)
def train_explainer_task(recipe: FeaturesRecipe, plan: CachePlan, gt_key: str, name: str) -> dict[str, Any]:
    """Fine-tune one explainer (a role, or a role's prompt ablation) on the training features."""
    progress = progress_reporter(
        f"train-explainer-{name.replace('/', '-').replace('_', '-')}", f"training the {name} explainer"
    )
    return train_explainer(recipe, plan, gt_key, name, progress)
