import json

import numpy as np
import pytest
import torch

from storage.store import Dataset
from tasks.ablation.config import AblationConfig
from tasks.ablation.ground_truth import (
    LETTERS,
    choose,
    letter_prior,
    letter_scores,
    option_scores,
    render,
    split_questions,
    user_prompt,
    write_ablation_gt,
)
from tasks.common import models
from tasks.common.config import ModelConfig
from tasks.outcomes.facts import Question, load_questions


def test_prompt_has_choices_hint_and_prefilled_answer():
    lm = models.load(ModelConfig(name="tiny-llama", autocast="none"))
    q = Question("What is 2 + 2?", ("3", "4", "5", "6"), 1, "math")
    user = user_prompt(q, "Hint: The answer is C")
    assert user.splitlines() == ["Question: What is 2 + 2?", "A. 3", "B. 4", "C. 5", "D. 6", "Hint: The answer is C"]
    text = render(lm, user)
    assert text.endswith("<|im_start|>assistant\nAnswer:") and "Output only the answer letter" in text


def ten_questions(tmp_path):
    """A question file of ten questions, answers cycling A-D."""
    qs = [{"question": f"Question number {i}?", "choices": ["w", "x", "y", "z"], "answer": i % 4, "subject": "t"}
          for i in range(10)]  # fmt: skip
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps(q) for q in qs))
    return path


def test_ground_truth_rows_are_consistent(tmp_path, home):
    lm = models.load(ModelConfig(name="tiny-llama", autocast="none"))
    path = ten_questions(tmp_path)
    out = Dataset(home, "ablation_gt", "k")
    summary = write_ablation_gt(lm, AblationConfig(questions=str(path), batch_size=3, hints_per_question=2), out)
    rows = next(out.iter_shards()).to_pylist()
    assert summary["questions"] == 10 and summary["rows"] == 20 and sum(r["split"] == "test" for r in rows) == 4
    for qid in range(10):  # two distinct hints per question, never split across train and test
        mine = [r for r in rows if r["question_id"] == qid]
        assert len({r["hint"] for r in mine}) == 2 and len({r["split"] for r in mine}) == 1
    for r in rows:
        assert r["changed_pred_bc_hint"] == (r["zeroshot_prediction"] != r["random_hint_prediction"])
        assert r["zeroshot_prediction"] in LETTERS and r["hint"].startswith("Hint: The answer is ")
    # batching and left padding do not change a score
    prompts = [r["hint_prompt_full"] for r in rows]
    (wide, greedy_wide), (one, greedy_one) = letter_scores(lm, prompts, 10), letter_scores(lm, prompts, 1)
    assert np.allclose(wide, one, atol=1e-5) and greedy_wide == greedy_one


def test_prior_and_choice_by_hand():
    scores = np.log(np.array([[0.1, 0.2, 0.6, 0.1], [0.2, 0.1, 0.4, 0.3]]))  # [2, 4]: "C" wins both raw
    assert choose(scores, letter_prior("letter", scores)) == ["C", "C"]
    prior = letter_prior("calibrated_letter", scores)  # the mean log-probability of each letter
    assert np.allclose(prior, np.log([0.1, 0.2, 0.6, 0.1]) / 2 + np.log([0.2, 0.1, 0.4, 0.3]) / 2)
    # row 0 minus the prior is log(row0 / row1) / 2 = log([1/2, 2, 3/2, 1/3]) / 2: B; row 1 the negative: D
    assert choose(scores, prior) == ["B", "D"]
    assert np.array_equal(letter_prior("option_text", scores), np.zeros(4))


def test_option_scores_are_mean_continuation_log_probs():
    lm = models.load(ModelConfig(name="tiny-llama", autocast="none"))
    prompts, options = ["Question: two?\nAnswer:", "Q: a much longer question here\nAnswer:"], [("w", "x yz", "y", "zz z"),
                                                                                           ("1", "2", "33 3", "4")]  # fmt: skip
    got = option_scores(lm, prompts, options, batch_size=3)  # [2, 4], batches cut across prompts
    tok = lm.tokenizer
    for i, (prompt, choices) in enumerate(zip(prompts, options, strict=True)):
        head = tok(prompt, add_special_tokens=False)["input_ids"]
        for j, text in enumerate(choices):  # one unpadded forward per continuation, summed by hand
            cont = tok(" " + text, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(lm.model(torch.tensor([head + cont])).logits[0].float(), -1)
            want = np.mean([logp[len(head) - 1 + t, c].item() for t, c in enumerate(cont)])
            assert got[i, j] == pytest.approx(want, abs=1e-4)


def test_calibrated_ground_truth_subtracts_the_train_prior(tmp_path, home):
    lm = models.load(ModelConfig(name="tiny-llama", autocast="none"))
    path = ten_questions(tmp_path)
    cfg = AblationConfig(questions=str(path), batch_size=4, answer_format="calibrated_letter")
    out = Dataset(home, "ablation_gt", "k")
    summary = write_ablation_gt(lm, cfg, out)
    test, _ = split_questions(10, cfg)
    bank = load_questions(str(path))
    scores, _ = letter_scores(lm, [render(lm, user_prompt(q, None)) for q in bank], 1)  # [10, 4]
    prior = scores[[i for i in range(10) if i not in test]].mean(0)
    assert np.allclose(summary["letter_prior"], prior, atol=1e-3)
    rows = next(out.iter_shards()).to_pylist()
    for r in rows:
        assert r["zeroshot_prediction"] == LETTERS[int((scores[r["question_id"]] - prior).argmax())]
    assert sum(summary["train"]["zeroshot_letter_distribution"].values()) == 10 - len(test)


def test_shipped_question_bank_and_fact_base():
    from tasks.outcomes.facts import load_facts

    questions = load_questions()
    assert len(questions) >= 500 and len({q.question for q in questions}) == len(questions)
    facts = load_facts()
    assert len(facts) >= 500 and len({f.relation for f in facts}) >= 10
