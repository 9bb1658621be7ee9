"""Stage `calibrate`: can an explainer read a vector at all, and through which injection?

The cleanest readout there is: v = the target's residual at layer ℓ at the position of a token t in a corpus
context, answer `the token "t"`. Nothing but v tells the explainer which token it is, so exact match with v
against the same prompts with v = 0 and with shuffled v (the vector of another test item of the same layer)
says whether, and how well, the vector is read. It runs in minutes, so it is the first thing to run on a new
target/explainer pair and the way an injection mode (`explainer.injection`) is chosen.

Token *types* are split into train and test by a seeded draw (`calibration.split: types`): every test token is
one the explainer was never trained to name, so a high score cannot be a memorised vector → label table.
`split: occurrences` holds out occurrences instead (the test asks for tokens trained on in other contexts). Types are drawn uniformly (then one
occurrence each), so frequent tokens do not fill the sets.

Each injection mode in `calibration.injections` is its own trained explainer and its own run
(`calibration-<mode>-<hash>`); metrics rows are task 'calibration', metric 'exact_match', methods 'trained',
'zero_vector', 'shuffled_vector' and 'zero_shot' (the untrained explainer), split 'test' (all layers) and
'layer_<ℓ>'. For shuffled v, metric 'follows_vector' is the share of answers that name the *donor's* token.
"""

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from storage.errors import UserInputError
from storage.hashing import config_hash
from storage.store import Dataset
from tasks.common import models
from tasks.common.activations import CachePlan, activations_dataset, plan_cache
from tasks.common.corpus import ContextTexts
from tasks.common.orchestration import complete_or, progress_reporter, stage_task
from tasks.common.results import Metric, Prediction, record_run, recorded
from tasks.explainer import model as ex
from tasks.explainer.config import CalibrateRecipe, ExplainerConfig
from tasks.explainer.projection import LayerStats, fit_projection, residual_stats
from tasks.explainer.train import train_to_checkpoint
from tasks.features.sae import layer_activations
from tasks.features.simulate import mean_se

STAGE = "calibrate"
STAGE_VERSION = 1
FITTED = "embedding_fitted"  # the mode of calibration.injections with a fitted Π
TEMPLATE_CHAT = "Which token is {feature} at layer {layer}?"
TEMPLATE_BASE = "At layer {layer}, {feature} encodes "


def answer(token: str) -> str:
    return f'the token "{token}"'


@dataclass(frozen=True)
class Item:
    """One residual to name: target layer, vector [d], the token it sits on."""

    example_id: str
    layer: int
    vector: np.ndarray
    token: str


def check_recipe(recipe: CalibrateRecipe) -> CachePlan:
    """Validate before anything runs: the cache part, the explainer's model, the injection site."""
    if recipe.explainer.readout_steps:
        raise UserInputError("explainer.readout_steps", "calibration is the readout itself: a warm-up on it "
                             "would train on what it tests", "set it to 0")  # fmt: skip
    plan = plan_cache(recipe.cache_recipe())
    try:
        models.resolve(recipe.explainer.model)
    except UserInputError as err:
        raise UserInputError("explainer.model.name", err.problem, err.fix) from None
    d_target = models.load_config(recipe.target).hidden_size
    for injection in recipe.calibration.injections:
        ex.check_injection(
            explainer_config(recipe, injection), recipe.cache.layers, plan.n_layers, d_target, "explainer"
        )
    return plan


def token_strings(tokenizer: Any, token_ids: np.ndarray, max_chars: int) -> dict[int, str]:
    """{token id: its text, stripped} for the ids that can be named unambiguously inside `the token "..."`:
    printable, not blank, no quote or backslash, at most `max_chars` characters."""
    out = {}
    for tid in np.unique(token_ids):
        text = tokenizer.decode([int(tid)]).strip()
        if text and text.isprintable() and '"' not in text and "\\" not in text and len(text) <= max_chars:
            out[int(tid)] = text
    return out


def split_items(
    token_id: np.ndarray, vectors: np.ndarray, layer: int, names: dict[int, str], n_train: int, n_test: int,
    test_fraction: float, seed: int, split: str = "types",
) -> tuple[list[Item], list[Item]]:  # fmt: skip
    """(train, test) items of one layer, types drawn uniformly, an occurrence at random for each item.

    split 'types': token types split by a seeded draw (the same for every layer, so no test type is trained at
    another layer). 'occurrences': every type may be trained on, and each test item is an occurrence no
    training item uses (it tests reading v, not naming a token never trained on)."""
    types = np.array(sorted(names))
    held_out = np.random.default_rng(seed).random(len(types)) < test_fraction
    rng = np.random.default_rng([seed, layer])
    where = {int(t): np.flatnonzero(token_id == t) for t in types}
    where = {t: rows for t, rows in where.items() if len(rows)}
    if split == "types":
        test_types = [int(t) for t, h in zip(types, held_out, strict=True) if h and int(t) in where]
        train_types = [int(t) for t, h in zip(types, held_out, strict=True) if not h and int(t) in where]
    else:
        test_types = [t for t, rows in where.items() if len(rows) > 1]  # one occurrence left for training
        train_types = list(where)
    if not train_types or not test_types:
        raise UserInputError("corpus.n_tokens", f"layer {layer}: too few distinct tokens to split", "cache more tokens")
    test_rows = {int(t): int(rng.choice(where[int(t)])) for t in rng.permutation(test_types)[:n_test]}
    test = [Item(f"test-{layer}-{k}", layer, vectors[row].astype(np.float32), names[t])
            for k, (t, row) in enumerate(test_rows.items())]  # fmt: skip
    train = []
    for k, t in enumerate(rng.choice(train_types, size=n_train)):
        row = int(rng.choice(where[int(t)][where[int(t)] != test_rows.get(int(t), -1)]))
        train.append(Item(f"train-{layer}-{k}", layer, vectors[row].astype(np.float32), names[int(t)]))
    return train, test


def calibration_items(recipe: CalibrateRecipe, plan: CachePlan) -> tuple[list[Item], list[Item]]:
    """(train, test) over every cached layer; n_train spread evenly across layers, n_test per layer."""
    cal = recipe.calibration
    tokenizer = models.load_tokenizer(recipe.target)
    acts = activations_dataset(plan)
    train, test = [], []
    per_layer = -(-cal.n_train // len(recipe.cache.layers))
    for layer in recipe.cache.layers:
        data = layer_activations(acts, layer)
        names = token_strings(tokenizer, data["token_id"], cal.max_token_chars)
        tr, te = split_items(data["token_id"], data["activation"], layer, names, per_layer, cal.n_test,
                             cal.test_fraction, cal.seed, cal.split)  # fmt: skip
        train += tr
        test += te
    return train[: cal.n_train], test


def queries(items: list[Item], vectors: list[np.ndarray], chat: bool, with_answers: bool) -> list[ex.Query]:
    template = TEMPLATE_CHAT if chat else TEMPLATE_BASE
    return [ex.Query(v, it.layer, template.format(feature=ex.SPAN, layer=it.layer),
                     answer(it.token) if with_answers else None, it.example_id)
            for it, v in zip(items, vectors, strict=True)]  # fmt: skip


def explainer_config(recipe: CalibrateRecipe, injection: str) -> ExplainerConfig:
    """The explainer of one mode of `calibration.injections` ('embedding_fitted': embedding + fitted Π)."""
    if injection == FITTED:
        return recipe.explainer.model_copy(update={"injection": "embedding", "projection": "fitted"})
    return recipe.explainer.model_copy(update={"injection": injection})


def explainer_key(recipe: CalibrateRecipe, plan: CachePlan, injection: str) -> str:
    """Key of one mode's explainer: the cache, the items (not the list of modes: adding one retrains no
    other) and its config."""
    items = recipe.calibration.model_dump(exclude={"injections"})
    return config_hash(STAGE, STAGE_VERSION, {"activations": plan.activations_key, "calibration": items,
                                              "cfg": explainer_config(recipe, injection)})  # fmt: skip


def explainer_dataset(recipe: CalibrateRecipe, plan: CachePlan, injection: str) -> Dataset:
    return Dataset(Path(plan.home), "explainers", explainer_key(recipe, plan, injection))


def train_explainer(recipe: CalibrateRecipe, plan: CachePlan, injection: str, progress=None) -> dict[str, Any]:
    """Train the explainer under one injection mode on the train tokens; checkpoint under tables/explainers."""
    out = explainer_dataset(recipe, plan, injection)

    def fit_explainer() -> dict[str, Any]:
        train, test = calibration_items(recipe, plan)
        target = models.load_config(recipe.target)
        return train_to_checkpoint(
            out, explainer_config(recipe, injection), target.hidden_size, target.num_hidden_layers,
            lambda e: queries(train, [it.vector for it in train], e.chat, with_answers=True),
            {"role": f"calibration/{injection}", "activations": plan.activations_key}, progress,
            fit=lambda e: fit_on_train_types(recipe, plan, e, test),
            stats=lambda: layer_stats(recipe, plan),
        )  # fmt: skip

    return complete_or(out, fit_explainer)


def fit_on_train_types(recipe: CalibrateRecipe, plan: CachePlan, explainer: ex.Explainer, test: list[Item]):
    """The fitted Π of mode 'embedding_fitted': residual inputs (centred by μ_ℓ), fitted on every cached
    position whose token is not a test token (by its stripped text: ' the' goes with 'the'), so the map never
    saw the pairs it is tested on."""
    cfg = recipe.explainer
    tokenizer = models.load_tokenizer(recipe.target)
    layers = {layer: layer_activations(activations_dataset(plan), layer) for layer in recipe.cache.layers}
    tested = {it.token for it in test}
    exclude = {t for data in layers.values() for t, text in token_strings(tokenizer, data["token_id"], 10**6).items()
               if text in tested}  # fmt: skip
    texts = ContextTexts(Path(plan.home), plan.tokens_key)
    return fit_projection(explainer, layers, texts, cfg.fit_ridge, cfg.fit_rows, True, cfg.seed, sorted(exclude))


def layer_stats(recipe: CalibrateRecipe, plan: CachePlan) -> LayerStats:
    """vector_norm 'layer_mean': μ_ℓ, σ_ℓ of every cached layer; the inputs are residuals, centred by μ_ℓ."""
    layers = {layer: layer_activations(activations_dataset(plan), layer) for layer in recipe.cache.layers}
    return residual_stats(layers, residual_inputs=True)


def run_id(recipe: CalibrateRecipe, plan: CachePlan, injection: str) -> str:
    return f"calibration-{injection}-" + config_hash(
        "calibrate-eval", STAGE_VERSION, {"explainer": explainer_key(recipe, plan, injection), "target": recipe.target}
    )


def exact_match(predictions: list[str], items: list[Item]) -> list[float]:
    return [float(p.strip() == answer(it.token)) for p, it in zip(predictions, items, strict=True)]


def evaluate(
    recipe: CalibrateRecipe, plan: CachePlan, injection: str, checkpoint: str, rid: str
) -> tuple[list[Metric], list[Prediction]]:
    """Decode the test tokens with v, v = 0 and shuffled v (trained), and with v untrained; score exact match."""
    _, test = calibration_items(recipe, plan)
    cfg = explainer_config(recipe, injection)
    trained = ex.Explainer.load(Path(checkpoint) / "checkpoint")
    steps = ex.Explainer.step_counts(Path(checkpoint) / "checkpoint")
    donor = ex.shuffled_donors([it.layer for it in test], recipe.calibration.seed)
    vectors = {
        "trained": [it.vector for it in test],
        "zero_vector": [np.zeros_like(it.vector) for it in test],
        "shuffled_vector": [test[donor[i]].vector for i in range(len(test))],
    }
    decoded = {m: trained.generate(queries(test, v, trained.chat, False), cfg.max_new_tokens, cfg.eval_batch_size)
               for m, v in vectors.items()}  # fmt: skip
    del trained
    target = models.load_config(recipe.target)
    untrained = ex.Explainer(models.load(cfg.model, frozen=True), target.hidden_size, target.num_hidden_layers, cfg)
    if untrained.fitted:  # zero-shot through the fitted Π: does the map alone make v readable?
        untrained.set_fitted_projection(fit_on_train_types(recipe, plan, untrained, test))
    if untrained.on_manifold:
        untrained.set_layer_stats(layer_stats(recipe, plan))
    decoded["zero_shot"] = untrained.generate(queries(test, vectors["trained"], untrained.chat, False),
                                              cfg.max_new_tokens, cfg.eval_batch_size)  # fmt: skip
    del untrained
    n_train = recipe.calibration.n_train
    metrics, rows = [], []

    def add(method: str, metric: str, scores: list[float], n_used: int) -> None:
        for split in ["test", *(f"layer_{layer}" for layer in recipe.cache.layers)]:
            idx = [i for i, it in enumerate(test) if split == "test" or split == f"layer_{it.layer}"]
            value, se, n = mean_se([scores[i] for i in idx])
            metrics.append(Metric(rid, "calibration", recipe.target.name, cfg.model.name, method, n_used,
                                  cfg.seed, split, metric, value, se, n))  # fmt: skip

    for method, preds in decoded.items():
        scores = exact_match(preds, test)
        add(method, "exact_match", scores, 0 if method == "zero_shot" else n_train)
        rows += [Prediction(rid, "calibration", it.example_id, cfg.model.name, method, f"layer_{it.layer}", p,
                            answer(it.token), s) for it, p, s in zip(test, preds, scores, strict=True)]  # fmt: skip
    add("shuffled_vector", "follows_vector", exact_match(decoded["shuffled_vector"], [test[j] for j in donor]), n_train)
    metrics += [Metric(rid, "calibration", recipe.target.name, cfg.model.name, "trained", n_train, cfg.seed, "train",
                       metric, value, 0.0, n_train) for metric, value in steps]  # fmt: skip
    return metrics, rows


@stage_task("train-calibration-explainer", gpu=True,
            output=lambda p: explainer_dataset(p["recipe"], p["plan"], p["injection"]))  # fmt: skip
def train_explainer_task(recipe: CalibrateRecipe, plan: CachePlan, injection: str) -> dict[str, Any]:
    """Fine-tune the explainer to name the token under one injection mode."""
    progress = progress_reporter(f"calibrate-train-{injection.replace('_', '-')}", f"calibration: {injection}")
    return train_explainer(recipe, plan, injection, progress)


@stage_task("evaluate-calibration", gpu=True, output=lambda p: Dataset(Path(p["plan"].home), "metrics", p["rid"]))
def evaluate_task(recipe: CalibrateRecipe, plan: CachePlan, injection: str, checkpoint: str, rid: str) -> dict:
    """Score one injection mode and its controls; write `metrics`, `predictions`, `runs`."""
    if done := recorded(Path(plan.home), rid):
        return done
    started = time.time()
    metrics, predictions = evaluate(recipe, plan, injection, checkpoint, rid)
    return record_run(Path(plan.home), "calibrate", recipe, rid, metrics, predictions, started,
                      f"{STAGE}-v{STAGE_VERSION}")  # fmt: skip


def summary_table(home: str, run_ids: list[str]) -> list[dict[str, Any]]:
    """Rows of the flow's artifact: one per (injection, split), exact match x100 of each method with its SE."""
    import pyarrow.parquet as pq

    table: dict[tuple[str, str], dict[str, Any]] = {}
    for rid in run_ids:
        injection = rid.split("-")[1]
        for shard in Dataset(Path(home), "metrics", rid).shard_files():
            for m in pq.read_table(shard).to_pylist():
                if m["metric"] == "exact_match":
                    row = table.setdefault((injection, m["split"]), {"injection": injection, "split": m["split"]})
                    row[m["method"]] = f"{100 * m['value']:.1f} ± {100 * m['se']:.1f}"
    return list(table.values())
