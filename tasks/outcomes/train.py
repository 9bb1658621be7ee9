"""Tasks B and C after the ground truth, training (paper §4.5-4.8, §5.3): each role's explainer learns the train
rows of its task's ground truth (a seeded `n_train` sample) with the paper's templates and target sentences;
patching questions carry v as a continuous token, ablation questions none. Where questions carry a vector, the
roles in `omission_roles` also get an explainer per `prompt_omissions` entry, trained with one part of every
template removed (the span, "- activation": what the text alone predicts; the layer string; the token string),
and the roles in `rotated_basis_roles` one that reads Qv.
"""

from typing import Any

from storage.errors import UserInputError
from storage.hashing import config_hash
from storage.store import Dataset, store_root
from tasks.common.orchestration import complete_or, progress_reporter, stage_task
from tasks.explainer import model as ex
from tasks.explainer.train import train_to_checkpoint
from tasks.outcomes.protocol import load_rows
from tasks.outcomes.registry import OutcomeRecipe, task_of

STAGE_VERSION = 3  # explainer checkpoints (2: Π_ℓ for every ground-truth layer; 3: they record their steps)


def question_mode(variant: str) -> str:
    """How an explainer's questions are put: its prompt omission, or the trained prompts (the rotated-basis
    control changes what the explainer reads, not what it is asked)."""
    return "trained" if variant == ex.ROTATED else variant


def explainer_key(recipe: OutcomeRecipe, role: str, variant: str) -> str:
    ev = recipe.eval
    return config_hash(
        "outcome-explainer", STAGE_VERSION,
        {"gt": task_of(recipe).ground_truth(recipe).key, "role": role, "variant": variant,
         "cfg": recipe.explainers[role], "n_train": ev.n_train, "seed": ev.seed,
         "max_prompt_tokens": ev.max_prompt_tokens},
    )  # fmt: skip


def explainer_dataset(recipe: OutcomeRecipe, role: str, variant: str) -> Dataset:
    return Dataset(store_root(recipe.home), "explainers", explainer_key(recipe, role, variant))


def train_outcome_explainer(recipe: OutcomeRecipe, role: str, variant: str, progress=None) -> dict[str, Any]:
    """Fine-tune the explainer of `role` on the train rows; checkpoint under tables/explainers/<key>."""
    out = explainer_dataset(recipe, role, variant)

    def fit_explainer() -> dict[str, Any]:
        task, cfg, ev = task_of(recipe), recipe.explainers[role], recipe.eval
        gt = task.ground_truth(recipe)
        rows = load_rows(gt, "train", ev.n_train, ev.seed)

        def make_queries(e: ex.Explainer) -> list[ex.Query]:
            qs = task.queries(rows, question_mode(variant), cfg.seed, with_answer=True)
            eos = e.tokenizer.eos_token
            # The paper's filters: no continuation holding the explainer's EOS; prompts up to max_prompt_tokens.
            kept = [q for q in qs if eos not in q.answer and len(e.prompt_ids(q)) <= ev.max_prompt_tokens]
            if qs and not kept:
                raise UserInputError("eval.max_prompt_tokens", f"every training prompt is longer than "
                                     f"{ev.max_prompt_tokens} explainer tokens", "raise it")  # fmt: skip
            return kept

        d_target, n_layers = task.dims(gt)
        meta = {"role": role, "variant": variant, "task": task.name, "gt": gt.key, "target": recipe.target.model_dump()}
        stats = (lambda: task.vector_stats(gt)) if task.carries_vector else None
        fit = (lambda e: task.projection_fit(recipe, gt, e)) if task.carries_vector else None
        return train_to_checkpoint(out, cfg, d_target, n_layers, make_queries, meta, progress,
                                      ex.rotation_seed(cfg, variant), fit, stats)  # fmt: skip

    return complete_or(out, fit_explainer)


@stage_task(
    "train-outcome-explainer", gpu=True, output=lambda p: explainer_dataset(p["recipe"], p["role"], p["variant"])
)
def train_outcome_explainer_task(recipe: OutcomeRecipe, role: str, variant: str) -> dict[str, Any]:
    """Fine-tune one explainer of outcomes on the train rows."""
    task = task_of(recipe).name
    progress = progress_reporter(f"train-{task}-explainer-{role}-{variant}".replace("_", "-"),
                                 f"training the {role} {task} explainer ({variant})")  # fmt: skip
    return train_outcome_explainer(recipe, role, variant, progress)
