"""Task A, feature descriptions: the ground truth (paper §3) and the recipe's checks.

Ground truth (`build_ground_truth`): per cached layer an SAE (tasks.features.sae), its exemplars, a label per
feature that fires in enough contexts (tasks.features.labels), and a split by feature: `test_per_layer` held-out
features per layer, the rest train (METHOD §5.3). Table `feature_labels(layer, feature_id, label, labeler, split)`.
Or, instead, the paper's released features archive (`import_ground_truth`), whose exemplars are mined here.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from storage.errors import UserInputError
from storage.hashing import config_hash
from storage.store import Dataset
from tasks.common import importers as imp
from tasks.common import models
from tasks.common.activations import CachePlan, activations_dataset, plan_cache
from tasks.common.corpus import ContextTexts
from tasks.common.orchestration import stage_task
from tasks.explainer import model as ex
from tasks.explainer.config import check_roles
from tasks.features import labels as lab
from tasks.features.archive import read_feature_archive
from tasks.features.config import FeaturesRecipe
from tasks.features.sae import layer_activations, write_exemplars, write_sae_layer

STAGE = "features"


STAGE_VERSION = 2  # ground truth and explainer checkpoints (2: an SAE seed per layer)


def check_recipe(recipe: FeaturesRecipe) -> CachePlan:
    """Validate a features recipe before anything runs: the cache part, then every explainer's model."""
    plan = plan_cache(recipe.cache_recipe())
    if recipe.sae.load_from:
        for layer in recipe.cache.layers:
            if not (Path(recipe.sae.load_from) / f"layer_{layer}" / "cfg.json").is_file():
                raise UserInputError("sae.load_from", f"{recipe.sae.load_from} has no sae-lens SAE for layer {layer} "
                                     f"(layer_{layer}/cfg.json)", "save one SAE per cached layer, or train them")  # fmt: skip
    if not recipe.explainers:
        raise UserInputError("explainers", "no explainer configured", "add at least one role, e.g. self")
    check_roles(recipe.eval, recipe.explainers)
    d_target = models.load_config(recipe.target).hidden_size
    if recipe.sae.import_archive:  # every pickle read (restricted) and checked before anything is written
        read_feature_archive(recipe.sae.import_archive, recipe.cache.layers, d_target, "sae.import_archive")
    for role, cfg in recipe.explainers.items():
        try:
            models.resolve(cfg.model)
        except UserInputError as err:
            raise UserInputError(f"explainers.{role}.model.name", err.problem, err.fix) from None
        ex.check_injection(cfg, recipe.cache.layers, plan.n_layers, d_target, f"explainers.{role}")
    return plan


def ground_truth_key(recipe: FeaturesRecipe, plan: CachePlan) -> str:
    """The cache, the SAE and labelling configs and the split; an imported archive by its content."""
    archive = recipe.sae.import_archive
    return config_hash(
        STAGE,
        STAGE_VERSION,
        {"activations": plan.activations_key, "sae": recipe.sae.model_dump(exclude={"import_archive"}),
         "labels": recipe.labels, "test_per_layer": recipe.eval.test_per_layer,
         **({"archive": imp.digest(archive)} if archive else {})},
    )  # fmt: skip


def build_ground_truth(recipe: FeaturesRecipe, plan: CachePlan, key: str) -> dict[str, Any]:
    """SAEs, feature activations, exemplars, labels and the split, all under dataset key `key`."""
    root = Path(plan.home)
    labels_ds = Dataset(root, "feature_labels", key)
    if labels_ds.complete_or_invalidate():
        return labels_ds.summary()
    if recipe.sae.import_archive:
        return import_ground_truth(recipe, plan, key)
    acts = activations_dataset(plan)
    device = models.resolve_runtime(recipe.target).device
    saes = Dataset(root, "saes", key)
    saes.create({"stage": STAGE, "version": STAGE_VERSION, "sae": recipe.sae.model_dump()})
    quality: dict[str, dict[str, float]] = {}
    for shard, layer in enumerate(recipe.cache.layers):
        qfile = saes.path / f"layer_{layer}" / "quality.json"
        if not (Dataset(root, "features", key).shard_done(shard) and qfile.exists()):
            metrics = write_sae_layer(acts, layer, recipe.sae, saes, shard, device)
            qfile.write_text(json.dumps(metrics))
        quality[str(layer)] = json.loads(qfile.read_text())
    for table in ("features", "feature_activations"):
        Dataset(root, table, key).mark_complete({"layers": recipe.cache.layers})
    write_exemplars(root, key, recipe.sae.n_exemplars)
    saes.mark_complete({"quality": quality})

    con = duckdb.connect()
    exemplar_files = [str(p) for p in Dataset(root, "exemplars", key).shard_files()]
    eligible = con.sql(
        f"select layer, feature_id from read_parquet({exemplar_files}) group by all "
        f"having count(*) >= {recipe.sae.min_exemplars} order by all"
    ).to_arrow_table()
    tokenizer = models.load_tokenizer(recipe.target)
    if recipe.labels.labeler == "tokens":
        act_files = [str(p) for p in acts.shard_files()]
        labels = lab.tokens_labels(root, key, act_files, tokenizer, recipe.labels, eligible)
    else:
        labels = _llm_labels(root, plan, key, recipe, eligible, tokenizer)
    labels = _assign_split(labels, recipe.eval.test_per_layer, recipe.sae.seed)
    labels_ds.create({"stage": STAGE, "version": STAGE_VERSION, "labels": recipe.labels.model_dump()})
    labels_ds.write_shard(0, labels)
    n_test = sum(1 for s in labels.column("split").to_pylist() if s == "test")
    summary = {"labelled": labels.num_rows, "test": n_test, "train": labels.num_rows - n_test, "quality": quality}
    if n_test == 0:
        raise UserInputError("sae.min_exemplars", "no feature has enough exemplars to label", "cache more tokens")
    labels_ds.mark_complete(summary)
    return summary


def import_ground_truth(recipe: FeaturesRecipe, plan: CachePlan, key: str) -> dict[str, Any]:
    """The paper's features archive as this ground truth: its directions as `features`, its labels and split
    as `feature_labels` (labeler 'imported'), and exemplars mined from this cache by each direction: the
    `n_exemplars` contexts of largest max_t <h_t, v>, as LayerCache.top_contexts ranks them (a direction that
    never fires positively still gets its best contexts, so every labelled feature can be scored)."""
    root = Path(plan.home)
    d = models.load_config(recipe.target).hidden_size
    directions, labels = read_feature_archive(recipe.sae.import_archive, recipe.cache.layers, d,
                                                  "sae.import_archive")  # fmt: skip
    info = {"stage": STAGE, "version": STAGE_VERSION, "imported_from": recipe.sae.import_archive}
    feats, exemplars = Dataset(root, "features", key), Dataset(root, "exemplars", key)
    for ds in (feats, exemplars):
        ds.create(info)
    k = recipe.sae.n_exemplars
    for shard, layer in enumerate(recipe.cache.layers):
        v = directions[layer]  # [n, d]
        feats.write_shard(shard, pa.table({
            "layer": pa.array(np.full(len(v), layer, dtype=np.int16)),
            "feature_id": pa.array(np.arange(len(v), dtype=np.int32)),
            "direction": pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), d),
        }))  # fmt: skip
        cache, cols = (
            LayerCache(plan, layer),
            {c: [] for c in ("feature_id", "context_id", "max_value", "max_position", "rank")},
        )
        x = cache.x.astype(np.float32)  # [N, d], rows grouped by context
        for lo in range(0, len(v), 256):  # features in chunks: [N, 256] floats at a time
            dots = x @ v[lo : lo + 256].T  # [N, c]
            best = np.maximum.reduceat(dots, cache.starts, axis=0)  # [n_contexts, c]
            for j in range(dots.shape[1]):
                for rank, ci in enumerate(np.argsort(-best[:, j], kind="stable")[:k], start=1):
                    s, e = cache.starts[ci], (cache.starts[ci + 1] if ci + 1 < len(cache.starts) else len(x))
                    cols["feature_id"].append(lo + j)
                    cols["context_id"].append(int(cache.context_id[s]))
                    cols["max_value"].append(float(best[ci, j]))
                    cols["max_position"].append(int(cache.position[s + int(np.argmax(dots[s:e, j]))]))
                    cols["rank"].append(rank)
        exemplars.write_shard(shard, pa.table({"layer": pa.array(np.full(len(cols["rank"]), layer, dtype=np.int16)),
                                               **{c: pa.array(vals) for c, vals in cols.items()}}))  # fmt: skip
    for ds in (feats, exemplars):
        ds.mark_complete({"layers": recipe.cache.layers})
    table = lab.label_table([r[0] for r in labels], [r[1] for r in labels], [r[2] for r in labels], "imported",
                            [r[3] for r in labels])  # fmt: skip
    labels_ds = Dataset(root, "feature_labels", key)
    labels_ds.create({**info, "labels": recipe.labels.model_dump()})
    labels_ds.write_shard(0, table)
    n_test = sum(r[3] == "test" for r in labels)
    summary = {"labelled": len(labels), "test": n_test, "train": len(labels) - n_test, "quality": {},
               "imported_from": recipe.sae.import_archive}  # fmt: skip
    labels_ds.mark_complete(summary)
    return summary


def _assign_split(labels: pa.Table, test_per_layer: int, seed: int) -> pa.Table:
    layer = np.asarray(labels.column("layer").to_pylist())
    split = np.array(["train"] * len(layer), dtype=object)
    rng = np.random.default_rng(seed)
    for value in np.unique(layer):
        idx = np.flatnonzero(layer == value)
        split[rng.permutation(idx)[:test_per_layer]] = "test"
    return labels.append_column("split", pa.array(split.tolist()))


def _llm_labels(
    root: Path, plan: CachePlan, key: str, recipe: FeaturesRecipe, eligible: pa.Table, tokenizer
) -> pa.Table:
    con = duckdb.connect()
    con.register("eligible", eligible)
    ex_files = [str(p) for p in Dataset(root, "exemplars", key).shard_files()]
    rows = con.execute(
        f"select layer, feature_id, list(context_id order by rank)[1:8], list(max_position order by rank)[1:8] "
        f"from read_parquet({ex_files}) join eligible using (layer, feature_id) group by all order by all"
    ).fetchall()
    texts = ContextTexts(Path(plan.home), plan.tokens_key)
    prompts = [
        lab.LLM_PROMPT.format(
            examples=lab.exemplar_snippets([(texts.tokens(c), p) for c, p in zip(cs, ps, strict=True)])
        )
        for _, _, cs, ps in rows
    ]
    descriptions = lab.llm_label(prompts, recipe.labels)
    return lab.label_table([r[0] for r in rows], [r[1] for r in rows], descriptions, f"llm:{recipe.labels.llm_model}")


@dataclass
class FeatureSet:
    """Labelled features with their decoder directions: layer [n], feature_id [n], direction [n, d]."""

    layer: np.ndarray
    feature_id: np.ndarray
    label: list[str]
    split: np.ndarray
    direction: np.ndarray

    def take(self, mask: np.ndarray) -> "FeatureSet":
        idx = np.flatnonzero(mask)
        return FeatureSet(self.layer[idx], self.feature_id[idx], [self.label[i] for i in idx], self.split[idx],
                          self.direction[idx])  # fmt: skip

    def ids(self) -> list[str]:
        return [f"L{layer}/F{f}" for layer, f in zip(self.layer, self.feature_id, strict=True)]


def load_feature_set(root: Path, key: str) -> FeatureSet:
    labels = [str(p) for p in Dataset(root, "feature_labels", key).shard_files()]
    feats = [str(p) for p in Dataset(root, "features", key).shard_files()]
    t = (
        duckdb.connect()
        .execute(
            f"select l.layer, l.feature_id, l.label, l.split, f.direction from read_parquet({labels}) l "
            f"join read_parquet({feats}) f using (layer, feature_id) order by l.layer, l.feature_id"
        )
        .fetchnumpy()
    )
    return FeatureSet(
        t["layer"].astype(int), t["feature_id"].astype(int), list(t["label"]), np.asarray(t["split"]),
        np.stack(t["direction"]).astype(np.float32),
    )  # fmt: skip


@stage_task(
    "build-feature-ground-truth",
    gpu=True,
    output=lambda p: Dataset(Path(p["plan"].home), "feature_labels", p["gt_key"]),
)
def build_ground_truth_task(recipe: FeaturesRecipe, plan: CachePlan, gt_key: str) -> dict[str, Any]:
    """SAEs per layer, exemplars, labels and the train/test split."""
    return build_ground_truth(recipe, plan, gt_key)


class LayerCache:
    """One layer's cached residual stream, addressable by context: X [N, d] with rows grouped by context."""

    def __init__(self, plan: CachePlan, layer: int) -> None:
        data = layer_activations(activations_dataset(plan), layer)
        order = np.lexsort((data["position"], data["context_id"]))
        self.x = data["activation"][order]  # [N, d] float16
        self.context_id = data["context_id"][order]
        self.position = data["position"][order]
        self.starts = np.flatnonzero(np.r_[True, self.context_id[1:] != self.context_id[:-1]])
        ends = np.r_[self.starts[1:], len(self.context_id)]
        self.rows = {int(self.context_id[s]): (s, e) for s, e in zip(self.starts, ends, strict=True)}

    def states(self, context_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(positions [P], h [P, d] float16): the stored residuals of one context."""
        s, e = self.rows[int(context_id)]
        return self.position[s:e], self.x[s:e]

    def true_acts(self, v: np.ndarray, context_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(positions [P], max(0, <h_t, v>) [P]) over the stored positions of one context."""
        positions, h = self.states(context_id)
        return positions, np.clip(h.astype(np.float32) @ v, 0, None)

    def top_contexts(self, v: np.ndarray, k: int) -> list[int]:
        """Contexts with the largest max_t <h_t, v> (exemplars of an arbitrary vector)."""
        dots = self.x.astype(np.float32) @ v  # [N]
        per_context = np.maximum.reduceat(dots, self.starts)  # [n_contexts]
        best = np.argsort(-per_context, kind="stable")[:k]
        return [int(self.context_id[self.starts[i]]) for i in best]
