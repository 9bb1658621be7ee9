"""The patching and ablation flows end to end on tiny models: ground truth, explainers, every method's metrics."""

import json
from pathlib import Path

import numpy as np
import pytest

from flows.ablation import ablation
from flows.patching import patching
from storage.catalog import connect_read_only
from tests.factories import tiny_ablation_recipe, tiny_explainers, tiny_patching_recipe

PATCHING_METHODS = {("trained", "tiny-llama"), ("trained", "tiny-gemma3"), ("zero_vector", "tiny-llama"),
                    ("zero_vector", "tiny-gemma3"), ("shuffled_vector", "tiny-llama"), ("shuffled_vector", "tiny-gemma3"),
                    ("no_activation", "tiny-llama"), ("rotated_basis", "tiny-llama"), ("zero_shot", "tiny-llama"),
                    ("zero_shot", "tiny-gemma3"), ("majority", "")}  # fmt: skip
ABLATION_METHODS = {("trained", "tiny-llama"), ("trained", "tiny-gemma3"), ("zero_shot", "tiny-llama"),
                    ("zero_shot", "tiny-gemma3"), ("majority", ""), ("position_bias", ""), ("correct_answer", "")}  # fmt: skip


@pytest.mark.parametrize(
    "flow, make, methods, table",
    [(patching, tiny_patching_recipe, PATCHING_METHODS, "patching_gt"),
     (ablation, tiny_ablation_recipe, ABLATION_METHODS, "ablation_gt")],
)  # fmt: skip
def test_flow_fills_metrics_for_every_method(tmp_path, flow, make, methods, table):
    recipe = make(tmp_path / "store")
    result = flow(recipe)
    con = connect_read_only(tmp_path / "store")
    n_test = con.execute(f"select count(*) from {table} where split = 'test'").fetchone()[0]
    got = con.execute("select distinct method, explainer_model from metrics").fetchall()
    assert set(got) == methods
    rows = con.execute(
        "select method, explainer_model, metric, value, se, n from metrics where split = 'test'"
    ).fetchall()
    metrics = {(m, e, k): (v, se, n) for m, e, k, v, se, n in rows}
    for method, model in methods:
        for name in ("exact_match", "has_changed_f1", "content_match", "strict_exact_match", "parse_rate"):
            value, se, n = metrics[(method, model, name)]
            assert 0 <= value <= 1 and se >= 0 and n == min(n_test, recipe.eval.n_test)
    # The majority baseline always says the same sentence, so it parses and its flag is right on one class only.
    assert metrics[("majority", "", "parse_rate")][0] == 1.0
    f1 = metrics[("majority", "", "has_changed_f1")][0]
    assert f1 <= 0.5 + 1e-9
    # Predictions: one row per (method, test row); the score is the item's exact match.
    n_pred = con.execute("select count(*) from predictions").fetchone()[0]
    assert n_pred == len(methods) * min(n_test, recipe.eval.n_test)
    em_pred = con.execute("select avg(score) from predictions where method = 'majority'").fetchone()[0]
    assert em_pred == pytest.approx(metrics[("majority", "", "exact_match")][0])
    if flow is patching:  # the other explainer's Π was fitted for every chunk (layers 0-1 and 2-3)
        meta = json.loads((Path(result["explainers"]["other/trained"]) / "checkpoint" / "explainer.json").read_text())
        assert sorted(meta["fit_pairs"]) == ["0", "2"] and min(meta["fit_pairs"].values()) > 0
    # A rerun finds every stage complete and writes nothing new.
    again = flow(recipe)
    assert again["results"]["run_id"] == result["results"]["run_id"]
    assert (
        connect_read_only(tmp_path / "store").execute("select count(*) from metrics").fetchone()[0]
        == len(rows) + con.execute("select count(*) from metrics where split <> 'test'").fetchone()[0]
    )


def test_imported_public_rows_train_and_score_unchanged(tmp_path):
    """A user with the public act_patch / input_ablation files trains on them: no target model is run."""
    rng = np.random.default_rng(0)

    def act_patch(n: int) -> list[dict]:
        return [{"layer": [4, 5, 6, 7], "input_tokens": ["Rome", " is", " the", " capital", " of"],
                 "original_continuation": [" Italy"], "ablated_continuation": [" France" if i % 2 else " Italy"],
                 "is_different": bool(i % 2), "token_type": "subject_final",
                 "patch_position": {"orig_pos": 0, "orig_text_token": "Rome", "counterfact_pos": 0,
                                    "counterfact_text_token": "Paris",
                                    "intervention_vector": rng.normal(size=8).tolist()}} for i in range(n)]  # fmt: skip

    for split, n in (("train", 24), ("test", 4)):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in act_patch(n)))
    recipe = tiny_patching_recipe(tmp_path / "store").model_copy(
        update={"patching": tiny_patching_recipe(tmp_path).patching.model_copy(
            update={"import_train": str(tmp_path / "train.jsonl"), "import_test": str(tmp_path / "test.jsonl")}),
            "explainers": tiny_explainers()}  # 8-wide vectors: not the tiny explainer's own layer states
    )  # fmt: skip
    result = patching(recipe)
    assert result["ground_truth"]["rows"] == 28 and result["ground_truth"]["test"] == 4
    con = connect_read_only(tmp_path / "store")
    n = con.execute("select max(n) from metrics where method = 'trained' and split = 'test'").fetchone()[0]
    assert n == 4
    meta = json.loads((Path(result["explainers"]["self/trained"]) / "checkpoint" / "explainer.json").read_text())
    assert meta["d_target"] == 8 and meta["n_target_layers"] == 8  # read off the imported vectors
