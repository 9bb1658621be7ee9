"""Explaining outcomes (tasks B and C): prompts, targets, parsing and the exact-match metrics (PAPER.md §4.5-4.7,
§5.3, §4.6).

An answer is "The output would remain unchanged from <<<X>>>." or "The most likely output would change to
<<<X>>>."; X is the patched run's next token (B) or "Answer: L" with L the no-hint letter (C). Parsing
lowercases and strips, then applies the paper's two regexes; anything else is unparseable and counts as
wrong (R14): a false negative for its gold class, never a false positive.
"""

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tasks.explainer import SPAN, Query

PATCHING_TEMPLATES = (
    "If feature {feature} at layer {layer} is added to tokens {tokens} when processing the text <<<{input}>>>, how would the output change?",
    "When feature {feature} at layer {layer} is added at tokens {tokens} in the input <<<{input}>>>, what happens to the model's output?",
    "Consider the input text: <<<{input}>>>. If we steer layer {layer} towards feature {feature} at tokens {tokens}, how does this affect the generated continuation?",
    "Given the text <<<{input}>>>, what would be the effect on the output if feature {feature} at layer {layer} is added to tokens {tokens}?",
    "If we steer towards feature {feature} at layer {layer} and tokens {tokens} when processing <<<{input}>>>, how would the model's response differ?",
)  # fmt: skip
ABLATION_QUESTION = "\n\nIf the hint were removed how would the assistant answer change?"
UNCHANGED = re.compile(r"remain\s+unchanged\s+from\s+<<<(.*)>>>", re.S)
CHANGED = re.compile(r"change\s+to\s+<<<(.*)>>>", re.S)


def target(changed: bool, content: str) -> str:
    if changed:
        return f"The most likely output would change to <<<{content}>>>."
    return f"The output would remain unchanged from <<<{content}>>>."


def parse(text: str) -> tuple[bool, str] | None:
    """(changed, normalised content), or None when the text matches neither pattern."""
    t = text.strip().lower()
    if m := UNCHANGED.search(t):
        return False, m.group(1).strip()
    if m := CHANGED.search(t):
        return True, m.group(1).strip()
    return None


@dataclass(frozen=True)
class OutcomeScores:
    exact_match: float
    content_match: float
    has_changed_f1: float
    parse_rate: float
    n: int
    se_exact_match: float
    se_content_match: float
    se_has_changed_f1: float


def _macro_f1(gold: np.ndarray, pred: list[bool | None]) -> float:
    f1s = []
    for cls in (True, False):
        tp = sum(1 for g, p in zip(gold, pred, strict=True) if p is not None and p == cls and g == cls)
        fp = sum(1 for g, p in zip(gold, pred, strict=True) if p is not None and p == cls and g != cls)
        fn = sum(1 for g, p in zip(gold, pred, strict=True) if g == cls and p != cls)  # unparseable: a miss
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(f1s))


def score(
    outputs: Sequence[str], gold_changed: Sequence[bool], gold_content: Sequence[str], seed: int = 0
) -> OutcomeScores:
    """EM = flag and content; content match; has-changed macro F1 (bootstrap SE); parse rate."""
    parsed = [parse(o) for o in outputs]
    gold = np.asarray(gold_changed, dtype=bool)
    content = [c.strip().lower() for c in gold_content]
    flag = [None if p is None else p[0] for p in parsed]
    cm = np.array([p is not None and p[1] == c for p, c in zip(parsed, content, strict=True)], dtype=float)
    em = np.array([p is not None and p[0] == g and p[1] == c for p, g, c in zip(parsed, gold, content, strict=True)],
                  dtype=float)  # fmt: skip
    n = len(outputs)
    f1 = _macro_f1(gold, flag)
    rng = np.random.default_rng(seed)
    boots = [_macro_f1(gold[idx], [flag[i] for i in idx]) for idx in (rng.integers(0, n, n) for _ in range(200))]
    binom = lambda p: float(np.sqrt(p * (1 - p) / max(n, 1)))  # noqa: E731
    return OutcomeScores(float(em.mean()), float(cm.mean()), f1, float(np.mean([p is not None for p in parsed])), n,
                         binom(em.mean()), binom(cm.mean()), float(np.std(boots)))  # fmt: skip


def patching_queries(rows: Sequence[dict], seed: int, with_answer: bool) -> list[Query]:
    """Task B queries from `patching_gt` rows: v = the chunk-mean vector; Π (if any) indexed by the chunk's first layer."""
    rng = random.Random(seed)
    out = []
    for r in rows:
        text = rng.choice(PATCHING_TEMPLATES).format(
            feature=SPAN,
            layer=", ".join(str(x) for x in r["layer"]),
            tokens=f"<{r['orig_text_token']}>",
            input=r["input_text"],
        )
        answer = target(r["is_different"], r["ablated_continuation"][0]) if with_answer else None
        out.append(Query(np.asarray(r["intervention_vector"], dtype=np.float32), int(r["layer"][0]), text, answer,
                         f"pair{r['pair_id']}/c{r['chunk']}/t{r['orig_pos']}"))  # fmt: skip
    return out


def ablation_queries(rows: Sequence[dict], d_target: int, with_answer: bool) -> list[Query]:
    """Task C queries from `ablation_gt` rows: no vector (the explainer runs with zero payloads)."""
    out = []
    for r in rows:
        answer = target(r["changed_pred_bc_hint"], f"Answer: {r['zeroshot_prediction']}") if with_answer else None
        out.append(Query(np.zeros(d_target, dtype=np.float32), 0, r["hint_user_prompt"] + ABLATION_QUESTION, answer,
                         f"q{r['index']}", system=r["system_prompt"]))  # fmt: skip
    return out
