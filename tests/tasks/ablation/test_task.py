"""Input ablation as an outcome task: questions without a vector, and the baselines that ignore the question."""

import pytest

from tasks.ablation.task import ABLATION

ROW = {"question_id": 4, "index": 9, "hint_user_prompt": "Question: q\nA. a\nHint: B", "system_prompt": "sys",
       "changed_pred_bc_hint": False, "zeroshot_prediction": "C"}  # fmt: skip


def test_questions_carry_no_vector_and_refuse_the_vector_modes():
    (q,) = ABLATION.queries([ROW], "trained", seed=0, with_answer=True)
    assert q.vector is None and q.system == "sys" and q.text.endswith("how would the assistant answer change?")
    assert q.answer == "The output would remain unchanged from <<<Answer: C>>>." and q.example_id == "q4/9"
    (z,) = ABLATION.queries([ROW], "zero_shot", seed=0, with_answer=False)
    assert z.text.startswith(q.text) and z.text.endswith("<<<Answer: B>>>.") and z.answer is None
    for mode in ("zero_vector", "shuffled_vector", "no_activation"):
        with pytest.raises(ValueError, match="needs a vector"):
            ABLATION.queries([ROW], mode, seed=0, with_answer=False)
    assert ABLATION.dims(None) == (None, 1) and ABLATION.vector_sites(None, []) is None


def test_baselines_by_hand():
    # train: 3 unchanged, 1 changed (majority flag False); no-hint letters B, B, A, B (most frequent B); the
    # majority gold pair is (False, "Answer: B"), seen three times.
    train = [{**ROW, "changed_pred_bc_hint": c, "zeroshot_prediction": z}
             for c, z in ((False, "B"), (False, "B"), (True, "A"), (False, "B"))]  # fmt: skip
    test = [{**ROW, "correct_answer": "D"}, {**ROW, "correct_answer": "A"}]
    out = ABLATION.baselines(train, test)
    assert out["majority"] == ["The output would remain unchanged from <<<Answer: B>>>."] * 2
    assert out["position_bias"] == ["The output would remain unchanged from <<<Answer: B>>>."] * 2
    assert out["correct_answer"] == ["The output would remain unchanged from <<<Answer: D>>>.",
                                     "The output would remain unchanged from <<<Answer: A>>>."]  # fmt: skip
    # a changed majority: the flag follows the train rows, the letter stays the most frequent no-hint letter
    flipped = [{**r, "changed_pred_bc_hint": not r["changed_pred_bc_hint"]} for r in train]
    out = ABLATION.baselines(flipped, test)
    assert out["position_bias"] == ["The most likely output would change to <<<Answer: B>>>."] * 2
    assert out["majority"] == ["The most likely output would change to <<<Answer: B>>>."] * 2
