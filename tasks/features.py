"""Task A, feature descriptions: ground truth, explainer training, baselines and scoring (paper §3).

Ground truth (`build_ground_truth`): per cached layer an SAE (tasks.sae), its exemplars, a label per feature
that fires in enough contexts (tasks.labels), and a split by feature: `test_per_layer` held-out features per
layer, the rest train (METHOD §5.3). Table `feature_labels(layer, feature_id, label, labeler, split)`.

Evaluation (`evaluate`): every method describes the same held-out vectors; the simulator scores each
description on the vector's top-20 exemplars with true activations max(0, <h_t, v>) from the cache.
Methods: trained explainers (by role), nearest neighbour (raw dot product, pooled and layerwise), SelfIE
untrained (best of scales, an upper bound), and the gold labels themselves. The ACT out-of-distribution set
uses raw residual vectors at sampled tokens, whose exemplars are the cached contexts with the largest
<h_t, v>; it has no gold label.
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
from tasks import alignment, models
from tasks import explainer as ex
from tasks import importers as imp
from tasks import labels as lab
from tasks.activations import CachePlan, activations_dataset, plan_cache
from tasks.config import ExplainerConfig, FeaturesRecipe, ModelConfig, check_roles
from tasks.corpus import ContextTexts
from tasks.llm import complete
from tasks.orchestration import progress_reporter, stage_task
from tasks.projection import fit_projection, residual_stats
from tasks.results import Metric, Prediction, record_run, recorded
from tasks.sae import layer_activations, write_exemplars, write_sae_layer
from tasks.simulate import JUDGE_PROMPT, LMSimulator, SentenceEmbedder, judge_rating, mean_se, simulator_score

STAGE = "features"
STAGE_VERSION = 2  # ground truth and explainer checkpoints (2: an SAE seed per layer)
EVAL_VERSION = 5  # evaluation only: bumping re-scores without retraining (4: shuffled v, quotes; 5: ACT centred)
SELFIE_USER = "Briefly define the word '{x}'."
SELFIE_PREFIX = "The meaning of the word '{x}' is "
SELFIE_BASE = "What is the meaning of the word '{x}'? The meaning of the word '{x}' is "
# ΔACT prompt pairs until the fact base of the patching task lands: same relation, a different subject.
DELTA_TEMPLATES = ("The capital of {} is", "The official language of {} is", "The currency of {} is",
                   "The largest city in {} is", "{} is a country located in")  # fmt: skip
DELTA_SUBJECTS = ("France", "Japan", "Brazil", "Egypt", "Canada", "India", "Germany", "Kenya", "Mexico", "Italy",
                  "Spain", "China", "Russia", "Peru", "Norway", "Turkey")  # fmt: skip


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
        imp.read_feature_archive(recipe.sae.import_archive, recipe.cache.layers, d_target, "sae.import_archive")
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
    if labels_ds.is_complete():
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
    directions, labels = imp.read_feature_archive(recipe.sae.import_archive, recipe.cache.layers, d,
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
    table = pa.table({
        "layer": pa.array([r[0] for r in labels], pa.int16()), "feature_id": pa.array([r[1] for r in labels], pa.int32()),
        "label": pa.array([r[2] for r in labels]), "labeler": pa.array(["imported"] * len(labels)),
        "split": pa.array([r[3] for r in labels]),
    })  # fmt: skip
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
    return pa.table(
        {
            "layer": pa.array([r[0] for r in rows], pa.int16()),
            "feature_id": pa.array([r[1] for r in rows], pa.int32()),
            "label": pa.array(descriptions),
            "labeler": pa.array([f"llm:{recipe.labels.llm_model}"] * len(rows)),
        }
    )


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


UNTRAINED = ("selfie", "selfie_best_of_scales", "gold")  # methods that use no training features


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


# -- explainers -------------------------------------------------------------------------------------------


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
    summary = ex.train_to_checkpoint(
        out, cfg, None if mode == "no_activation" else target.hidden_size, target.num_hidden_layers,
        lambda e: ex.feature_queries(fs.direction, fs.layer, fs.label, fs.ids(), e.chat, cfg.seed, mode or "trained"),
        {"role": name, "gt": gt_key, "task": "features", "target": recipe.target.model_dump(),
         "layers": recipe.cache.layers, "plan": plan.model_dump(exclude={"home"})}, progress,
        ex.rotation_seed(cfg, mode),
        lambda e: fit_projection(e, cached(), ContextTexts(Path(plan.home), plan.tokens_key), cfg.fit_ridge,
                                 cfg.fit_rows, residual_inputs=False, seed=cfg.seed),
        lambda: residual_stats(cached(), residual_inputs=False),
    )  # fmt: skip
    return {"path": str(out.path), **summary}


# -- evaluation -------------------------------------------------------------------------------------------


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


@dataclass
class EvalItem:
    """A vector to describe, where it lives, its exemplar contexts and (when known) its gold label."""

    example_id: str
    layer: int
    vector: np.ndarray
    contexts: list[int]
    gold: str | None
    split: str


def explainer_vectors(items: list[EvalItem], layer_means: dict[int, np.ndarray], centres: bool) -> list[np.ndarray]:
    """What each item hands the explainer: SAE directions and ΔACT differences as they are; an ACT vector, a
    whole residual, minus the layer's mean μ_ℓ when the explainer's vector form reads directions centred
    (vector_norm 'layer_mean', projection 'fitted'), so its own part is what arrives, as in calibration."""
    return [it.vector - layer_means[it.layer] if centres and it.split == "ood_act" else it.vector for it in items]


def score_items(
    items: list[EvalItem],
    descriptions: list[str],
    caches: dict[int, LayerCache],
    texts: ContextTexts,
    simulator: LMSimulator | None = None,
) -> list[float]:
    scores = []
    for item, desc in zip(items, descriptions, strict=True):
        toks, acts = [], []
        for c in item.contexts:
            pos, a = caches[item.layer].true_acts(item.vector, c)
            all_tokens = texts.tokens(c)
            toks.append([all_tokens[p] for p in pos])
            acts.append(a)
        scores.append(simulator_score(desc, toks, acts, simulator))
    return scores


def selfie_descriptions(target: ModelConfig, items: list[EvalItem], scales: list[float], cfg: ExplainerConfig,
                        max_new_tokens: int, d_target: int, n_layers: int) -> dict[float, list[str]]:  # fmt: skip
    """SelfIE, untrained: v/|v| x scale written over both placeholders of the definition prompt (§3.7)."""
    base_cfg = cfg.model_copy(update={"model": target, "finetune": "full", "vector_norm": "raw", "projection": "auto",
                                     "injection": "embedding"})  # fmt: skip
    selfie = ex.Explainer(models.load(target), d_target, n_layers, base_cfg)
    selfie.payloads_per_query = 2
    x = ex.SPAN_TOKENS[1]
    out = {}
    for scale in scales:
        queries = []
        for it in items:
            u = (it.vector / max(np.linalg.norm(it.vector), 1e-8) * scale).astype(np.float32)
            if selfie.chat:
                queries.append(
                    ex.Query(u, it.layer, SELFIE_USER.format(x=x), None, it.example_id, SELFIE_PREFIX.format(x=x))
                )
            else:
                queries.append(ex.Query(u, it.layer, SELFIE_BASE.format(x=x), None, it.example_id))
        out[scale] = selfie.generate(queries, max_new_tokens, cfg.eval_batch_size)
    return out


def nearest_neighbour(train: FeatureSet, items: list[EvalItem], layerwise: bool) -> list[str]:
    """Label of the training direction with the largest raw dot product (pooled over layers, or same layer)."""
    out = []
    for it in items:
        dots = train.direction @ it.vector
        if layerwise:
            dots = np.where(train.layer == it.layer, dots, -np.inf)
        out.append(train.label[int(np.argmax(dots))])
    return out


def evaluate(recipe: FeaturesRecipe, plan: CachePlan, gt_key: str, checkpoints: dict[str, str], run_id: str,
             progress=None) -> tuple[list[Metric], list[Prediction]]:  # fmt: skip
    """Score every method on the held-out features (split test) and the ACT set (split ood_act)."""
    root = Path(plan.home)
    fs = load_feature_set(root, gt_key)
    seed = grid_seed(recipe)
    train = training_subset(fs, recipe.eval.n_train, seed)  # the explainers' own subset
    test = fs.take(fs.split == "test")
    texts = ContextTexts(root, plan.tokens_key)
    caches = {layer: LayerCache(plan, layer) for layer in recipe.cache.layers}
    layer_means = {layer: cache.x.mean(axis=0, dtype=np.float32) for layer, cache in caches.items()}  # μ_ℓ [d_M]
    ex_files = [str(p) for p in Dataset(root, "exemplars", gt_key).shard_files()]
    exemplars = dict(
        ((int(r[0]), int(r[1])), r[2])
        for r in duckdb.connect()
        .execute(f"select layer, feature_id, list(context_id order by rank) from read_parquet({ex_files}) group by all")
        .fetchall()
    )
    items = [
        EvalItem(i, int(layer), d, exemplars[(int(layer), int(f))], label, "test")
        for i, layer, f, d, label in zip(
            test.ids(), test.layer, test.feature_id, test.direction, test.label, strict=True
        )
    ]
    items += act_items(recipe, caches, recipe.sae.n_exemplars)
    items += delta_items(recipe, caches, recipe.sae.n_exemplars)
    target_name = recipe.target.name
    n_train = len(train.layer)
    # Privileged-access diagnostics on exemplar contexts of held-out features (two per feature).
    align_on = [(it.layer, it.vector, c) for it in items if it.split == "test" for c in it.contexts[:2]]
    align_on = align_on[: recipe.eval.alignment_contexts]
    per_explainer: list[Metric] = []
    predictions: dict[tuple[str, str], list[str]] = {}  # (method, explainer_model) -> descriptions per item
    predictions[("gold", target_name)] = [it.gold or "" for it in items]
    predictions[("nearest_neighbor", target_name)] = nearest_neighbour(train, items, layerwise=False)
    predictions[("nearest_neighbor_layerwise", target_name)] = nearest_neighbour(train, items, layerwise=True)
    for name, path in checkpoints.items():
        role, _, mode = name.partition("/")
        explainer = ex.Explainer.load(Path(path) / "checkpoint")
        cfg = recipe.explainers[role]
        per_explainer += [Metric(run_id, "features", target_name, cfg.model.name, mode or "trained", n_train, seed,
                                 "train", metric, value, 0.0, n_train)
                          for metric, value in ex.Explainer.step_counts(Path(path) / "checkpoint")]  # fmt: skip
        vectors = explainer_vectors(items, layer_means, explainer.on_manifold or explainer.fitted)
        queries = [ex.feature_queries(v[None], [it.layer], [None], [it.example_id], explainer.chat, cfg.seed + k,
                                      mode or "trained")[0] for k, (it, v) in enumerate(zip(items, vectors, strict=True))]  # fmt: skip
        predictions[(mode or "trained", cfg.model.name)] = explainer.generate(queries, cfg.max_new_tokens,
                                                                             cfg.eval_batch_size)  # fmt: skip
        if not mode:  # the controls and diagnostics of a trained explainer (a prompt ablation has none)
            if recipe.eval.vector_controls:  # METHOD §4.2: the same prompts with v = 0, and with another held-out
                # item's vector of the same layer and split. Scores near the trained ones: v is not read.
                donor = ex.shuffled_donors([(it.split, it.layer) for it in items], cfg.seed)
                controls = {"zero_vector": [np.zeros_like(q.vector) for q in queries],
                            "shuffled_vector": [queries[d].vector for d in donor]}  # fmt: skip
                for control, vectors in controls.items():
                    qs = [
                        ex.Query(v, q.layer, q.text, None, q.example_id) for q, v in zip(queries, vectors, strict=True)
                    ]
                    predictions[(control, cfg.model.name)] = explainer.generate(qs, cfg.max_new_tokens,
                                                                               cfg.eval_batch_size)  # fmt: skip
            if align_on:
                sims = alignment.similarities(explainer, lambda layer, c: caches[layer].states(c), texts.tokens,
                                              recipe.cache.layers, align_on)  # fmt: skip
                per_explainer += [Metric(run_id, "alignment", target_name, cfg.model.name, "trained", n_train,
                                         seed, "test", metric, *value_se_n)
                                  for metric, value_se_n in sims.items()]  # fmt: skip
        del explainer
        if progress:
            progress(f"{name} explainer decoded {len(items)} items")
    target_cfg = models.load_config(recipe.target)
    any_cfg = next(iter(recipe.explainers.values()), ExplainerConfig())
    by_scale = {}
    select: list[EvalItem] = []  # training features on which SelfIE's one scale is chosen
    if recipe.eval.selfie:
        pick = np.random.default_rng(seed).permutation(len(train.layer))[: recipe.eval.selfie_select]
        select = [EvalItem(f"select{i}", int(train.layer[i]), train.direction[i],
                           exemplars[(int(train.layer[i]), int(train.feature_id[i]))], train.label[i], "train")
                  for i in pick]  # fmt: skip
        by_scale = selfie_descriptions(recipe.target, items + select, recipe.eval.selfie_scales, any_cfg,
                                       recipe.eval.selfie_max_new_tokens, target_cfg.hidden_size,
                                       target_cfg.num_hidden_layers)  # fmt: skip

    metrics, rows = per_explainer, []
    for layer, quality in Dataset(root, "feature_labels", gt_key).summary()["quality"].items():
        for name in ("sae_explained_variance", "sae_l0", "sae_dead_fraction"):  # SAE quality, one row per layer
            metrics.append(Metric(run_id, "features", target_name, "", "sae", 0, seed, f"layer_{layer}",
                                  name, float(quality[name]), 0.0, int(quality["tokens"])))  # fmt: skip
    scored: dict[tuple[str, str], list[float]] = {}
    sim = None if recipe.eval.simulator == "lexical" else LMSimulator(recipe.eval.simulator)
    for key, descs in predictions.items():
        scored[key] = score_items(items, descs, caches, texts, sim)
    if by_scale:  # SelfIE: one scale chosen on training features; and per item the best of all (upper bound)
        scales, n = recipe.eval.selfie_scales, len(items)
        scale_scores = {s: score_items(items + select, d, caches, texts, sim) for s, d in by_scale.items()}
        chosen = max(scales, key=lambda s: float(np.mean(scale_scores[s][n:])))  # first of equals
        predictions[("selfie", target_name)] = by_scale[chosen][:n]
        scored[("selfie", target_name)] = scale_scores[chosen][:n]
        best = [max(range(len(scales)), key=lambda j, i=i: scale_scores[scales[j]][i]) for i in range(n)]
        predictions[("selfie_best_of_scales", target_name)] = [by_scale[scales[j]][i] for i, j in enumerate(best)]
        scored[("selfie_best_of_scales", target_name)] = [scale_scores[scales[j]][i] for i, j in enumerate(best)]
        metrics.append(Metric(run_id, "features", target_name, target_name, "selfie", 0, seed, "train",
                              "selfie_scale", float(chosen), 0.0, len(select)))  # fmt: skip

    embedder = SentenceEmbedder() if recipe.eval.embedding_similarity else None
    test_idx = [i for i, it in enumerate(items) if it.split == "test"]
    for (method, model), descs in predictions.items():
        for i, it in enumerate(items):
            if method == "gold" and it.split != "test":
                continue
            rows.append(Prediction(run_id, "features", it.example_id, model, method, it.split, descs[i], it.gold or "",
                                   scored[(method, model)][i]))  # fmt: skip
        for split in ("test", "ood_act", "ood_delta"):
            idx = [i for i, it in enumerate(items) if it.split == split]
            if not idx or (method == "gold" and split != "test"):
                continue
            value, se, n = mean_se([scored[(method, model)][i] for i in idx])
            n_used = 0 if method in UNTRAINED else n_train  # the controls: the trained explainer, v = 0 or shuffled
            metrics.append(Metric(run_id, "features", target_name, model, method, n_used, seed, split,
                                  "simulator_corr", value, se, n))  # fmt: skip
        if recipe.eval.judge and method != "gold" and test_idx:
            ratings = [judge_rating(r) for r in complete(
                [JUDGE_PROMPT.format(predicted_label=descs[i], expected_label=items[i].gold) for i in test_idx],
                recipe.eval.judge, "eval.judge", recipe.eval.judge_base_url, max_new_tokens=10)]  # fmt: skip
            value, se, n = mean_se([0.0 if r is None else r for r in ratings])  # unparseable counts as 0
            metrics.append(Metric(run_id, "features", target_name, model, method, 0 if method in UNTRAINED
                                  else n_train, seed, "test", "judge_score", value, se, n))  # fmt: skip
            metrics.append(Metric(run_id, "features", target_name, model, method, 0, seed, "test",
                                  "judge_parse_rate", float(np.mean([r is not None for r in ratings])), 0.0, n))  # fmt: skip
        if embedder is not None and method != "gold" and test_idx:
            sims = embedder.similarity([descs[i] for i in test_idx], [items[i].gold for i in test_idx])
            value, se, n = mean_se(sims.tolist())
            n_used = 0 if method in UNTRAINED else n_train
            metrics.append(Metric(run_id, "features", target_name, model, method, n_used, seed, "test",
                                  "embedding_similarity", value, se, n))  # fmt: skip
    return metrics, rows


def delta_items(recipe: FeaturesRecipe, caches: dict[int, LayerCache], k: int) -> list[EvalItem]:
    """ΔACT set: v = h_l(x) - h_l(x') at the last token of a counterfactual prompt pair (§3.4)."""
    n = recipe.eval.delta_act_per_layer
    if n == 0:
        return []
    from tasks.activations import residual_stream

    lm = models.load(recipe.target)
    rng = np.random.default_rng(recipe.sae.seed + 2)
    layers = sorted(caches)
    items = []
    for j in range(n):
        template = DELTA_TEMPLATES[j % len(DELTA_TEMPLATES)]
        a, b = rng.choice(len(DELTA_SUBJECTS), size=2, replace=False)
        h = []
        for subject in (DELTA_SUBJECTS[a], DELTA_SUBJECTS[b]):
            ids = lm.tokenizer(template.format(subject), return_tensors="pt")["input_ids"]
            hidden = residual_stream(lm, ids, layers)
            h.append({layer: hidden[layer][0, -1].float().cpu().numpy() for layer in layers})
        for layer in layers:
            v = h[0][layer] - h[1][layer]
            name = f"delta/L{layer}/{j}:{DELTA_SUBJECTS[a]}-{DELTA_SUBJECTS[b]}"
            items.append(EvalItem(name, layer, v, caches[layer].top_contexts(v, k), None, "ood_delta"))
    return items


def act_items(recipe: FeaturesRecipe, caches: dict[int, LayerCache], k: int) -> list[EvalItem]:
    """ACT set: residual vectors at sampled cached tokens; exemplars = contexts with the largest <h_t, v>."""
    items = []
    rng = np.random.default_rng(recipe.sae.seed + 1)
    for layer, cache in caches.items():
        for row in rng.choice(len(cache.x), size=min(recipe.eval.ood_act_per_layer, len(cache.x)), replace=False):
            v = cache.x[row].astype(np.float32)
            c, p = int(cache.context_id[row]), int(cache.position[row])
            items.append(EvalItem(f"act/L{layer}/c{c}p{p}", layer, v, cache.top_contexts(v, k), None, "ood_act"))
    return items


# -- Prefect tasks ----------------------------------------------------------------------------------------


def evaluation_run_id(recipe: FeaturesRecipe, gt_key: str) -> str:
    """Deterministic run id: a rerun of the same recipe finds its results instead of duplicating rows."""
    keys = {name: explainer_key(recipe, gt_key, name) for name in explainer_names(recipe)}
    return "features-" + config_hash(
        "features-eval", EVAL_VERSION, {"gt": gt_key, "explainers": keys, "eval": recipe.eval, "target": recipe.target}
    )


@stage_task(
    "build-feature-ground-truth",
    gpu=True,
    output=lambda p: Dataset(Path(p["plan"].home), "feature_labels", p["gt_key"]),
)
def build_ground_truth_task(recipe: FeaturesRecipe, plan: CachePlan, gt_key: str) -> dict[str, Any]:
    """SAEs per layer, exemplars, labels and the train/test split."""
    return build_ground_truth(recipe, plan, gt_key)


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


@stage_task("evaluate-features", gpu=True, output=lambda p: Dataset(Path(p["plan"].home), "metrics", p["run_id"]))
def evaluate_task(
    recipe: FeaturesRecipe, plan: CachePlan, gt_key: str, checkpoints: dict[str, str], run_id: str
) -> dict[str, Any]:
    """Score every method; write `metrics`, `predictions`, `runs`; publish a table artifact."""
    import time

    from prefect.logging import get_run_logger

    if done := recorded(Path(plan.home), run_id):
        return done
    started = time.time()
    metrics, predictions = evaluate(recipe, plan, gt_key, checkpoints, run_id, get_run_logger().info)
    return record_run(Path(plan.home), "features", recipe, run_id, metrics, predictions, started,
                      f"{STAGE}-v{STAGE_VERSION}")  # fmt: skip
