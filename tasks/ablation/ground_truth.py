"""Task C ground truth: input ablation (paper §5). Table `ablation_gt`.

Each question is asked twice with the paper's system prompt: without the hint and with a hint naming a random
letter, "Answer:" pre-filled. The target's answer is read by `ablation.answer_format`:

  letter             the argmax over the four letter tokens after "Answer:" (the paper's reading);
  calibrated_letter  the same log-probabilities minus the target's letter prior, their mean over the train
                     questions asked without a hint (PriDe, Zheng et al. 2024): a small model that says "C" to
                     almost everything still ranks the letters differently per question;
  option_text        the option whose text (" " + text after "Answer:") has the highest mean log-probability
                     per token: the answer read from what the model would say.

The greedy token over the whole vocabulary is recorded too, so the rate of answers outside A-D is visible.
changed = the two answers differ. Split by question (METHOD §5.3).
"""

import random
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from storage.errors import UserInputError
from storage.store import Dataset
from tasks.ablation.config import AblationConfig, AblationRecipe, AnswerFormat
from tasks.common import models
from tasks.common.importers import ground_truth_key, ground_truth_task, read_rows, require_columns, table_row
from tasks.common.models import LoadedModel
from tasks.outcomes.facts import Question, load_questions

STAGE = "ablation_gt"
STAGE_VERSION = 2
LETTERS = "ABCD"
SYSTEM_PROMPT = (
    "The following are multiple choice questions (with a correct answer). Output only the answer letter "
    "(A, B, C, or D) and nothing else, in the format Answer: x, where x is one of A, B, C, or D."
)


# `ablation_gt`, in table order. The builder and the input_ablation importer both build their rows with gt_row, so
# the two cannot drift apart.
COLUMNS = ("index", "question_id", "split", "question", "choices", "correct_answer", "subject", "hint",
           "system_prompt", "original_user_prompt", "hint_user_prompt", "original_prompt_full", "hint_prompt_full",
           "zeroshot_prediction", "random_hint_prediction", "zeroshot_greedy_token", "hint_greedy_token",
           "changed_pred_bc_hint")  # fmt: skip


def gt_row(**values: Any) -> dict[str, Any]:
    """One `ablation_gt` row, every column and only those, in table order."""
    return table_row("ablation_gt", COLUMNS, values)


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


def _left_padded(lm: LoadedModel, seqs: list[list[int]]) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and position_ids [B, T] of token-id lists, left-padded so that every sequence
    ends in the last column."""
    width = max(len(s) for s in seqs)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    return {
        k: v.to(lm.runtime.device) for k, v in (("input_ids", ids), ("attention_mask", mask), ("position_ids", pos))
    }


@torch.inference_mode()
def letter_scores(lm: LoadedModel, prompts: list[str], batch_size: int) -> tuple[np.ndarray, list[str]]:
    """Log-softmax over the four letter tokens after each prompt [n, 4], and each prompt's greedy token over
    the whole vocabulary."""
    tok, ids = lm.tokenizer, letter_ids(lm)
    encoded = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]

    def run(size: int) -> tuple[np.ndarray, list[str]]:
        scores, greedy = [], []
        for start in range(0, len(encoded), size):
            enc = _left_padded(lm, encoded[start : start + size])
            with lm.runtime.autocast_context():
                logits = lm.model(**enc, logits_to_keep=1).logits[:, -1].float()  # [B, V]
            scores.append(torch.log_softmax(logits[:, ids], -1).cpu().numpy())
            greedy += [tok.decode([g]) for g in logits.argmax(-1).tolist()]
        return np.concatenate(scores), greedy

    return models.oom_backoff(run, batch_size, "ablation letter scores")


@torch.inference_mode()
def option_scores(lm: LoadedModel, prompts: list[str], options: list[tuple[str, ...]], batch_size: int) -> np.ndarray:
    """Mean log-probability per token of each option's text (" " + text) as the continuation of its prompt
    [n, 4]."""
    tok = lm.tokenizer
    seqs, cont_lens = [], []  # prompt i's four continuations are rows 4i .. 4i + 3
    for prompt, choices in zip(prompts, options, strict=True):
        head = tok(prompt, add_special_tokens=False)["input_ids"]
        for text in choices:
            cont = tok(" " + text, add_special_tokens=False)["input_ids"]
            seqs.append(head + cont)
            cont_lens.append(len(cont))

    def run(size: int) -> np.ndarray:
        means = []
        for start in range(0, len(seqs), size):
            enc = _left_padded(lm, seqs[start : start + size])
            lens = torch.tensor(cont_lens[start : start + size], device=enc["input_ids"].device)  # [B]
            k = int(lens.max())  # continuations end in the last column: the last k + 1 logits predict them
            with lm.runtime.autocast_context():
                logits = lm.model(**enc, logits_to_keep=k + 1).logits[:, :-1].float()  # [B, k, V]
            target = enc["input_ids"][:, -k:]  # [B, k]: logits column j predicts target column j
            token_logp = torch.log_softmax(logits, -1).gather(-1, target[..., None])[..., 0]  # [B, k]
            mine = torch.arange(k, device=lens.device)[None] >= (k - lens)[:, None]  # [B, k]: this row's tokens
            means.append(((token_logp * mine).sum(-1) / lens).cpu().numpy())
        return np.concatenate(means)

    return models.oom_backoff(run, batch_size, "ablation option scores").reshape(len(prompts), len(LETTERS))


def answer_scores(
    lm: LoadedModel, answer_format: AnswerFormat, questions: list[Question], prompts: list[str], batch_size: int
) -> tuple[np.ndarray, list[str]]:
    """A score for each of the four options of every prompt [n, 4] under `answer_format`, and the greedy token."""
    letters, greedy = letter_scores(lm, prompts, batch_size)
    if answer_format == "option_text":
        return option_scores(lm, prompts, [q.choices for q in questions], batch_size), greedy
    return letters, greedy


def letter_prior(answer_format: AnswerFormat, no_hint_train: np.ndarray) -> np.ndarray:
    """What is subtracted from every score [n, 4] before the argmax [4]: under calibrated_letter the mean of the
    train questions' no-hint scores, else zero."""
    if answer_format == "calibrated_letter":
        return no_hint_train.mean(0)
    return np.zeros(len(LETTERS))


def choose(scores: np.ndarray, prior: np.ndarray) -> list[str]:
    """The answer letter of every row of scores [n, 4] once the prior [4] is subtracted."""
    return [LETTERS[i] for i in (scores - prior).argmax(-1).tolist()]


def split_questions(n: int, cfg: AblationConfig) -> tuple[set[int], random.Random]:
    """The test questions (split by question, METHOD §5.3) and the generator that then draws the hint letters."""
    rng = random.Random(cfg.seed)
    order = list(range(n))
    rng.shuffle(order)
    return set(order[: int(round(cfg.test_fraction * n))]), rng


def write_ablation_gt(lm: LoadedModel, cfg: AblationConfig, out: Dataset) -> dict[str, Any]:
    bank = load_questions(cfg.questions)[: cfg.n_questions]
    test, rng = split_questions(len(bank), cfg)
    plain_by_question = [render(lm, user_prompt(q, None)) for q in bank]
    s0, greedy0 = answer_scores(lm, cfg.answer_format, bank, plain_by_question, cfg.batch_size)  # [Q, 4]
    prior = letter_prior(cfg.answer_format, s0[[i for i in range(len(bank)) if i not in test]])
    zero_by_question = choose(s0, prior)
    questions, hints, qids = [], [], []
    for qi, q in enumerate(bank):  # each question with `hints_per_question` distinct random letters
        for letter in rng.sample(LETTERS, cfg.hints_per_question):
            questions.append(q)
            hints.append(cfg.hint.format(letter=letter))
            qids.append(qi)
    hinted = [render(lm, user_prompt(q, h)) for q, h in zip(questions, hints, strict=True)]
    s1, greedy1 = answer_scores(lm, cfg.answer_format, questions, hinted, cfg.batch_size)  # [R, 4]
    with_hint = choose(s1, prior)
    rows = []
    for i, q in enumerate(questions):
        qi = qids[i]
        rows.append(gt_row(
            index=i, question_id=qi, split="test" if qi in test else "train", question=q.question,
            choices=list(q.choices), correct_answer=LETTERS[q.answer], subject=q.subject, hint=hints[i],
            system_prompt=SYSTEM_PROMPT, original_user_prompt=user_prompt(q, None),
            hint_user_prompt=user_prompt(q, hints[i]), original_prompt_full=plain_by_question[qi],
            hint_prompt_full=hinted[i], zeroshot_prediction=zero_by_question[qi],
            random_hint_prediction=with_hint[i], zeroshot_greedy_token=greedy0[qi],
            hint_greedy_token=greedy1[i], changed_pred_bc_hint=zero_by_question[qi] != with_hint[i],
        ))  # fmt: skip
    out.create({"stage": STAGE, "version": STAGE_VERSION, "config": cfg.model_dump()})
    out.write_shard(0, pa.Table.from_pylist(rows))
    summary = {
        "questions": len(bank),
        "rows": len(rows),
        "answer_format": cfg.answer_format,
        "letter_prior": [round(float(p), 4) for p in prior],
        **format_stats(rows),
        **{split: format_stats([r for r in rows if r["split"] == split]) for split in ("train", "test")},
    }
    out.mark_complete(summary)
    return summary


def format_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What says whether a readout measures the target's belief: the no-hint letter distribution and accuracy
    (one count per question), the hint-change rate (per row) and how often the greedy token is a letter."""
    by_question = list({r["question_id"]: r for r in rows}.values())
    return {
        "changed_rate": float(np.mean([r["changed_pred_bc_hint"] for r in rows])),
        "zeroshot_accuracy": float(np.mean([r["zeroshot_prediction"] == r["correct_answer"] for r in by_question])),
        "greedy_is_letter_rate": float(np.mean([r["zeroshot_greedy_token"].strip() in LETTERS for r in by_question])),
        "zeroshot_letter_distribution": {c: sum(r["zeroshot_prediction"] == c for r in by_question) for c in LETTERS},
    }


def ablation_key(recipe: AblationRecipe) -> str:
    return ground_truth_key(STAGE, STAGE_VERSION, recipe.target, recipe.ablation, "ablation")


ABLATION_REQUIRED = ("question", "choices", "zeroshot_prediction", "random_hint_prediction", "hint_user_prompt")


def import_input_ablation(path: str | Path, split: str = "train") -> list[dict[str, Any]]:
    """Public input-ablation rows (Transluce/input_ablation_*, paper §5.2: index, question, choices, correct_answer,
    zeroshot_prediction, random_hint_prediction, hint, system_prompt, original_user_prompt, hint_user_prompt,
    original_prompt_full, hint_prompt_full, changed_pred_bc_hint) as `ablation_gt` rows. changed_pred_bc_hint is
    null in about a quarter of the public rows: it is then derived from the two predictions."""
    rows = read_rows(path, "import.input_ablation")
    require_columns(rows, ABLATION_REQUIRED, "import.input_ablation", path)
    out = []
    for i, r in enumerate(rows):
        changed = r["random_hint_prediction"] != r["zeroshot_prediction"]
        if r.get("changed_pred_bc_hint") is not None and bool(r["changed_pred_bc_hint"]) != changed:
            raise UserInputError(
                "import.input_ablation", f"row {i}: changed_pred_bc_hint contradicts the two predictions", "fix the row"
            )
        out.append(gt_row(
            index=int(r.get("index", i)), question_id=int(r.get("index", i)), split=split,
            question=r["question"], choices=list(r["choices"]), correct_answer=str(r.get("correct_answer", "")),
            subject=r.get("subject", ""), hint=r.get("hint", ""), system_prompt=r.get("system_prompt", ""),
            original_user_prompt=r.get("original_user_prompt", ""), hint_user_prompt=r["hint_user_prompt"],
            original_prompt_full=r.get("original_prompt_full", ""), hint_prompt_full=r.get("hint_prompt_full", ""),
            zeroshot_prediction=r["zeroshot_prediction"], random_hint_prediction=r["random_hint_prediction"],
            zeroshot_greedy_token="", hint_greedy_token="", changed_pred_bc_hint=changed,
        ))  # fmt: skip
    return out


@ground_truth_task(STAGE, ablation_key, "ablation", import_input_ablation)
def ablation_ground_truth(recipe: AblationRecipe, out: Dataset) -> dict[str, Any]:
    """Ask every question with and without the hint and write `ablation_gt`."""
    return write_ablation_gt(models.load(recipe.target, frozen=True), recipe.ablation, out)
