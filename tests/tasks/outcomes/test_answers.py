"""The answer sentence of both outcome tasks: parsing, targets, exact match, F1 and strict match."""

import pytest

from tasks.outcomes.answers import item_exact_match, parse, score, target


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The output would remain unchanged from <<< Paris>>>.", (False, "paris")),
        ("The most likely output would change to <<<Rome>>>.", (True, "rome")),
        ("the output would CHANGE TO <<<Answer: B>>>", (True, "answer: b")),  # wrong case, untrained wording
        ("Sure! The output would remain   unchanged from <<<x>>>. Hope this helps", (False, "x")),  # extra text
        ("The output would change to Rome.", None),  # missing brackets
        ("The output would remain unchanged from <<<Paris", None),  # unclosed
        ("", None),  # empty output
        ("I don't know", None),
    ],
)
def test_parser_edge_cases(text, expected):
    assert parse(text) == expected


def test_targets_parse_back():
    assert parse(target(True, " Madrid")) == (True, "madrid")
    assert parse(target(False, "Answer: C")) == (False, "answer: c")


def test_unparseable_counts_as_wrong_in_f1():
    gold = [True, True, False, False]
    content = ["a", "b", "c", "d"]
    perfect = [target(g, c) for g, c in zip(gold, content, strict=True)]
    s = score(perfect, gold, content)
    assert (s.exact_match, s.content_match, s.has_changed_f1, s.parse_rate) == (1.0, 1.0, 1.0, 1.0)
    s = score(["garbage", *perfect[1:]], gold, content)
    assert s.parse_rate == 0.75 and s.exact_match == 0.75
    # changed class: tp 1, fn 1 -> 2/3; unchanged: tp 2, fp 0 -> 1.0; macro = 5/6
    assert s.has_changed_f1 == pytest.approx((2 / 3 + 1.0) / 2)
    flag_only = [target(g, "zzz") for g in gold]
    s = score(flag_only, gold, content)
    assert s.has_changed_f1 == 1.0 and s.exact_match == 0.0 and s.content_match == 0.0


def test_strict_match_needs_the_exact_sentence_and_item_scores_agree():
    gold = [(True, " Rome"), (False, "Answer: C")]
    outputs = ["The output would change to <<<rome>>>.", "The output would remain unchanged from <<<Answer: C>>>."]
    s = score(outputs, [g[0] for g in gold], [g[1] for g in gold])
    assert s.exact_match == 1.0 and s.strict_exact_match == 0.5  # the untrained wording and case fail strict EM
    assert item_exact_match(outputs, gold).tolist() == [True, True]
    assert item_exact_match(["nonsense", outputs[1]], gold).tolist() == [False, True]
