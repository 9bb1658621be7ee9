"""The answer of both outcome tasks (B and C), its parser and the exact-match metrics (paper §4.5-4.7, §5.3).

An answer is "The output would remain unchanged from <<<X>>>." or "The most likely output would change to
<<<X>>>."; X is the patched run's next token (B) or "Answer: L" with L the no-hint letter (C). Parsing
lowercases and strips, then applies the paper's two regexes; anything else is unparseable and counts as
wrong (METHOD §5.2): a false negative for its gold class, never a false positive.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

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


# How a question is put: the trained templates; the same with v = 0 (METHOD §4.2) or with another row's vector of the
# same chunk (shuffled v); without the span, the layer string
# or the token string (the paper's "- activation", "- layer", "- token", §4.8); the untrained baseline's prompt.
MODES = ("trained", "zero_vector", "shuffled_vector", "no_activation", "no_layer", "no_token", "zero_shot")
