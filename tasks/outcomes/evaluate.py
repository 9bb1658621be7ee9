"""Tasks B and C after training: every method on the same test rows (a seeded `n_test` sample of the test
split), scored against the task's gold answers (paper §4.5-4.8, §5.3).

  trained          the fine-tuned explainer
  zero_vector      questions with a vector: the trained explainer, same prompts, v = 0 (does it read v at all?)
  shuffled_vector  the same, with the vector of another test row of the same chunk
  no_activation    the explainer trained without v (no_layer, no_token likewise)
  rotated_basis    an explainer trained and asked as usual, reading Qv (Q a fixed random rotation)
  zero_shot        the explainer's untrained model with the paper's baseline prompt (App. H.2 / H.3)
  majority         the most frequent target sentence of the train rows
  position_bias    ablation: the majority flag plus the target's most frequent no-hint letter in train
  correct_answer   ablation: the majority flag plus the question's correct letter (a hint-blind model that knows)
Metrics (tasks.outcomes.answers.score): exact_match, has_changed_f1, content_match with SEs, parse_rate,
strict_exact_match (whole-string, to compare with the paper's untrained rows), and exact_match per gold class.
"""

import time
from pathlib import Path
from typing import Any

import numpy as np

from storage.hashing import config_hash
from storage.store import Dataset, store_root
from tasks.common import models
from tasks.common.orchestration import stage_task
from tasks.common.results import Metric, Prediction, record_run, recorded
from tasks.explainer import model as ex
from tasks.explainer.config import ExplainerConfig
from tasks.outcomes.answers import item_exact_match, score, target
from tasks.outcomes.protocol import load_rows
from tasks.outcomes.registry import OutcomeRecipe, task_of
from tasks.outcomes.train import STAGE_VERSION, explainer_key, question_mode

EVAL_VERSION = 2  # evaluation only: bumping it re-scores without retraining (2: outputs keep their ">>>.")


def evaluation_run_id(recipe: OutcomeRecipe) -> str:
    """Deterministic run id: a rerun of the same recipe finds its results instead of duplicating rows."""
    task = task_of(recipe)
    keys = {f"{r}/{v}": explainer_key(recipe, r, v) for r, v in task.variants(recipe)}
    return f"{task.name}-" + config_hash(
        f"{task.name}-eval", EVAL_VERSION,
        {"gt": task.ground_truth(recipe).key, "explainers": keys, "eval": recipe.eval, "target": recipe.target},
    )  # fmt: skip


def zero_shot(recipe: OutcomeRecipe, role: str, test: list[dict[str, Any]], dims: tuple[int | None, int]) -> list[str]:
    """The untrained model of `role`'s explainer, asked with the paper's baseline prompt."""
    cfg: ExplainerConfig = recipe.explainers[role]
    untrained = ex.Explainer(
        models.load(cfg.model, frozen=True), dims[0], dims[1], cfg.model_copy(update={"finetune": "full"})
    )
    qs = task_of(recipe).queries(test, "zero_shot", recipe.eval.seed, with_answer=False)
    return untrained.generate(qs, cfg.max_new_tokens, cfg.eval_batch_size)


def evaluate(
    recipe: OutcomeRecipe, checkpoints: dict[str, str], run_id: str, progress=None
) -> tuple[list[Metric], list[Prediction]]:
    """Every method on the same test rows; `checkpoints` maps 'role/variant' to an explainer dataset path."""
    task, ev = task_of(recipe), recipe.eval
    gt = task.ground_truth(recipe)
    train = load_rows(gt, "train", ev.n_train, ev.seed)
    test = load_rows(gt, "test", ev.n_test, ev.seed)
    dims = task.dims(gt)
    outputs: dict[tuple[str, str], list[str]] = {}  # (method, explainer model) -> one output per test row
    steps: list[Metric] = []  # the optimizer steps of every trained explainer, reported with its results
    n_used: dict[tuple[str, str], int] = {}
    for method, texts in task.baselines(train, test).items():
        outputs[(method, "")] = texts
        n_used[(method, "")] = len(train)
    for name, path in checkpoints.items():
        role, variant = name.split("/")
        explainer = ex.Explainer.load(Path(path) / "checkpoint")
        cfg = recipe.explainers[role]
        meta = ex.Explainer.meta(Path(path) / "checkpoint")
        n_train = int(meta["n_train"])
        steps += [Metric(run_id, task.name, recipe.target.name, cfg.model.name, variant, n_train, ev.seed, "train",
                         metric, value, 0.0, n_train) for metric, value in ex.Explainer.step_counts(Path(path) / "checkpoint")]  # fmt: skip
        control = task.carries_vector and variant == "trained" and ev.vector_controls
        # (method, how its questions are put): the variant itself, then the trained explainer's controls
        methods = [(variant, question_mode(variant))] + (
            [(c, c) for c in ("zero_vector", "shuffled_vector")] if control else []
        )
        for method, mode in methods:
            qs = task.queries(test, mode, ev.seed, with_answer=False)
            outputs[(method, cfg.model.name)] = explainer.generate(qs, cfg.max_new_tokens, cfg.eval_batch_size)
            n_used[(method, cfg.model.name)] = n_train
        del explainer
        if progress:
            progress(f"{name} explainer decoded {len(test)} test rows")
    if ev.zero_shot:
        for role, cfg in recipe.explainers.items():
            outputs[("zero_shot", cfg.model.name)] = zero_shot(recipe, role, test, dims)
            n_used[("zero_shot", cfg.model.name)] = 0

    gold = [task.gold(r) for r in test]
    references = [target(*g) for g in gold]
    changed = np.array([g[0] for g in gold])
    ids = [task.example_id(r) for r in test]
    metrics, predictions = steps, []
    for (method, model), texts in outputs.items():
        m = dict(run_id=run_id, task=task.name, target_model=recipe.target.name, explainer_model=model, method=method,
                 n_train=n_used[(method, model)], seed=ev.seed)  # fmt: skip
        s = score(texts, changed.tolist(), [g[1] for g in gold], ev.seed)
        for name, value, se in (("exact_match", s.exact_match, s.se_exact_match),
                                ("has_changed_f1", s.has_changed_f1, s.se_has_changed_f1),
                                ("content_match", s.content_match, s.se_content_match),
                                ("strict_exact_match", s.strict_exact_match, s.se_strict_exact_match),
                                ("parse_rate", s.parse_rate, 0.0)):  # fmt: skip
            metrics.append(Metric(**m, split="test", metric=name, value=value, se=se, n=s.n))
        per_item = item_exact_match(texts, gold)
        for cls, label in ((True, "test:changed"), (False, "test:unchanged")):
            hits = per_item[changed == cls]
            if len(hits):
                se = float(np.sqrt(hits.mean() * (1 - hits.mean()) / len(hits)))
                metrics.append(Metric(**m, split=label, metric="exact_match", value=float(hits.mean()), se=se,
                                      n=len(hits)))  # fmt: skip
        for example, text, ref, hit in zip(ids, texts, references, per_item, strict=True):
            predictions.append(Prediction(run_id, task.name, example, model, method, "test", text, ref, float(hit)))
    return metrics, predictions


@stage_task(
    "evaluate-outcomes", gpu=True, output=lambda p: Dataset(store_root(p["recipe"].home), "metrics", p["run_id"])
)
def evaluate_outcomes_task(recipe: OutcomeRecipe, checkpoints: dict[str, str], run_id: str) -> dict[str, Any]:
    """Score every method; write `metrics`, `predictions`, `runs`; publish a table artifact."""
    from prefect.logging import get_run_logger

    if done := recorded(store_root(recipe.home), run_id):
        return done
    started = time.time()
    metrics, predictions = evaluate(recipe, checkpoints, run_id, get_run_logger().info)
    task = task_of(recipe).name
    return record_run(store_root(recipe.home), task, recipe, run_id, metrics, predictions, started,
                      f"{task}-v{STAGE_VERSION}.{EVAL_VERSION}")  # fmt: skip
