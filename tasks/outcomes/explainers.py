"""Tasks B and C after the ground truth: train explainers of outcomes and score them against the baselines
(paper §4.5-4.8, §5.3). Shared by the patching and ablation flows.

Train: each role's explainer learns `patching_gt` / `ablation_gt` train rows (a seeded `n_train` sample) with
the paper's templates and target sentences; patching carries v as a continuous token, ablation none. For
patching, roles in `ablation_roles` also get an explainer per `prompt_ablations` entry, trained with one part
of every template removed: the span ("- activation": what the text alone predicts), the layer string or the
token string.

Evaluate on the test split (a seeded `n_test` sample), every method on the same rows:
  trained        the fine-tuned explainer
  zero_vector    patching: the trained explainer, same prompts, v = 0 (does it read v at all?)
  shuffled_vector  patching: the same, with the vector of another test row of the same chunk
  no_activation  patching: the explainer trained without v (no_layer, no_token likewise)
  rotated_basis  patching: an explainer trained and asked as usual, reading Qv (Q a fixed random rotation)
  zero_shot      the explainer's untrained model with the paper's baseline prompt (App. H.2 / H.3)
  majority       the most frequent target sentence of the train rows
  position_bias  ablation: the majority flag plus the target's most frequent no-hint letter in train
  correct_answer ablation: the majority flag plus the question's correct letter (a hint-blind model that knows)
Metrics (tasks.outcomes.prompts.score): exact_match, has_changed_f1, content_match with SEs, parse_rate,
strict_exact_match (whole-string, to compare with the paper's untrained rows), and exact_match per gold class.
"""

import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from storage.errors import UserInputError
from storage.hashing import config_hash
from storage.store import Dataset, check_store, store_root
from tasks.ablation.config import AblationRecipe
from tasks.ablation.ground_truth import ablation_key
from tasks.common import models
from tasks.common.importers import check_import, import_act_patch, import_input_ablation
from tasks.common.orchestration import progress_reporter, stage_task
from tasks.common.results import Metric, Prediction, record_run, recorded
from tasks.explainer import model as ex
from tasks.explainer.config import ExplainerConfig, check_roles
from tasks.explainer.projection import LayerStats, residual_stats
from tasks.explainer.train import train_to_checkpoint
from tasks.outcomes import prompts as outcomes
from tasks.outcomes.facts import load_facts, load_questions
from tasks.patching.config import PatchingRecipe
from tasks.patching.ground_truth import layer_chunks, make_pairs, patching_key

STAGE_VERSION = 3  # explainer checkpoints (2: Π_ℓ for every ground-truth layer; 3: they record their steps)
EVAL_VERSION = 2  # evaluation only: bumping it re-scores without retraining (2: outputs keep their ">>>.")
OutcomeRecipe = PatchingRecipe | AblationRecipe


def task_name(recipe: OutcomeRecipe) -> str:
    return "patching" if isinstance(recipe, PatchingRecipe) else "ablation"


def ground_truth(recipe: OutcomeRecipe) -> Dataset:
    """The task's ground-truth dataset (built or imported by the flow's first stage)."""
    if isinstance(recipe, PatchingRecipe):
        return Dataset(store_root(recipe.home), "patching_gt", patching_key(recipe))
    return Dataset(store_root(recipe.home), "ablation_gt", ablation_key(recipe))


def check_ground_truth_source(recipe: PatchingRecipe | AblationRecipe) -> None:
    """What the ground-truth stage reads, read now: the fact file (parsed, and paired) and the layer chunks of
    patching, the question file of ablation."""
    if isinstance(recipe, PatchingRecipe):
        layer_chunks(models.load_config(recipe.target).num_hidden_layers, recipe.patching.n_chunks)
        if not make_pairs(load_facts(recipe.patching.facts), recipe.patching):
            raise UserInputError("patching.facts", "no relation offers 5 distinct objects in both splits",
                                 "add facts: 5 or more objects per relation")  # fmt: skip
    elif not load_questions(recipe.ablation.questions):
        raise UserInputError("ablation.questions", f"{recipe.ablation.questions} holds no questions",
                             "give a file with one question per line (or row)")  # fmt: skip


def check_recipe(recipe: OutcomeRecipe) -> None:
    """Validate before anything runs (nothing is written, no weights are loaded): the store, the ground-truth
    source (the files to import, or the target and the fact or question file, unless the ground truth is
    already built), every explainer's model, the role lists."""
    check_store(recipe.home)
    cfg = recipe.patching if isinstance(recipe, PatchingRecipe) else recipe.ablation
    imported: list[dict[str, Any]] = []
    if check_import(cfg.import_train, cfg.import_test, task_name(recipe)):
        importer = import_act_patch if isinstance(recipe, PatchingRecipe) else import_input_ablation
        for name in ("import_train", "import_test"):
            try:
                imported += importer(getattr(cfg, name))
            except UserInputError as err:
                raise UserInputError(f"{task_name(recipe)}.{name}", err.problem, err.fix) from None
    else:
        models.resolve(recipe.target)
        if not ground_truth(recipe).is_complete():
            check_ground_truth_source(recipe)
    # where patching vectors enter (the same for every role): off the imported rows or the target's chunks
    sites = vector_sites(recipe, imported) if isinstance(recipe, PatchingRecipe) else None
    for role, explainer in recipe.explainers.items():
        try:
            models.resolve(explainer.model)
        except UserInputError as err:
            raise UserInputError(f"explainers.{role}.model.name", err.problem, err.fix) from None
        if explainer.projection == "fitted":
            raise UserInputError(f"explainers.{role}.projection", f"'fitted' is fitted on an activation cache, which "
                                 f"the {task_name(recipe)} task does not build", "use projection 'auto' or 'always'")  # fmt: skip
        if explainer.vector_norm == "layer_mean" and isinstance(recipe, AblationRecipe):
            raise UserInputError(f"explainers.{role}.vector_norm", "'layer_mean' writes a vector, and ablation "
                                 "questions carry none", "use 'match'")  # fmt: skip
        if sites is not None:
            ex.check_injection(explainer, *sites, f"explainers.{role}")
    gt = ground_truth(recipe)
    if recipe.eval.n_train is not None and gt.is_complete():  # known only once the ground truth exists
        n = sum(s == "train" for t in gt.iter_shards(columns=["split"]) for s in t.column("split").to_pylist())
        if recipe.eval.n_train > n:
            raise UserInputError("eval.n_train", f"{recipe.eval.n_train} exceeds the {n} training rows of {gt.table}",
                                 f"use at most {n}, or build more ground truth")  # fmt: skip
    check_roles(recipe.eval, recipe.explainers)
    if isinstance(recipe, AblationRecipe):
        for field in ("prompt_ablations", "rotated_basis_roles"):
            if getattr(recipe.eval, field):
                raise UserInputError(f"eval.{field}", "ablation questions carry no vector, layer or token",
                                     "set it to []")  # fmt: skip


def vector_sites(recipe: PatchingRecipe, imported: list[dict[str, Any]]) -> tuple[list[int], int, int]:
    """(the target layers patching vectors are asked about, the target's layer count, its width), as
    `check_injection` takes them: off the imported rows, or off the target's config and the layer chunks (a
    vector is indexed by its chunk's first layer)."""
    if imported:
        firsts = sorted({r["layer"][0] for r in imported})
        n_layers = max(max(r["layer"]) for r in imported) + 1
        return firsts, n_layers, len(imported[0]["intervention_vector"])
    target = models.load_config(recipe.target)
    chunks = layer_chunks(target.num_hidden_layers, recipe.patching.n_chunks)
    return [chunk[0] for chunk in chunks], target.num_hidden_layers, target.hidden_size


def load_rows(gt: Dataset, split: str, cap: int | None, seed: int) -> list[dict[str, Any]]:
    """Rows of one split, in table order; a seeded sample of `cap` of them when there are more (the samples of
    one seed are nested: a smaller cap takes a prefix of the same permutation). Asking to train on more rows
    than the ground truth holds is an error, not a silent cap."""
    rows = [r for t in gt.iter_shards() for r in t.to_pylist() if r["split"] == split]
    if split == "train" and cap is not None and cap > len(rows):
        raise UserInputError("eval.n_train", f"{cap} exceeds the {len(rows)} training rows of {gt.table}",
                             f"use at most {len(rows)}, or build more ground truth")  # fmt: skip
    if cap is not None and cap < len(rows):
        keep = np.random.default_rng(seed).permutation(len(rows))[:cap]
        rows = [rows[i] for i in keep]
    return rows


def target_dims(task: str, gt: Dataset) -> tuple[int | None, int]:
    """(d_target, target layers) read off the ground truth, so imported ground truth of any target works;
    ablation carries no vector (None: the explainer's own width, no projection). The layer count comes from
    every row of both splits: a small training sample need not reach the deepest layer a test row names,
    and Π_ℓ must exist for every ℓ the explainer will be asked about."""
    if task == "ablation":
        return None, 1
    first = next(gt.iter_shards(columns=["intervention_vector"]))  # one shard's vectors give the width
    top = max(max(layers) for t in gt.iter_shards(columns=["layer"]) for layers in t.column("layer").to_pylist())
    return len(first.column("intervention_vector")[0].as_py()), top + 1


def vector_stats(gt: Dataset) -> LayerStats:
    """Where patching vectors lie, for vector_norm 'layer_mean': μ, σ of the train split's chunk-mean vectors
    per chunk (indexed, as Π is, by the chunk's first layer), and c = μ, so what is injected is a vector's
    own part (pairwise cosine ≈ 0.55 raw, ≈ 0.04 centred). No label is read. Vectors taken at position 0, the
    attention sink whose norm is many times the rest, are left out, as the activation cache leaves them out."""
    by_layer: dict[int, list[np.ndarray]] = {}
    for t in gt.iter_shards(columns=["split", "layer", "counterfact_pos", "intervention_vector"]):
        for split, layers, pos, v in zip(*(t.column(c).to_pylist() for c in t.column_names), strict=True):
            by_layer.setdefault(layers[0], [])
            if split == "train" and pos != 0:
                by_layer[layers[0]].append(np.asarray(v, dtype=np.float32))
    if empty := [layer for layer, vs in sorted(by_layer.items()) if not vs]:
        raise UserInputError("explainers.vector_norm", f"'layer_mean' has no training vector off position 0 for "
                             f"the chunk at layer {empty[0]}", "use 'match', or ground truth that trains every chunk")  # fmt: skip
    return residual_stats({layer: {"activation": np.stack(vs)} for layer, vs in by_layer.items()}, True)


def _mode(variant: str) -> str:
    """How an explainer's questions are put: its prompt ablation, or the trained prompts (the rotated-basis
    control changes what the explainer reads, not what it is asked)."""
    return "trained" if variant == ex.ROTATED else variant


def explainer_key(recipe: OutcomeRecipe, role: str, variant: str) -> str:
    ev = recipe.eval
    return config_hash(
        "outcome-explainer", STAGE_VERSION,
        {"gt": ground_truth(recipe).key, "role": role, "variant": variant, "cfg": recipe.explainers[role],
         "n_train": ev.n_train, "seed": ev.seed, "max_prompt_tokens": ev.max_prompt_tokens},
    )  # fmt: skip


def explainer_dataset(recipe: OutcomeRecipe, role: str, variant: str) -> Dataset:
    return Dataset(store_root(recipe.home), "explainers", explainer_key(recipe, role, variant))


def variants(recipe: OutcomeRecipe) -> list[tuple[str, str]]:
    """(role, variant) of every explainer the flow trains: each role, its prompt ablations, its rotated basis."""
    out = [(role, "trained") for role in recipe.explainers]
    if isinstance(recipe, PatchingRecipe):
        out += [(role, v) for role in recipe.eval.ablation_roles for v in recipe.eval.prompt_ablations]
        out += [(role, ex.ROTATED) for role in recipe.eval.rotated_basis_roles]
    return out


def train_outcome_explainer(recipe: OutcomeRecipe, role: str, variant: str, progress=None) -> dict[str, Any]:
    """Fine-tune the explainer of `role` on the train rows; checkpoint under tables/explainers/<key>."""
    out = explainer_dataset(recipe, role, variant)
    if out.is_complete():
        return {"path": str(out.path), **out.summary()}
    task, cfg, ev = task_name(recipe), recipe.explainers[role], recipe.eval
    gt = ground_truth(recipe)
    rows = load_rows(gt, "train", ev.n_train, ev.seed)

    def make_queries(e: ex.Explainer) -> list[ex.Query]:
        qs = outcomes.queries(task, rows, _mode(variant), cfg.seed, with_answer=True)
        eos = e.tokenizer.eos_token
        # The paper's filters: no continuation holding the explainer's EOS; prompts up to max_prompt_tokens.
        kept = [q for q in qs if eos not in q.answer and len(e.prompt_ids(q)) <= ev.max_prompt_tokens]
        if qs and not kept:
            raise UserInputError("eval.max_prompt_tokens", f"every training prompt is longer than "
                                 f"{ev.max_prompt_tokens} explainer tokens", "raise it")  # fmt: skip
        return kept

    d_target, n_layers = target_dims(task, gt)
    meta = {"role": role, "variant": variant, "task": task, "gt": gt.key, "target": recipe.target.model_dump()}
    stats = (lambda: vector_stats(gt)) if task == "patching" else None
    summary = train_to_checkpoint(out, cfg, d_target, n_layers, make_queries, meta, progress,
                                     ex.rotation_seed(cfg, variant), stats=stats)  # fmt: skip
    return {"path": str(out.path), **summary}


def evaluation_run_id(recipe: OutcomeRecipe) -> str:
    """Deterministic run id: a rerun of the same recipe finds its results instead of duplicating rows."""
    keys = {f"{r}/{v}": explainer_key(recipe, r, v) for r, v in variants(recipe)}
    task = task_name(recipe)
    return f"{task}-" + config_hash(
        f"{task}-eval", EVAL_VERSION,
        {"gt": ground_truth(recipe).key, "explainers": keys, "eval": recipe.eval, "target": recipe.target},
    )  # fmt: skip


def baselines(task: str, train: list[dict[str, Any]], test: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Answers that ignore what the explainer is asked about: the most frequent train target; for ablation the
    position bias (the majority flag and the target's most frequent no-hint letter) and the question's correct
    answer with the majority flag (what a model that ignores the hint and knows the answer would say)."""
    golds = [outcomes.gold(task, r) for r in train]
    out = {"majority": [outcomes.target(*Counter(golds).most_common(1)[0][0])] * len(test)}
    if task == "ablation":
        flag = Counter(g[0] for g in golds).most_common(1)[0][0]
        letter = Counter(r["zeroshot_prediction"] for r in train).most_common(1)[0][0]
        out["position_bias"] = [outcomes.target(flag, f"Answer: {letter}")] * len(test)
        out["correct_answer"] = [outcomes.target(flag, f"Answer: {r['correct_answer']}") for r in test]
    return out


def zero_shot(recipe: OutcomeRecipe, role: str, test: list[dict[str, Any]], dims: tuple[int | None, int]) -> list[str]:
    """The untrained model of `role`'s explainer, asked with the paper's baseline prompt."""
    cfg: ExplainerConfig = recipe.explainers[role]
    untrained = ex.Explainer(models.load(cfg.model), dims[0], dims[1], cfg.model_copy(update={"finetune": "full"}))
    qs = outcomes.queries(task_name(recipe), test, "zero_shot", recipe.eval.seed, with_answer=False)
    return untrained.generate(qs, cfg.max_new_tokens, cfg.eval_batch_size)


def evaluate(
    recipe: OutcomeRecipe, checkpoints: dict[str, str], run_id: str, progress=None
) -> tuple[list[Metric], list[Prediction]]:
    """Every method on the same test rows; `checkpoints` maps 'role/variant' to an explainer dataset path."""
    task, ev = task_name(recipe), recipe.eval
    gt = ground_truth(recipe)
    train = load_rows(gt, "train", ev.n_train, ev.seed)
    test = load_rows(gt, "test", ev.n_test, ev.seed)
    dims = target_dims(task, gt)
    outputs: dict[tuple[str, str], list[str]] = {}  # (method, explainer model) -> one output per test row
    steps: list[Metric] = []  # the optimizer steps of every trained explainer, reported with its results
    n_used: dict[tuple[str, str], int] = {}
    for method, texts in baselines(task, train, test).items():
        outputs[(method, "")] = texts
        n_used[(method, "")] = len(train)
    for name, path in checkpoints.items():
        role, variant = name.split("/")
        explainer = ex.Explainer.load(Path(path) / "checkpoint")
        cfg = recipe.explainers[role]
        meta = ex.Explainer.meta(Path(path) / "checkpoint")
        n_train = int(meta["n_train"])
        steps += [Metric(run_id, task, recipe.target.name, cfg.model.name, variant, n_train, ev.seed, "train",
                         metric, value, 0.0, n_train) for metric, value in ex.Explainer.step_counts(Path(path) / "checkpoint")]  # fmt: skip
        control = task == "patching" and variant == "trained" and ev.vector_controls
        # (method, how its questions are put): the variant itself, then the trained explainer's controls
        methods = [(variant, _mode(variant))] + (
            [(c, c) for c in ("zero_vector", "shuffled_vector")] if control else []
        )
        for method, mode in methods:
            qs = outcomes.queries(task, test, mode, ev.seed, with_answer=False)
            outputs[(method, cfg.model.name)] = explainer.generate(qs, cfg.max_new_tokens, cfg.eval_batch_size)
            n_used[(method, cfg.model.name)] = n_train
        del explainer
        if progress:
            progress(f"{name} explainer decoded {len(test)} test rows")
    if ev.zero_shot:
        for role, cfg in recipe.explainers.items():
            outputs[("zero_shot", cfg.model.name)] = zero_shot(recipe, role, test, dims)
            n_used[("zero_shot", cfg.model.name)] = 0

    gold = [outcomes.gold(task, r) for r in test]
    references = [outcomes.target(*g) for g in gold]
    changed = np.array([g[0] for g in gold])
    ids = [outcomes.example_id(task, r) for r in test]
    metrics, predictions = steps, []
    for (method, model), texts in outputs.items():
        m = dict(run_id=run_id, task=task, target_model=recipe.target.name, explainer_model=model, method=method,
                 n_train=n_used[(method, model)], seed=ev.seed)  # fmt: skip
        s = outcomes.score(texts, changed.tolist(), [g[1] for g in gold], ev.seed)
        for name, value, se in (("exact_match", s.exact_match, s.se_exact_match),
                                ("has_changed_f1", s.has_changed_f1, s.se_has_changed_f1),
                                ("content_match", s.content_match, s.se_content_match),
                                ("strict_exact_match", s.strict_exact_match, s.se_strict_exact_match),
                                ("parse_rate", s.parse_rate, 0.0)):  # fmt: skip
            metrics.append(Metric(**m, split="test", metric=name, value=value, se=se, n=s.n))
        per_item = outcomes.item_exact_match(texts, gold)
        for cls, label in ((True, "test:changed"), (False, "test:unchanged")):
            hits = per_item[changed == cls]
            if len(hits):
                se = float(np.sqrt(hits.mean() * (1 - hits.mean()) / len(hits)))
                metrics.append(Metric(**m, split=label, metric="exact_match", value=float(hits.mean()), se=se,
                                      n=len(hits)))  # fmt: skip
        for example, text, ref, hit in zip(ids, texts, references, per_item, strict=True):
            predictions.append(Prediction(run_id, task, example, model, method, "test", text, ref, float(hit)))
    return metrics, predictions


# -- Prefect tasks ----------------------------------------------------------------------------------------


@stage_task(
    "train-outcome-explainer", gpu=True, output=lambda p: explainer_dataset(p["recipe"], p["role"], p["variant"])
)
def train_outcome_explainer_task(recipe: OutcomeRecipe, role: str, variant: str) -> dict[str, Any]:
    """Fine-tune one explainer of outcomes on the train rows."""
    task = task_name(recipe)
    progress = progress_reporter(f"train-{task}-explainer-{role}-{variant}".replace("_", "-"),
                                 f"training the {role} {task} explainer ({variant})")  # fmt: skip
    return train_outcome_explainer(recipe, role, variant, progress)


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
    return record_run(store_root(recipe.home), task_name(recipe), recipe, run_id, metrics, predictions, started,
                      f"{task_name(recipe)}-v{STAGE_VERSION}.{EVAL_VERSION}")  # fmt: skip
