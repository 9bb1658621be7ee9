"""Fixtures written from the public schemas in paper §4.4 and §5.2."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.errors import UserInputError
from tasks.importers import import_act_patch, import_input_ablation

ACT_PATCH_ROW = {
    "layer": [24, 25, 26, 27, 28, 29, 30, 31],
    "input_tokens": ["<|begin_of_text|>", "Rome", " is", " the", " capital", " of"],
    "original_continuation": [" Italy"],
    "ablated_continuation": [" France"],
    "is_different": True,
    "patch_position": {"orig_pos": 1, "orig_text_token": "Rome", "counterfact_pos": 1,
                       "counterfact_text_token": "Paris", "intervention_vector": [0.5, -1.0, 2.0, 0.0]},
    "counterfactual_text": "Paris is the capital of",
    "gt_original_target": "Italy",
    "gt_counterfactual_target": "France",
    "layer_hashable": "24-31",
    "token_type": "subject_final",
}  # fmt: skip

ABLATION_ROWS = [
    {"index": 7, "question": "2 + 2 = ?", "choices": ["3", "4", "5", "6"], "correct_answer": "B",
     "zeroshot_prediction": "B", "random_hint_prediction": "D", "hint": "Hint: The answer is D",
     "system_prompt": "sys", "original_user_prompt": "Question: 2 + 2 = ?", "hint_user_prompt": "Question: ... Hint",
     "original_prompt_full": "<full>", "hint_prompt_full": "<full hint>", "changed_pred_bc_hint": None},
    {"index": 8, "question": "Capital of France?", "choices": ["Paris", "Rome", "Oslo", "Lima"], "correct_answer": "A",
     "zeroshot_prediction": "A", "random_hint_prediction": "A", "hint": "Hint: The answer is A",
     "system_prompt": "sys", "original_user_prompt": "q", "hint_user_prompt": "q h", "original_prompt_full": "",
     "hint_prompt_full": "", "changed_pred_bc_hint": False},
]  # fmt: skip


@pytest.mark.parametrize("fmt", ["json", "jsonl", "parquet", "saved"])
def test_act_patch_schema_loads_in_every_format(tmp_path, fmt):
    rows = [ACT_PATCH_ROW, {**ACT_PATCH_ROW, "is_different": False, "ablated_continuation": [" Italy"]}]
    if fmt == "json":
        (path := tmp_path / "a.json").write_text(json.dumps(rows))
    elif fmt == "jsonl":
        (path := tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path := tmp_path / "a.parquet")
    else:
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(path := tmp_path / "saved"))
    got = import_act_patch(path, split="test")
    assert len(got) == 2 and got[0]["split"] == "test"
    assert got[0]["input_text"] == "<|begin_of_text|>Rome is the capital of"
    assert (got[0]["orig_pos"], got[0]["orig_text_token"], got[0]["counterfact_text_token"]) == (1, "Rome", "Paris")
    np.testing.assert_array_equal(got[0]["intervention_vector"], np.array([0.5, -1.0, 2.0, 0.0], dtype=np.float32))
    assert [r["is_different"] for r in got] == [True, False] and got[0]["layer"][0] == 24


def test_input_ablation_schema_derives_null_changed_flags(tmp_path):
    path = tmp_path / "ab.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ABLATION_ROWS))
    got = import_input_ablation(path)
    assert [r["changed_pred_bc_hint"] for r in got] == [True, False]  # the null one derived: B != D
    assert got[0]["question_id"] == 7 and got[0]["zeroshot_prediction"] == "B"


def test_importers_name_missing_columns_and_contradictions(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"layer": [1], "input_tokens": ["a"]}))
    with pytest.raises(UserInputError, match="lacks column"):
        import_act_patch(bad)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({**ABLATION_ROWS[1], "changed_pred_bc_hint": True}))
    with pytest.raises(UserInputError, match="contradicts"):
        import_input_ablation(wrong)
    with pytest.raises(UserInputError, match="does not exist"):
        import_input_ablation(tmp_path / "nope.parquet")
