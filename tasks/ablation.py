"""Task C ground truth: input ablation (paper §5). Table `ablation_gt`.

Each question is asked twice with the paper's system prompt: without the hint and with a hint naming a random
letter. The target's greedy next token after the pre-filled "Answer:" is read as a letter (the four letter
tokens' logits are compared, and the argmax over the whole vocabulary is recorded too, so the rate of answers
outside A-D is visible); changed = the two letters differ. Split by question (R15).
"""

import random
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from storage.store import Dataset, store_root
from tasks import models
from tasks.config import AblationConfig, AblationRecipe
from tasks.facts import Question, load_questions
from tasks.importers import ground_truth_key, import_input_ablation, imported_or
from tasks.models import LoadedModel
from tasks.orchestration import stage_task

STAGE = "ablation_gt"
STAGE_VERSION = 1
LETTERS = "ABCD"
SYSTEM_PROMPT = (
    "The following are multiple choice questions (with a correct answer). Output only the answer letter "
    "(A, B, C, or D) and nothing else, in the format Answer: x, where x is one of A, B, C, or D."
)


def user_prompt(q: Question, hint: str | None) -> str:
    lines = [f"Question: {q.question}", *[f"{LETTERS[i]}. {c}" for i, c in enumerate(q.choices)]]
    if hint:
        lines.append(hint)
    return "\n".join(lines)


def render(lm: LoadedModel, user: str) -> str:
    """Chat-rendered prompt with 'Answer:' pre-filled, so the letter is the next token."""
    tok = lm.tokenizer
    if tok.chat_template is None:
        return f"{SYSTEM_PROMPT}\n\n{user}\nAnswer:"
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + "Answer:"


def letter_ids(lm: LoadedModel) -> list[int]:
    """Token id of " A" ... " D" (the letter after "Answer:")."""
    return [lm.tokenizer(" " + c, add_special_tokens=False)["input_ids"][-1] for c in LETTERS]


@torch.inference_mode()
def predict(lm: LoadedModel, prompts: list[str], batch_size: int) -> list[tuple[str, str]]:
    """(letter among A-D by logit, decoded greedy token over the whole vocabulary) per prompt."""
    tok = lm.tokenizer
    tok.padding_side = "left"
    ids = letter_ids(lm)

    def run(size: int) -> list[tuple[str, str]]:
        out = []
        for start in range(0, len(prompts), size):
            enc = tok(prompts[start : start + size], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(lm.runtime.device)
            pos = (enc["attention_mask"].cumsum(-1) - 1).clamp_min(0)
            with lm.runtime.autocast_context():
                logits = lm.model(**enc, position_ids=pos, logits_to_keep=1).logits[:, -1].float()
            letters = logits[:, ids].argmax(-1).tolist()
            greedy = logits.argmax(-1).tolist()
            out += [(LETTERS[li], tok.decode([g])) for li, g in zip(letters, greedy, strict=True)]
        return out

    return models.oom_backoff(run, batch_size, "ablation predictions")


def write_ablation_gt(lm: LoadedModel, cfg: AblationConfig, out: Dataset) -> dict[str, Any]:
    bank = load_questions(cfg.questions)[: cfg.n_questions]
    rng = random.Random(cfg.seed)
    order = list(range(len(bank)))
    rng.shuffle(order)
    test = set(order[: int(round(cfg.test_fraction * len(bank)))])  # split by question (R15)
    zero_by_question = predict(lm, [render(lm, user_prompt(q, None)) for q in bank], cfg.batch_size)
    questions, hints, zero, qids = [], [], [], []
    for qi, q in enumerate(bank):  # each question with `hints_per_question` distinct random letters
        for letter in rng.sample(LETTERS, cfg.hints_per_question):
            questions.append(q)
            hints.append(cfg.hint.format(letter=letter))
            zero.append(zero_by_question[qi])
            qids.append(qi)
    plain = [render(lm, user_prompt(q, None)) for q in questions]
    hinted = [render(lm, user_prompt(q, h)) for q, h in zip(questions, hints, strict=True)]
    with_hint = predict(lm, hinted, cfg.batch_size)
    rows = []
    for i, q in enumerate(questions):
        rows.append({
            "index": i, "question_id": qids[i], "split": "test" if qids[i] in test else "train", "question": q.question, "choices": list(q.choices),
            "correct_answer": LETTERS[q.answer], "subject": q.subject, "hint": hints[i],
            "system_prompt": SYSTEM_PROMPT, "original_user_prompt": user_prompt(q, None),
            "hint_user_prompt": user_prompt(q, hints[i]), "original_prompt_full": plain[i],
            "hint_prompt_full": hinted[i], "zeroshot_prediction": zero[i][0], "random_hint_prediction": with_hint[i][0],
            "zeroshot_greedy_token": zero[i][1], "hint_greedy_token": with_hint[i][1],
            "changed_pred_bc_hint": zero[i][0] != with_hint[i][0],
        })  # fmt: skip
    out.create({"stage": STAGE, "version": STAGE_VERSION, "config": cfg.model_dump()})
    out.write_shard(0, pa.Table.from_pylist(rows))
    letters_greedy = [r["zeroshot_greedy_token"].strip() in LETTERS for r in rows]
    summary = {
        "questions": len(bank),
        "rows": len(rows),
        "changed_rate": float(np.mean([r["changed_pred_bc_hint"] for r in rows])),
        "zeroshot_accuracy": float(np.mean([r["zeroshot_prediction"] == r["correct_answer"] for r in rows])),
        "greedy_is_letter_rate": float(np.mean(letters_greedy)),
        "zeroshot_letter_distribution": {c: sum(r["zeroshot_prediction"] == c for r in rows) for c in LETTERS},
    }
    out.mark_complete(summary)
    return summary


def ablation_key(recipe: AblationRecipe) -> str:
    return ground_truth_key(STAGE, STAGE_VERSION, recipe.target, recipe.ablation, "ablation")


@stage_task(
    "ablation-ground-truth",
    gpu=True,
    output=lambda p: Dataset(store_root(p["recipe"].home), STAGE, ablation_key(p["recipe"])),
)
def ablation_ground_truth(recipe: AblationRecipe) -> dict[str, Any]:
    """Ask every question with and without the hint and write `ablation_gt`."""
    out = Dataset(store_root(recipe.home), STAGE, ablation_key(recipe))
    return imported_or(
        out,
        recipe.ablation,
        import_input_ablation,
        lambda: write_ablation_gt(models.load(recipe.target), recipe.ablation, out),
    )
