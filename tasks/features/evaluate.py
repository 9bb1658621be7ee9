"""Task A, feature descriptions: the evaluation (paper §3).

Every method describes the same held-out vectors; the simulator scores each description on the vector's top-20
exemplars with true activations max(0, <h_t, v>) from the cache. Methods: trained explainers (by role), nearest
neighbour (raw dot product, pooled and layerwise), SelfIE untrained (best of scales, an upper bound), and the
gold labels themselves. The ACT out-of-distribution set uses raw residual vectors at sampled tokens, whose
exemplars are the cached contexts with the largest <h_t, v>; it has no gold label.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from storage.hashing import config_hash
from storage.store import Dataset
from tasks.common import models
from tasks.common.activations import CachePlan
from tasks.common.config import ModelConfig
from tasks.common.corpus import ContextTexts
from tasks.common.llm import complete
from tasks.common.orchestration import stage_task
from tasks.common.results import Metric, Prediction, record_run, recorded
from tasks.explainer import alignment
from tasks.explainer import model as ex
from tasks.explainer.config import ExplainerConfig
from tasks.features.config import FeaturesRecipe
from tasks.features.ground_truth import STAGE, STAGE_VERSION, FeatureSet, LayerCache, load_feature_set
from tasks.features.prompts import feature_queries
from tasks.features.simulate import (
    JUDGE_PROMPT,
    LMSimulator,
    SentenceEmbedder,
    judge_rating,
    mean_se,
    simulator_score,
)
from tasks.features.train import explainer_key, grid_seed, hashed_name, training_subset, variants

EVAL_VERSION = 5  # evaluation only: bumping re-scores without retraining (4: shuffled v, quotes; 5: ACT centred)
SELFIE_USER = "Briefly define the word '{x}'."
SELFIE_PREFIX = "The meaning of the word '{x}' is "
SELFIE_BASE = "What is the meaning of the word '{x}'? The meaning of the word '{x}' is "
# ΔACT prompt pairs until the fact base of the patching task lands: same relation, a different subject.
DELTA_TEMPLATES = ("The capital of {} is", "The official language of {} is", "The currency of {} is",
                   "The largest city in {} is", "{} is a country located in")  # fmt: skip
DELTA_SUBJECTS = ("France", "Japan", "Brazil", "Egypt", "Canada", "India", "Germany", "Kenya", "Mexico", "Italy",
                  "Spain", "China", "Russia", "Peru", "Norway", "Turkey")  # fmt: skip


UNTRAINED = ("selfie", "selfie_best_of_scales", "gold")  # methods that use no training features


# -- evaluation -------------------------------------------------------------------------------------------


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


@dataclass
class Truth:
    """What every description of an item is scored against: per exemplar context, its stored tokens' strings
    and their true activations max(0, <h_t, v>) [P]."""

    tokens: list[list[str]]
    acts: list[np.ndarray]


def exemplar_truth(items: list[EvalItem], caches: dict[int, LayerCache], texts: ContextTexts) -> list[Truth]:
    """Each item's Truth, computed once per item rather than once per method that describes it."""
    out = []
    for item in items:
        toks, acts = [], []
        for c in item.contexts:
            pos, a = caches[item.layer].true_acts(item.vector, c)
            all_tokens = texts.tokens(c)
            toks.append([all_tokens[p] for p in pos])
            acts.append(a)
        out.append(Truth(toks, acts))
    return out


def score_items(truths: list[Truth], descriptions: list[str], simulator: LMSimulator | None = None) -> list[float]:
    """The simulator score of each description on its item's exemplars."""
    return [simulator_score(desc, t.tokens, t.acts, simulator) for t, desc in zip(truths, descriptions, strict=True)]


def selfie_descriptions(target: ModelConfig, items: list[EvalItem], scales: list[float], cfg: ExplainerConfig,
                        max_new_tokens: int, d_target: int, n_layers: int) -> dict[float, list[str]]:  # fmt: skip
    """SelfIE, untrained: v/|v| x scale written over both placeholders of the definition prompt (§3.7)."""
    base_cfg = cfg.model_copy(update={"model": target, "finetune": "full", "vector_norm": "raw", "projection": "auto",
                                     "injection": "embedding"})  # fmt: skip
    selfie = ex.Explainer(models.load(target, frozen=True), d_target, n_layers, base_cfg)
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
        role, variant = name.split("/")
        explainer = ex.Explainer.load(Path(path) / "checkpoint")
        cfg = recipe.explainers[role]
        per_explainer += [Metric(run_id, "features", target_name, cfg.model.name, variant, n_train, seed,
                                 "train", metric, value, 0.0, n_train)
                          for metric, value in ex.Explainer.step_counts(Path(path) / "checkpoint")]  # fmt: skip
        vectors = explainer_vectors(items, layer_means, explainer.on_manifold or explainer.fitted)
        queries = [feature_queries(v[None], [it.layer], [None], [it.example_id], explainer.chat, cfg.seed + k,
                                      variant)[0] for k, (it, v) in enumerate(zip(items, vectors, strict=True))]  # fmt: skip
        predictions[(variant, cfg.model.name)] = explainer.generate(queries, cfg.max_new_tokens,
                                                                             cfg.eval_batch_size)  # fmt: skip
        if variant == "trained":  # the controls and diagnostics of a trained explainer (a prompt omission has none)
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
    truths = exemplar_truth(items + select, caches, texts)
    for key, descs in predictions.items():
        scored[key] = score_items(truths[: len(items)], descs, sim)
    if by_scale:  # SelfIE: one scale chosen on training features; and per item the best of all (upper bound)
        scales, n = recipe.eval.selfie_scales, len(items)
        scale_scores = {s: score_items(truths, d, sim) for s, d in by_scale.items()}
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
    from tasks.common.activations import residual_stream

    lm = models.load(recipe.target, frozen=True)
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
    keys = {hashed_name(r, v): explainer_key(recipe, gt_key, r, v) for r, v in variants(recipe)}
    return "features-" + config_hash(
        "features-eval", EVAL_VERSION, {"gt": gt_key, "explainers": keys, "eval": recipe.eval, "target": recipe.target}
    )


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
