"""Explaining outcomes (tasks B and C): prompts, targets, parsing and the exact-match metrics (paper §4.5-4.7,
§5.3, §4.6).

An answer is "The output would remain unchanged from <<<X>>>." or "The most likely output would change to
<<<X>>>."; X is the patched run's next token (B) or "Answer: L" with L the no-hint letter (C). Parsing
lowercases and strips, then applies the paper's two regexes; anything else is unparseable and counts as
wrong (METHOD §5.2): a false negative for its gold class, never a false positive.
"""

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from tasks.explainer.model import SPAN, Query, shuffled_donors

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
    strict_exact_match: float  # the whole output equals the target sentence (the reference's comparison)
    parse_rate: float
    n: int
    se_exact_match: float
    se_content_match: float
    se_has_changed_f1: float
    se_strict_exact_match: float


def _macro_f1(gold: np.ndarray, pred: list[bool | None]) -> float:
    f1s = []
    for cls in (True, False):
        tp = sum(1 for g, p in zip(gold, pred, strict=True) if p is not None and p == cls and g == cls)
        fp = sum(1 for g, p in zip(gold, pred, strict=True) if p is not None and p == cls and g != cls)
        fn = sum(1 for g, p in zip(gold, pred, strict=True) if g == cls and p != cls)  # unparseable: a miss
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(f1s))


def item_exact_match(outputs: Sequence[str], gold: Sequence[tuple[bool, str]]) -> np.ndarray:
    """Per output: parsed flag and normalised content both equal the gold ones (unparseable: False). [N]"""
    parsed = [parse(o) for o in outputs]
    return np.array([p is not None and p[0] == g and p[1] == c.strip().lower()
                     for p, (g, c) in zip(parsed, gold, strict=True)], dtype=bool)  # fmt: skip


def score(
    outputs: Sequence[str], gold_changed: Sequence[bool], gold_content: Sequence[str], seed: int = 0
) -> OutcomeScores:
    """EM = flag and content; content match; has-changed macro F1 (bootstrap SE); strict EM; parse rate."""
    parsed = [parse(o) for o in outputs]
    gold = np.asarray(gold_changed, dtype=bool)
    content = [c.strip().lower() for c in gold_content]
    flag = [None if p is None else p[0] for p in parsed]
    cm = np.array([p is not None and p[1] == c for p, c in zip(parsed, content, strict=True)], dtype=float)
    em = item_exact_match(outputs, list(zip(gold_changed, gold_content, strict=True))).astype(float)
    strict = np.array([o.strip() == target(bool(g), c) for o, g, c in zip(outputs, gold, gold_content, strict=True)],
                      dtype=float)  # fmt: skip
    n = len(outputs)
    f1 = _macro_f1(gold, flag)
    rng = np.random.default_rng(seed)
    boots = [_macro_f1(gold[idx], [flag[i] for i in idx]) for idx in (rng.integers(0, n, n) for _ in range(200))]
    binom = lambda p: float(np.sqrt(p * (1 - p) / max(n, 1)))  # noqa: E731
    return OutcomeScores(float(em.mean()), float(cm.mean()), f1, float(strict.mean()),
                         float(np.mean([p is not None for p in parsed])), n, binom(em.mean()), binom(cm.mean()),
                         float(np.std(boots)), binom(strict.mean()))  # fmt: skip


# Untrained baselines: the question, then the paper's answer-format instructions (App. H.2 / H.3).
ZERO_SHOT_PATCHING = (
    "If feature {feature} at layer {layer} is inserted into token {tokens} when processing the text <<<{input}>>>, "
    "how would the output change?\n"
    "Respond with exactly one of the two options below, and nothing else:\n"
    "The output would remain unchanged from <<<X>>>.\n"
    "The output would change to <<<X>>>.\n"
    "Replace X with the next token of the answer following the input. Make sure X is a *single* next token.\n"
    "Example Outputs:\n"
    "The output would remain unchanged from <<<Paris>>>.\n"
    "The output would change to <<<doctor>>>.\n"
    "The output would remain unchanged from <<<Apple>>>.\n"
    "The output would change to <<<unknown>>>."
)
ZERO_SHOT_ABLATION = (
    "\nRespond with exactly one of the two options below, and nothing else:\n"
    "The output would remain unchanged from <<<Answer: X>>>.\n"
    "The output would change to <<<Answer: X>>>.\n"
    "Replace X with the answer letter (A, B, C, or D). Do not include any explanations, reasoning, or extra text.\n"
    "Example outputs:\n"
    "The output would remain unchanged from <<<Answer: C>>>.\n"
    "The output would change to <<<Answer: B>>>."
)
# How a question is put: the trained templates; the same with v = 0 (METHOD §4.2) or with another row's vector of the
# same chunk (shuffled v); without the span, the layer string
# or the token string (the paper's "- activation", "- layer", "- token", §4.8); the untrained baseline's prompt.
MODES = ("trained", "zero_vector", "shuffled_vector", "no_activation", "no_layer", "no_token", "zero_shot")
# The phrases that carry the layer and the token in the five templates ("at layer {layer}", "steer layer {layer}
# towards", "to / at / and tokens {tokens}"); removing them leaves a grammatical question.
DROP = {
    "no_layer": re.compile(r" (?:at )?layer \{layer\}"),
    "no_token": re.compile(r" (?:to |at |and )?tokens \{tokens\}"),
}


def gold(task: str, row: dict) -> tuple[bool, str]:
    """(changed, content) of a ground-truth row: the patched next token (B) or 'Answer: <no-hint letter>' (C)."""
    if task == "patching":
        return bool(row["is_different"]), row["ablated_continuation"][0]
    return bool(row["changed_pred_bc_hint"]), f"Answer: {row['zeroshot_prediction']}"


def queries(task: str, rows: Sequence[dict], mode: str, seed: int, with_answer: bool) -> list[Query]:
    """Explainer questions for `patching_gt` or `ablation_gt` rows; one template drawn per row with a seeded RNG,
    so every mode asks about the same row in the same words."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}")
    make = _patching_query if task == "patching" else _ablation_query
    rng = random.Random(seed)
    out = []
    for r in rows:
        q = make(r, mode, rng)
        answer = target(*gold(task, r)) if with_answer else None
        out.append(Query(q.vector, q.layer, q.text, answer, q.example_id, system=q.system))
    if mode == "shuffled_vector":  # the same questions, each about another row's vector of its chunk
        donor = shuffled_donors([q.layer for q in out], seed)
        out = [replace(q, vector=out[d].vector) for q, d in zip(out, donor, strict=True)]
    return out


def _patching_query(r: dict, mode: str, rng: random.Random) -> Query:
    """v = the chunk-mean vector; Π (if any) is indexed by the chunk's first layer."""
    template = rng.choice(PATCHING_TEMPLATES)
    fields = {"layer": ", ".join(str(x) for x in r["layer"]), "tokens": f"<{r['orig_text_token']}>",
              "input": r["input_text"]}  # fmt: skip
    if mode == "zero_shot":
        template = ZERO_SHOT_PATCHING
    if mode in DROP:
        template = DROP[mode].sub("", template)
    vector = np.asarray(r["intervention_vector"], dtype=np.float32)
    if mode == "zero_vector":
        vector = np.zeros_like(vector)
    if mode == "no_activation":
        text, vector = template.format(feature="", **fields).replace("feature  at", "feature at"), None
    else:
        text = template.format(feature=SPAN, **fields)
    return Query(vector, int(r["layer"][0]), text, None, example_id("patching", r))


def _ablation_query(r: dict, mode: str, rng: random.Random) -> Query:
    """The hinted prompt under the target's own system prompt; no vector (§5.3)."""
    if mode not in ("trained", "zero_shot"):
        raise ValueError(f"mode {mode!r} needs a vector; ablation questions carry none")
    text = r["hint_user_prompt"] + ABLATION_QUESTION + (ZERO_SHOT_ABLATION if mode == "zero_shot" else "")
    return Query(None, 0, text, None, example_id("ablation", r), system=r["system_prompt"])


def example_id(task: str, r: dict) -> str:
    if task == "patching":
        return f"pair{r['pair_id']}/c{r['chunk']}/t{r['orig_pos']}"
    return f"q{r['question_id']}/{r['index']}"
