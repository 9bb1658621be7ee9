import json

from storage.store import Dataset
from tasks import models
from tasks.ablation import LETTERS, predict, render, user_prompt, write_ablation_gt
from tasks.config import AblationConfig, ModelConfig
from tasks.facts import Question, load_questions


def test_prompt_has_choices_hint_and_prefilled_answer():
    lm = models.load(ModelConfig(name="tiny-llama", autocast="none"))
    q = Question("What is 2 + 2?", ("3", "4", "5", "6"), 1, "math")
    user = user_prompt(q, "Hint: The answer is C")
    assert user.splitlines() == ["Question: What is 2 + 2?", "A. 3", "B. 4", "C. 5", "D. 6", "Hint: The answer is C"]
    text = render(lm, user)
    assert text.endswith("<|im_start|>assistant\nAnswer:") and "Output only the answer letter" in text


def test_ground_truth_rows_are_consistent(tmp_path, home):
    lm = models.load(ModelConfig(name="tiny-llama", autocast="none"))
    qs = [{"question": f"Question number {i}?", "choices": ["w", "x", "y", "z"], "answer": i % 4, "subject": "t"}
          for i in range(10)]  # fmt: skip
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps(q) for q in qs))
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
    # batching and left padding do not change a prediction
    prompts = [r["hint_prompt_full"] for r in rows]
    assert predict(lm, prompts, 10) == predict(lm, prompts, 1)


def test_shipped_question_bank_and_fact_base():
    from tasks.facts import load_facts

    questions = load_questions()
    assert len(questions) >= 500 and len({q.question for q in questions}) == len(questions)
    facts = load_facts()
    assert len(facts) >= 500 and len({f.relation for f in facts}) >= 10
