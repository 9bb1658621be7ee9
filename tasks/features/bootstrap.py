"""The bootstrapping loop: the expensive procedure labels a subset, a trained explainer describes the rest.

describe   every SAE feature of the explainer's ground truth that auto-interp left without a label (it keeps
           only features with `sae.min_exemplars` exemplars), and with `held_out` the test features too ->
           `feature_labels` rows with labeler `explainer:<checkpoint key>`, beside the auto-interp ones
score      a seeded sample of the described features (those with `min_contexts` exemplar contexts): the
           auto-interp route is run on the same sample (exemplar mining + the tokens labeler), timed, and
           both labels are scored by the simulator on the features' true activations, as the features
           evaluation scores them -> `metrics` / `predictions` rows of task `bootstrap` (method `trained`
           for the explainer, `auto_interp` for the route; `paired_gains` pairs them per feature)

The cost side of the claim is measured in the run: the explainer's seconds per described feature (its
decoding, over every shard this run described) against the auto-interp route's seconds per sampled feature.
"""

import json
import time
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from storage.errors import UserInputError
from storage.hashing import config_hash
from storage.store import Dataset, store_root
from tasks.common import models
from tasks.common.activations import CachePlan, activations_dataset
from tasks.common.config import ModelConfig
from tasks.common.corpus import ContextTexts
from tasks.common.orchestration import progress_reporter, stage_task
from tasks.common.results import Metric, Prediction, record_run, recorded
from tasks.explainer import explain
from tasks.explainer import model as ex
from tasks.features import labels as lab
from tasks.features.config import BootstrapRecipe, LabelConfig
from tasks.features.evaluate import EvalItem, exemplar_truth, score_items
from tasks.features.ground_truth import LayerCache
from tasks.features.sae import exemplars_sql
from tasks.features.simulate import LMSimulator, mean_se

STAGE = "bootstrap"
STAGE_VERSION = 1  # the explainer's descriptions
SCORE_VERSION = 2  # the scored sample's metrics (2: the explainer's speed-up over auto-interp)


def _gt(ck: explain.Checkpoint) -> str:
    return str(ck.meta.get("gt", ""))


def plan_of(ck: explain.Checkpoint, root: Path) -> CachePlan:
    """The activation cache the explainer's ground truth was built on (recorded in its checkpoint)."""
    if "plan" not in ck.meta:
        raise UserInputError("explainer", f"checkpoint {ck.path} records no activation cache (trained before it "
                             "was recorded)", "retrain it with the features flow, then bootstrap")  # fmt: skip
    return CachePlan.model_validate({**ck.meta["plan"], "home": str(root)})


def check_recipe(recipe: BootstrapRecipe) -> explain.Checkpoint:
    """The checkpoint, its ground truth and cache in the store, and an auto-interp route this loop can rerun."""
    ck = explain.find_checkpoint(recipe.home, recipe.explainer, recipe.role)
    root = store_root(recipe.home)
    plan = plan_of(ck, root)
    needed = [Dataset(root, t, _gt(ck)) for t in ("features", "feature_labels", "exemplars", "feature_activations")]
    needed.append(activations_dataset(plan))
    for ds in needed:
        if not ds.marked_complete():
            raise UserInputError("explainer", f"its {ds.table} dataset ({ds.key}) is not complete in the store "
                                 f"{root}", "point --home at the store it was trained in")  # fmt: skip
    if label_config(ck, root).labeler != "tokens":
        raise UserInputError("explainer", "its ground truth was labelled by an LLM; the loop reruns only the tokens "
                             "labeler", "bootstrap a tokens-labelled ground truth")  # fmt: skip
    if recipe.simulator != "lexical":
        models.resolve(ModelConfig(name=recipe.simulator))
    return ck


def label_config(ck: explain.Checkpoint, root: Path) -> LabelConfig:
    info = json.loads((Dataset(root, "feature_labels", _gt(ck)).path / "_dataset.json").read_text())
    return LabelConfig.model_validate(info["labels"])


def labels_key(recipe: BootstrapRecipe, ck: explain.Checkpoint) -> str:
    return config_hash(STAGE, STAGE_VERSION, {"explainer": ck.key or str(ck.path), "held_out": recipe.held_out,
                                              "shard_size": recipe.shard_size})  # fmt: skip


def labeler_name(ck: explain.Checkpoint) -> str:
    return f"explainer:{ck.key or ck.path.parent.name}"


def to_describe(root: Path, gt: str, held_out: bool) -> pa.Table:
    """(layer, feature_id, split, direction) of every feature without a label ('unlabelled'), plus the test
    features ('test') with `held_out`, in (layer, feature_id) order."""
    feats = [str(p) for p in Dataset(root, "features", gt).shard_files()]
    labels = [str(p) for p in Dataset(root, "feature_labels", gt).shard_files()]
    return (
        duckdb.connect()
        .sql(
            f"select f.layer, f.feature_id, coalesce(l.split, 'unlabelled') as split, f.direction "
            f"from read_parquet({feats}) f left join read_parquet({labels}) l using (layer, feature_id) "
            f"where l.split is null {'or l.split = ' + repr('test') if held_out else ''} order by all"
        )
        .to_arrow_table()
    )


def describe_features(recipe: BootstrapRecipe, ck: explain.Checkpoint, progress=None) -> dict[str, Any]:
    """Write the explainer's descriptions of `to_describe` as `feature_labels` shards (resumable per shard)."""
    root = store_root(recipe.home)
    out = Dataset(root, "feature_labels", labels_key(recipe, ck))
    if out.complete_or_invalidate():
        return out.summary()
    todo = to_describe(root, _gt(ck), recipe.held_out)
    out.create({"stage": STAGE, "version": STAGE_VERSION, "explainer": ck.key, "gt": _gt(ck)})
    n_shards = -(-todo.num_rows // recipe.shard_size)
    explainer = None  # loaded only when a shard is left to describe
    for shard in range(n_shards):
        timing = out.path / f"timing-{shard:05d}.json"
        if out.shard_done(shard) and timing.exists():
            continue
        part = todo.slice(shard * recipe.shard_size, recipe.shard_size)
        explainer = explainer or ex.Explainer.load(ck.path)
        directions = np.stack(part.column("direction").to_numpy(zero_copy_only=False)).astype(np.float32)  # [n, d]
        start = time.perf_counter()
        said = explain.describe(explainer, directions, part.column("layer").to_pylist())
        seconds = time.perf_counter() - start
        out.write_shard(shard, lab.label_table(part.column("layer").to_pylist(), part.column("feature_id").to_pylist(),
                                               said, labeler_name(ck), part.column("split").to_pylist()))  # fmt: skip
        timing.write_text(json.dumps({"features": part.num_rows, "seconds": seconds}))
        if progress:
            progress((shard + 1) / n_shards, f"{min(todo.num_rows, (shard + 1) * recipe.shard_size)} described")
    timings = [json.loads(p.read_text()) for p in sorted(out.path.glob("timing-*.json"))]
    seconds = sum(t["seconds"] for t in timings)
    summary = {"described": todo.num_rows, "unlabelled": sum(s == "unlabelled" for s in todo.column("split").to_pylist()),
               "seconds": seconds, "seconds_per_feature": seconds / max(1, todo.num_rows)}  # fmt: skip
    out.mark_complete(summary)
    return summary


def run_id(recipe: BootstrapRecipe, ck: explain.Checkpoint) -> str:
    return "bootstrap-" + config_hash(
        "bootstrap-score", SCORE_VERSION,
        {"labels": labels_key(recipe, ck), "n_sample": recipe.n_sample, "min_contexts": recipe.min_contexts,
         "simulator": recipe.simulator, "seed": recipe.seed},
    )  # fmt: skip


def auto_interp(root: Path, gt: str, plan: CachePlan, target: ModelConfig, cfg: LabelConfig, sample: pa.Table,
                n_exemplars: int) -> tuple[dict[tuple[int, int], str], float]:  # fmt: skip
    """The auto-interp route on `sample` (layer, feature_id), timed: exemplar mining over the sparse feature
    activations, then the tokens labeler. ({(layer, feature_id): label}, seconds)."""
    fa = [str(p) for p in Dataset(root, "feature_activations", gt).shard_files()]
    tokenizer = models.load_tokenizer(target)  # set-up, as loading the explainer is: outside both timings
    start = time.perf_counter()
    con = duckdb.connect()
    con.register("sample", sample)
    con.execute(
        f"create temp view sampled as select a.* from read_parquet({fa}) a join sample using (layer, feature_id)"
    )
    con.sql(exemplars_sql([], n_exemplars, relation="sampled")).fetchall()
    table = lab.tokens_labels(root, gt, [str(p) for p in activations_dataset(plan).shard_files()], tokenizer, cfg,
                              sample)  # fmt: skip
    seconds = time.perf_counter() - start
    return dict(zip(zip(table.column("layer").to_pylist(), table.column("feature_id").to_pylist(), strict=True),
                    table.column("label").to_pylist(), strict=True)), seconds  # fmt: skip


def score_sample(recipe: BootstrapRecipe, ck: explain.Checkpoint, rid: str) -> tuple[list[Metric], list[Prediction]]:
    """Score a seeded sample of the described features: the explainer's labels and auto-interp's, side by side."""
    root = store_root(recipe.home)
    gt, plan = _gt(ck), plan_of(ck, root)
    described = Dataset(root, "feature_labels", labels_key(recipe, ck))
    ex_files = [str(p) for p in Dataset(root, "exemplars", gt).shard_files()]
    con = duckdb.connect()
    rows = con.execute(
        f"select d.layer, d.feature_id, d.label, list(e.context_id order by e.rank) as contexts, f.direction "
        f"from read_parquet({[str(p) for p in described.shard_files()]}) d "
        f"join read_parquet({ex_files}) e using (layer, feature_id) "
        f"join read_parquet({[str(p) for p in Dataset(root, 'features', gt).shard_files()]}) f using (layer, feature_id) "
        f"group by all having count(*) >= {recipe.min_contexts} order by d.layer, d.feature_id"
    ).fetchall()  # fmt: skip
    if not rows:
        raise UserInputError("min_contexts", f"no described feature has {recipe.min_contexts} exemplar contexts to "
                             "be scored on", "lower min_contexts")  # fmt: skip
    pick = np.sort(np.random.default_rng(recipe.seed).permutation(len(rows))[: recipe.n_sample])
    rows = [rows[i] for i in pick]
    sample = pa.table({"layer": pa.array([r[0] for r in rows], pa.int16()),
                       "feature_id": pa.array([r[1] for r in rows], pa.int32())})  # fmt: skip
    n_exemplars = max(len(r[3]) for r in rows)
    auto, auto_seconds = auto_interp(root, gt, plan, ck.target(), label_config(ck, root), sample, n_exemplars)
    items = [EvalItem(f"{r[0]}/{r[1]}", int(r[0]), np.asarray(r[4], dtype=np.float32), list(r[3]), None, "sample")
             for r in rows]  # fmt: skip
    caches = {layer: LayerCache(plan, layer) for layer in sorted({it.layer for it in items})}
    texts = ContextTexts(root, plan.tokens_key)
    sim = None if recipe.simulator == "lexical" else LMSimulator(recipe.simulator)
    said = {"trained": [r[2] for r in rows], "auto_interp": [auto.get((r[0], r[1]), "") for r in rows]}
    explainer_model = ck.meta["config"]["model"]["name"]
    target = ck.target().name
    n_train = int(ck.meta.get("n_train", 0))
    metrics, predictions = [], []
    truths = exemplar_truth(items, caches, texts)
    for method, labels in said.items():
        scores = score_items(truths, labels, sim)
        metrics.append(Metric(rid, STAGE, target, explainer_model, method, n_train, recipe.seed, "sample",
                              "simulator_corr", *mean_se(scores)))  # fmt: skip
        predictions += [Prediction(rid, STAGE, it.example_id, explainer_model, method, "sample", label, "", score)
                        for it, label, score in zip(items, labels, scores, strict=True)]  # fmt: skip
    summary = described.summary()
    per_feature = {"trained": summary["seconds_per_feature"], "auto_interp": auto_seconds / len(rows)}
    metrics += [Metric(rid, STAGE, target, explainer_model, m, n_train, recipe.seed, "cost", "seconds_per_feature",
                       s, 0.0, summary["described"] if m == "trained" else len(rows)) for m, s in per_feature.items()]  # fmt: skip
    # The cost side of the claim as one number: auto-interp's seconds per feature over the explainer's (above 1,
    # the explainer is the cheaper route).
    metrics.append(Metric(rid, STAGE, target, explainer_model, "trained", n_train, recipe.seed, "cost",
                          "speedup_over_auto_interp", per_feature["auto_interp"] / per_feature["trained"], 0.0,
                          summary["described"]))  # fmt: skip
    labelled = Dataset(root, "feature_labels", gt).summary()["labelled"]
    n_features = con.execute(f"select count(*) from read_parquet({[str(p) for p in Dataset(root, 'features', gt).shard_files()]})").fetchone()[0]  # fmt: skip
    for metric, value in (("features", n_features), ("auto_interp_labelled", labelled),
                          ("explainer_described", summary["described"]),
                          ("coverage", (labelled + summary["unlabelled"]) / n_features)):  # fmt: skip
        metrics.append(Metric(rid, STAGE, target, explainer_model, "trained", n_train, recipe.seed, "coverage",
                              metric, float(value), 0.0, n_features))  # fmt: skip
    return metrics, predictions


@stage_task("bootstrap-describe", gpu=True,
            output=lambda p: Dataset(store_root(p["recipe"].home), "feature_labels", labels_key(p["recipe"], p["ck"])))  # fmt: skip
def describe_task(recipe: BootstrapRecipe, ck: explain.Checkpoint) -> dict[str, Any]:
    """The explainer describes every feature without a label (and the held-out ones with `held_out`)."""
    return describe_features(recipe, ck, progress_reporter("bootstrap-describe", "explainer descriptions"))


@stage_task("bootstrap-score", output=lambda p: Dataset(store_root(p["recipe"].home), "metrics", p["rid"]))
def score_task(recipe: BootstrapRecipe, ck: explain.Checkpoint, rid: str) -> dict[str, Any]:
    """Score a sample of the descriptions beside the auto-interp route; write metrics, predictions, runs."""
    root = store_root(recipe.home)
    if done := recorded(root, rid):
        return done
    started = time.time()
    metrics, predictions = score_sample(recipe, ck, rid)
    return record_run(
        root, "bootstrap", recipe, rid, metrics, predictions, started, f"{STAGE}-v{STAGE_VERSION}.{SCORE_VERSION}"
    )
