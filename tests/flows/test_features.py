import numpy as np
import pytest

from flows.features import features
from storage.catalog import connect_read_only
from tasks.features.config import FeaturesRecipe
from tasks.features.ground_truth import LayerCache, check_recipe
from tests.factories import tiny_features_recipe, write_feature_archive


def test_features_flow_fills_the_result_contract(tmp_path, text_file):
    text_file.write_text(text_file.read_text() * 6)
    recipe = tiny_features_recipe(tmp_path / "store", text_file)
    result = features(recipe)
    assert result["ground_truth"]["test"] == 8
    con = connect_read_only(tmp_path / "store")
    rows = con.execute(
        "select method, explainer_model, value, se, n from metrics "
        "where task = 'features' and metric = 'simulator_corr' and split = 'test' order by all"
    ).fetchall()
    got = {(m, e) for m, e, *_ in rows}
    assert got == {
        ("gold", "tiny-llama"), ("nearest_neighbor", "tiny-llama"), ("nearest_neighbor_layerwise", "tiny-llama"),
        ("selfie", "tiny-llama"), ("selfie_best_of_scales", "tiny-llama"), ("trained", "tiny-llama"), ("trained", "tiny-gemma3"),
        ("zero_vector", "tiny-llama"), ("zero_vector", "tiny-gemma3"),
        ("shuffled_vector", "tiny-llama"), ("shuffled_vector", "tiny-gemma3"),
        ("no_activation", "tiny-llama"), ("no_layer", "tiny-llama"),  # the self explainer's prompt omissions
        ("rotated_basis", "tiny-llama"),  # and its rotated-basis control
    }  # fmt: skip
    steps = con.execute("select method, value from metrics where metric = 'train_steps' and explainer_model = "
                        "'tiny-llama' order by method").fetchall()  # fmt: skip
    assert steps == [(m, 2.0) for m in ("no_activation", "no_layer", "rotated_basis", "trained")]  # 27 rows / 16
    best = con.execute("select method, value from metrics where metric = 'best_step' and explainer_model = "
                       "'tiny-llama' order by method").fetchall()  # fmt: skip
    assert [m for m, _ in best] == [m for m, _ in steps] and all(b in (1.0, 2.0) for _, b in best)  # a validation step
    # each row is its method's mean over the 8 held-out items' scores in `predictions`, with the sample SE
    per_item = {(m, e): (v, se) for m, e, v, se in con.execute(
        "select method, explainer_model, avg(score), stddev_samp(score) / sqrt(count(*)) from predictions "
        "where task = 'features' and split = 'test' group by all").fetchall()}  # fmt: skip
    for m, e, v, se, n in rows:
        assert n == 8 and (v, se) == pytest.approx(per_item[(m, e)], abs=1e-12), (m, e)
    for split in ("ood_act", "ood_delta"):  # every method but gold
        assert con.execute(f"select count(*) from metrics where split = '{split}'").fetchone()[0] == 13
    # Privileged-access diagnostics: both scores for both trained explainers (not for the prompt omissions)
    aligned = con.execute("select explainer_model, metric, value, n from metrics where task = 'alignment' "
                          "order by all").fetchall()  # fmt: skip
    assert [(e, m) for e, m, _, _ in aligned] == [
        ("tiny-gemma3", "dot_product_similarity"), ("tiny-gemma3", "sae_pattern_similarity"),
        ("tiny-llama", "dot_product_similarity"), ("tiny-llama", "sae_pattern_similarity"),
    ]  # fmt: skip
    assert all(-1 <= v <= 1 for _, _, v, _ in aligned) and all(n > 0 for *_, n in aligned)
    sae = con.execute(
        "select split, value from metrics where method = 'sae' and metric = 'sae_l0' order by 1"
    ).fetchall()
    assert sae == [("layer_1", 4.0), ("layer_3", 4.0)]  # TopK: exactly k active features per token
    # predictions hold one row per (method, item); gold predictions equal their reference
    assert con.execute(
        "select count(*) from predictions where method = 'gold' and prediction != reference"
    ).fetchone() == (0,)
    assert con.execute("select count(distinct example_id) from predictions where split = 'test'").fetchone() == (8,)
    labels = con.execute("select count(*), count(distinct split) from feature_labels").fetchone()
    assert labels[0] > 8 and labels[1] == 2
    assert con.execute("select status from runs").fetchone() == ("completed",)
    judged = con.execute("select count(*) from metrics where metric = 'judge_score' and value between 0 and 1")
    assert judged.fetchone() == (13,)  # the tiny judge rarely answers a digit: unparseable replies count as 0
    con.close()
    again = features(recipe)  # a rerun trains nothing and writes no new rows
    assert again["results"]["run_id"] == result["results"]["run_id"]
    con = connect_read_only(tmp_path / "store")
    assert con.execute("select count(*) from runs").fetchone() == (1,)


def test_features_flow_trains_on_an_imported_archive(tmp_path, text_file):
    text_file.write_text(text_file.read_text() * 6)
    rng = np.random.default_rng(0)
    v = {layer: rng.normal(size=(40, 64)).astype(np.float32) for layer in (1, 3)}  # 40 directions per layer
    write_feature_archive(tmp_path / "archive", v, {
        "train": [(layer, i, f"concept {i % 5}") for layer in (1, 3) for i in range(30)],
        "test": [(layer, i, f"concept {i % 5}") for layer in (1, 3) for i in range(30, 34)],
    })  # fmt: skip
    data = tiny_features_recipe(tmp_path / "store", text_file).model_dump()
    data["sae"]["import_archive"] = str(tmp_path / "archive")
    data["explainers"] = {"self": data["explainers"]["self"]}
    data["eval"].update(prompt_omissions=[], rotated_basis_roles=[], selfie=False)
    recipe = FeaturesRecipe.model_validate(data)
    result = features(recipe)
    assert {k: result["ground_truth"][k] for k in ("labelled", "train", "test")} == {"labelled": 68, "train": 60,
                                                                                      "test": 8}  # fmt: skip
    con = connect_read_only(tmp_path / "store")
    assert con.execute("select distinct labeler from feature_labels").fetchall() == [("imported",)]
    trained = con.execute("select n from metrics where method = 'trained' and metric = 'simulator_corr' and "
                          "split = 'test'").fetchall()  # fmt: skip
    assert trained == [(8,)]
    # exemplars are mined from this cache by each imported direction: the contexts of the k largest
    # max_t <h_t, v>, in order. Compared by value (float64 here), since float32 rounding of near-equal
    # contexts differs between a matrix-vector and a matrix-matrix product and may swap two of them.
    mined = con.execute("select context_id, max_value from exemplars where layer = 3 and feature_id = 7 "
                        "order by rank").fetchall()  # fmt: skip
    cache = LayerCache(check_recipe(recipe), 3)
    per_context = np.maximum.reduceat(cache.x.astype(np.float64) @ v[3][7].astype(np.float64), cache.starts)
    value = dict(zip(cache.context_id[cache.starts].tolist(), per_context, strict=True))
    top = np.sort(per_context)[::-1][: recipe.sae.n_exemplars]
    assert len({c for c, _ in mined}) == len(mined) == recipe.sae.n_exemplars
    np.testing.assert_allclose([value[c] for c, _ in mined], top, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([m for _, m in mined], top, rtol=1e-4, atol=1e-5)
