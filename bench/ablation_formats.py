"""A measurement, not a timing: which way of reading the target's answer to a multiple-choice question makes
the input-ablation ground truth measure what the target believes (issue 16)? For every `ablation.answer_format`
and hint wording, on the train questions of the default split (a choice made on train, never on test):

  letters    the no-hint answer letters, per question (the paper's goal: no letter above 40%)
  acc        no-hint accuracy
  changed    the share of questions whose answer changes under one random hint letter (goal 25-75%)
  follows    the share of those changed answers that land on the hinted letter
  content    the share of questions whose no-hint answer names the same option text when the options are
             rotated by one place: the answer follows the question's content, not a position

    .venv/bin/python bench/ablation_formats.py [--target smollm2-135m-instruct] [--hint "Hint: ... {letter}"]...

option_text scores four continuations per prompt, so it reads the first --option-questions train questions.
Prints one table row per (format, hint) and `RESULT ablation_<format>_max_letter_share <x> goal 0.4`.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.ablation.config import AblationConfig  # noqa: E402
from tasks.ablation.ground_truth import (  # noqa: E402
    LETTERS,
    answer_scores,
    choose,
    letter_prior,
    render,
    split_questions,
    user_prompt,
)
from tasks.common import models  # noqa: E402
from tasks.common.config import ModelConfig  # noqa: E402
from tasks.outcomes.facts import Question, load_questions  # noqa: E402

FORMATS = ("letter", "calibrated_letter", "option_text")


def rotated(q: Question) -> Question:
    """The same question with its options moved one place down (the last becomes A)."""
    choices = (q.choices[-1], *q.choices[:-1])
    return Question(q.question, choices, (q.answer + 1) % len(choices), q.subject)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="smollm2-135m-instruct", help="Registry name or model folder.")
    ap.add_argument("--hint", action="append", help="Hint wording with {letter}; repeat for several.")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--option-questions", type=int, default=160, help="Train questions scored by option_text.")
    args = ap.parse_args()
    hints = args.hint or [AblationConfig().hint]
    lm = models.load(ModelConfig(name=args.target))
    bank = load_questions(None)
    test, rng = split_questions(len(bank), AblationConfig())
    train = [q for i, q in enumerate(bank) if i not in test]
    hint_letters = [rng.choice(LETTERS) for _ in train]
    turned = [rotated(q) for q in train]

    def ask(fmt: str, questions: list[Question], hint: str | None = None) -> np.ndarray:
        texts = [hint.format(letter=h) if hint else None for h in hint_letters[: len(questions)]]
        prompts = [render(lm, user_prompt(q, t)) for q, t in zip(questions, texts, strict=True)]
        return answer_scores(lm, fmt, questions, prompts, args.batch_size)[0]  # [n, 4]

    # one pass per prompt set: both letter formats read the same letter scores, option_text its own on a subset
    # (four continuations per prompt)
    n_text = min(args.option_questions, len(train))
    scores = {}
    for fmt, qs, turned_qs in (("letter", train, turned), ("option_text", train[:n_text], turned[:n_text])):
        scores[fmt] = (ask(fmt, qs), ask(fmt, turned_qs), [ask(fmt, qs, h) for h in hints])
    scores["calibrated_letter"] = scores["letter"]

    print(f"{len(train)} train questions of {len(bank)} (option_text: the first {n_text}); target {args.target}")
    print("| answer_format | hint | letters A/B/C/D | acc | changed | follows hint | content under rotation |")
    print("|---|---|---|---|---|---|---|")
    for fmt in FORMATS:
        plain, moved_scores, hinted_scores = scores[fmt]
        qs, turned_qs = train[: len(plain)], turned[: len(plain)]
        prior = letter_prior(fmt, plain)  # the train questions are the prior's own sample, as in the stage
        zero, moved = choose(plain, prior), choose(moved_scores, prior)
        same_content = np.mean([q.choices[LETTERS.index(a)] == t.choices[LETTERS.index(b)]
                                for q, t, a, b in zip(qs, turned_qs, zero, moved, strict=True)])  # fmt: skip
        counts = [zero.count(c) for c in LETTERS]
        acc = np.mean([a == LETTERS[q.answer] for a, q in zip(zero, qs, strict=True)])
        for hint, hs in zip(hints, hinted_scores, strict=True):
            hinted = choose(hs, prior)
            changed = [a != b for a, b in zip(zero, hinted, strict=True)]
            follows = np.mean([b == h for b, h, c in zip(hinted, hint_letters, changed, strict=False) if c] or [0])
            print(f"| {fmt} | {hint} | {'/'.join(map(str, counts))} | {100 * acc:.1f} | {100 * np.mean(changed):.1f} "
                  f"| {100 * follows:.1f} | {100 * same_content:.1f} |")  # fmt: skip
        print(f"RESULT ablation_{fmt}_max_letter_share {max(counts) / len(qs):.3f} goal 0.4", flush=True)


if __name__ == "__main__":
    main()
