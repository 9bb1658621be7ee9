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
from tasks.common.orchestration import complete_or, progress_reporter, stage_task
from tasks.explainer import model as ex
from tasks.explainer.calibrate import token_strings
from tasks.explainer.projection import fit_projection, residual_stats
from tasks.explainer.train import train_to_checkpoint
from tasks.features.config import FeaturesRecipe
from tasks.features.ground_truth import STAGE_VERSION, FeatureSet, load_feature_set
from tasks.features.labels import format_tokens_label
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


READOUT_MAX_CHARS = 24  # the longest token text the readout warm-up names (calibrate's default)


def readout_set(
    layers: dict[int, dict[str, np.ndarray]], names: dict[int, str], n: int, seed: int
) -> tuple[np.ndarray, list[int], list[str]]:
    """The readout warm-up's n pseudo-features, label-free: v = h_ℓ(t) − μ_ℓ, the centred cached residual of a
    token t at layer ℓ, labelled `the token "t"` as the tokens labeler writes a one-token label. Layers take
    turns; each item draws a token type uniformly among those `names` can spell (so frequent tokens do not fill
    the set) and one of its occurrences. Returns (vectors [n, d], layers [n], labels)."""
    rng = np.random.default_rng([seed, 7])
    by_layer = []
    for layer, data in sorted(layers.items()):
        ids = data["token_id"]
        types = np.array(sorted(set(np.unique(ids).tolist()) & set(names)))
        by_layer.append((layer, data["activation"], ids, types, data["activation"].astype(np.float32).mean(axis=0)))
    vectors, out_layers, labels = [], [], []
    for k in range(n):
        layer, h, ids, types, mu = by_layer[k % len(by_layer)]
        t = int(rng.choice(types))
        row = int(rng.choice(np.flatnonzero(ids == t)))
        vectors.append(h[row].astype(np.float32) - mu)
        out_layers.append(layer)
        labels.append(format_tokens_label([names[t]]))
    return np.stack(vectors), out_layers, labels


def variants(recipe: FeaturesRecipe) -> list[tuple[str, str]]:
    """(role, variant) of every explainer the flow trains, as the outcome tasks name them: each role, then each
    prompt omission of `omission_roles`, then the rotated basis of `rotated_basis_roles`."""
    ev = recipe.eval
    return [*((r, "trained") for r in recipe.explainers), *((r, a) for r in ev.omission_roles for a in ev.prompt_omissions),
            *((r, ex.ROTATED) for r in ev.rotated_basis_roles)]  # fmt: skip


def hashed_name(role: str, variant: str) -> str:
    """How a features explainer's key has always spelled it (`self`, `self/no_layer`), so stored checkpoints keep
    their keys."""
    return role if variant == "trained" else f"{role}/{variant}"


def explainer_key(recipe: FeaturesRecipe, gt_key: str, role: str, variant: str) -> str:
    """Key of an explainer: its ground truth, config, variant and n_train. A '- activation' explainer never warms
    up (it has no vector to read), so its key leaves readout_steps out: changing the warm-up does not retrain it."""
    cfg = recipe.explainers[role]
    if variant == "no_activation":
        cfg = cfg.model_copy(update={"readout_steps": type(cfg).model_fields["readout_steps"].default})
    return config_hash("explainer", STAGE_VERSION, {"gt": gt_key, "role": hashed_name(role, variant),
                                                    "cfg": cfg, "n_train": recipe.eval.n_train})  # fmt: skip


def explainer_dataset(recipe: FeaturesRecipe, plan: CachePlan, gt_key: str, role: str, variant: str) -> Dataset:
    return Dataset(Path(plan.home), "explainers", explainer_key(recipe, gt_key, role, variant))


# What the readout warm-up never reads: the run after it (its budget, validation and decoding)
AFTER_WARM_UP = {"epochs", "min_steps", "max_steps", "eval_every", "patience", "val_fraction", "max_new_tokens",
                 "eval_batch_size"}  # fmt: skip


def readout_dataset(recipe: FeaturesRecipe, plan: CachePlan, role: str, variant: str) -> Dataset:
    """Where a role's warm-up weights are kept: keyed by the cache and what the warm-up reads of the config, not
    by n_train or the ground truth (it reads no label), so every cell of a grid shares one."""
    cfg = recipe.explainers[role].model_dump(exclude=AFTER_WARM_UP)
    key = config_hash("readout", STAGE_VERSION, {"activations": plan.activations_key, "target": recipe.target,
                                                 "variant": variant, "cfg": cfg})  # fmt: skip
    return Dataset(Path(plan.home), "readouts", key)


def train_explainer(
    recipe: FeaturesRecipe, plan: CachePlan, gt_key: str, role: str, variant: str, progress=None
) -> dict[str, Any]:
    """Train an explainer (see variants) on the train features; checkpoint under
    tables/explainers/<key>. A '- activation' explainer is text-only: its queries carry no vector; a
    rotated-basis explainer reads Qv through the trained prompts."""
    cfg = recipe.explainers[role]
    out = explainer_dataset(recipe, plan, gt_key, role, variant)

    def fit_explainer() -> dict[str, Any]:
        fs = training_subset(load_feature_set(Path(plan.home), gt_key), recipe.eval.n_train, cfg.seed)
        target = models.load_config(recipe.target)

        def cached() -> dict[int, dict[str, np.ndarray]]:
            return {layer: layer_activations(activations_dataset(plan), layer) for layer in recipe.cache.layers}

        def readout(e: ex.Explainer, n: int) -> list[ex.Query]:
            layers = cached()
            ids = np.concatenate([data["token_id"] for data in layers.values()])
            names = token_strings(models.load_tokenizer(recipe.target), ids, READOUT_MAX_CHARS)
            vectors, at, labels = readout_set(layers, names, n, cfg.seed)
            return feature_queries(vectors, at, labels, [f"readout-{k}" for k in range(n)], e.chat, cfg.seed, variant)

        # SAE decoder rows are directions (differences of residuals): nothing to centre (residual_inputs False)
        return train_to_checkpoint(
            out, cfg, None if variant == "no_activation" else target.hidden_size, target.num_hidden_layers,
            lambda e: feature_queries(fs.direction, fs.layer, fs.label, fs.ids(), e.chat, cfg.seed, variant),
            {"role": hashed_name(role, variant), "gt": gt_key, "task": "features", "target": recipe.target.model_dump(),
             "layers": recipe.cache.layers, "plan": plan.model_dump(exclude={"home"})}, progress,
            ex.rotation_seed(cfg, variant),
            lambda e: fit_projection(e, cached(), ContextTexts(Path(plan.home), plan.tokens_key), cfg.fit_ridge,
                                     cfg.fit_rows, residual_inputs=False, seed=cfg.seed),
            lambda: residual_stats(cached(), residual_inputs=False),
            None if variant == "no_activation" else readout,  # a text-only explainer has no vector to read
            readout_dataset(recipe, plan, role, variant),
        )  # fmt: skip

    return complete_or(out, fit_explainer)


@stage_task(
    "train-explainer",
    gpu=True,
    output=lambda p: explainer_dataset(p["recipe"], p["plan"], p["gt_key"], p["role"], p["variant"]),
)
def train_explainer_task(
    recipe: FeaturesRecipe, plan: CachePlan, gt_key: str, role: str, variant: str
) -> dict[str, Any]:
    """Fine-tune one explainer (a role, or a role's prompt omission) on the training features."""
    name = hashed_name(role, variant)
    progress = progress_reporter(
        f"train-explainer-{name.replace('/', '-').replace('_', '-')}", f"training the {name} explainer"
    )
    return train_explainer(recipe, plan, gt_key, role, variant, progress)
