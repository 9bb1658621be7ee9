import numpy as np
import pytest

from tasks.explainer.model import SPAN
from tasks.outcomes.prompts import DROP, PATCHING_TEMPLATES, item_exact_match, parse, queries, score, target


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


PATCH_ROW = {"pair_id": 3, "chunk": 1, "orig_pos": 5, "layer": [2, 3], "orig_text_token": " Paris",
             "input_text": "The capital of France is", "intervention_vector": [1.0, -2.0, 0.5],
             "is_different": True, "ablated_continuation": [" Rome"]}  # fmt: skip
ABLATION_ROW = {"question_id": 4, "index": 9, "hint_user_prompt": "Question: q\nA. a\nHint: B", "system_prompt": "sys",
                "changed_pred_bc_hint": False, "zeroshot_prediction": "C"}  # fmt: skip


def test_query_modes_ask_the_same_question_with_and_without_v():
    trained, zero, none, zshot, no_layer, no_token = (
        queries("patching", [PATCH_ROW] * 3, m, seed=1, with_answer=True)[2]
        for m in ("trained", "zero_vector", "no_activation", "zero_shot", "no_layer", "no_token"))  # fmt: skip
    assert trained.text == zero.text and SPAN in trained.text and "<<<The capital of France is>>>" in trained.text
    assert "layer 2, 3" in trained.text and "< Paris>" in trained.text and trained.layer == 2
    np.testing.assert_array_equal(trained.vector, [1.0, -2.0, 0.5])
    assert not zero.vector.any()
    assert none.vector is None and SPAN not in none.text and "feature at" in none.text
    assert zshot.text.startswith(f"If feature {SPAN} at layer 2, 3 is inserted into token < Paris>")
    assert trained.answer == "The most likely output would change to <<< Rome>>>." == zshot.answer
    assert "layer" not in no_layer.text and "< Paris>" in no_layer.text and SPAN in no_layer.text
    assert "Paris" not in no_token.text and "layer 2, 3" in no_token.text and "  " not in no_token.text
    for template in PATCHING_TEMPLATES:  # every template loses exactly its layer / token phrase
        assert "{layer}" not in DROP["no_layer"].sub("", template) and "{tokens}" in DROP["no_layer"].sub("", template)
        assert "{tokens}" not in DROP["no_token"].sub("", template) and "{layer}" in DROP["no_token"].sub("", template)
    (q,) = queries("ablation", [ABLATION_ROW], "trained", seed=0, with_answer=True)
    assert q.vector is None and q.system == "sys" and q.text.endswith("how would the assistant answer change?")
    assert q.answer == "The output would remain unchanged from <<<Answer: C>>>."
    (z,) = queries("ablation", [ABLATION_ROW], "zero_shot", seed=0, with_answer=False)
    assert z.text.startswith(q.text) and z.text.endswith("<<<Answer: B>>>.") and z.answer is None
    with pytest.raises(ValueError):
        queries("ablation", [ABLATION_ROW], "zero_vector", seed=0, with_answer=False)


def test_strict_match_needs_the_exact_sentence_and_item_scores_agree():
    gold = [(True, " Rome"), (False, "Answer: C")]
    outputs = ["The output would change to <<<rome>>>.", "The output would remain unchanged from <<<Answer: C>>>."]
    s = score(outputs, [g[0] for g in gold], [g[1] for g in gold])
    assert s.exact_match == 1.0 and s.strict_exact_match == 0.5  # the untrained wording and case fail strict EM
    assert item_exact_match(outputs, gold).tolist() == [True, True]
    assert item_exact_match(["nonsense", outputs[1]], gold).tolist() == [False, True]
