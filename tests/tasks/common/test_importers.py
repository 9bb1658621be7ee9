"""Fixtures written from the public schemas in paper §4.4 and §5.2, and the features archive's layout."""

import json
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.errors import UserInputError
from tasks.ablation.ground_truth import import_input_ablation
from tasks.features.archive import read_feature_archive
from tasks.patching.ground_truth import import_act_patch
from tests.factories import Payload, write_feature_archive

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


def test_the_features_archive_round_trips(tmp_path):
    v = {2: np.arange(12, dtype=np.float32).reshape(3, 4), 5: -np.ones((2, 4), dtype=np.float32)}
    write_feature_archive(tmp_path / "a", v, {"train": [(2, 0, "dogs"), (2, 2, "cats"), (9, 0, "an uncached layer")],
                                             "test": [(5, 1, "numbers")]})  # fmt: skip
    directions, labels = read_feature_archive(tmp_path / "a", [2, 5], 4, "sae.import_archive")
    np.testing.assert_array_equal(directions[2], v[2])  # a direction per row again
    np.testing.assert_array_equal(directions[5], v[5])
    assert labels == [(2, 0, "dogs", "train"), (2, 2, "cats", "train"), (5, 1, "numbers", "test")]
    with pytest.raises(
        UserInputError, match=r"layer_2.pkl holds no finite \[8 x n_features\] matrix \(shape \[4, 3\]\)"
    ):
        read_feature_archive(tmp_path / "a", [2, 5], 8, "sae.import_archive")
    with pytest.raises(UserInputError, match=r"^sae.import_archive: .*layer_7.pkl does not exist"):
        read_feature_archive(tmp_path / "a", [2, 7], 4, "sae.import_archive")


@pytest.mark.parametrize("where", ["features", "explanations", "idxs"])
def test_a_pickle_carrying_a_callable_is_refused_and_nothing_runs(tmp_path, where):
    write_feature_archive(tmp_path / "a", {2: np.ones((2, 4), dtype=np.float32)},
                          {"train": [(2, 0, "dogs")], "test": [(2, 1, "cats")]})  # fmt: skip
    marker = tmp_path / "ran"
    bomb = pickle.dumps([Payload(marker)])
    target = {"features": "features/layer_2.pkl", "explanations": "explanations/train_explanations.pkl",
              "idxs": "explanations/test_layer_feature_idxs.pkl"}[where]  # fmt: skip
    (tmp_path / "a" / target).write_bytes(bomb)
    with pytest.raises(UserInputError) as err:
        read_feature_archive(tmp_path / "a", [2], 4, "sae.import_archive")
    assert str(err.value).startswith(f"sae.import_archive: {tmp_path / 'a' / target} is refused: it names pathlib")
    assert not marker.exists()  # the callable never ran
    (tmp_path / "a" / target).write_bytes(b"not a pickle at all")
    with pytest.raises(UserInputError, match="is not a readable pickle"):
        read_feature_archive(tmp_path / "a", [2], 4, "sae.import_archive")
