"""The features evaluation: what it hands each explainer, its baselines, its item sets."""

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from storage.store import Dataset
from tasks.features.evaluate import EvalItem, act_items, delta_items, explainer_vectors, nearest_neighbour
from tasks.features.ground_truth import FeatureSet
from tests.factories import tiny_features_recipe


def test_act_vectors_are_centred_for_explainers_that_read_centred_directions():
    mu = {3: np.array([10.0, 0.0, 0.0], dtype=np.float32)}
    items = [EvalItem("f", 3, np.array([0.0, 1.0, 0.0], dtype=np.float32), [], "x", "test"),  # an SAE direction
             EvalItem("a", 3, np.array([11.0, 2.0, 0.0], dtype=np.float32), [], None, "ood_act"),  # a residual
             EvalItem("d", 3, np.array([1.0, 0.0, 5.0], dtype=np.float32), [], None, "ood_delta")]  # a difference  # fmt: skip
    centred = explainer_vectors(items, mu, centres=True)
    np.testing.assert_array_equal(centred[0], [0.0, 1.0, 0.0])
    np.testing.assert_array_equal(centred[1], [1.0, 2.0, 0.0])  # its own part, h − μ_ℓ
    np.testing.assert_array_equal(centred[2], [1.0, 0.0, 5.0])  # μ cancels in a difference already
    raw = explainer_vectors(items, mu, centres=False)  # the paper's form ('match'): every vector as it is
    np.testing.assert_array_equal(raw[1], [11.0, 2.0, 0.0])


# -- nearest neighbour ------------------------------------------------------------------------------------


def _feature_set(layer, label, split, direction, feature_id=None) -> FeatureSet:
    n = len(layer)
    return FeatureSet(np.asarray(layer), np.asarray(feature_id if feature_id is not None else range(n)), list(label),
                      np.asarray(split, dtype=object), np.asarray(direction, dtype=np.float32))  # fmt: skip


def test_nearest_neighbour_takes_the_largest_raw_dot_product_pooled_or_within_the_layer():
    # a: a long layer-1 direction; c and d at layer 3, c closer in angle, d longer
    train = _feature_set([1, 1, 3, 3], "abcd", ["train"] * 4, [[10, 0], [0, 1], [1, 0], [0, 3]])
    items = [
        EvalItem("x", 3, np.array([1.0, 0.5], dtype=np.float32), [], None, "test"),  # dots a 10, b .5, c 1, d 1.5
        EvalItem("y", 1, np.array([0.0, 1.0], dtype=np.float32), [], None, "test"),  # dots a 0, b 1, c 0, d 3
        EvalItem("z", 3, np.array([-1.0, -2.0], dtype=np.float32), [], None, "test"),  # dots -10, -2, -1, -6
    ]
    # pooled: x and y take a direction of another layer (a, d)
    assert nearest_neighbour(train, items, layerwise=False) == ["a", "d", "c"]
    # layerwise: only same-layer directions; for x the raw dot picks d (1.5) over c (1), though c is closer in
    # angle (cos .89 vs .45); z's dots are all negative and still the largest of its own layer wins over -inf
    assert nearest_neighbour(train, items, layerwise=True) == ["d", "b", "c"]


# -- SelfIE's scale --------------------------------------------------------------------------------------


def _write_ground_truth(root, key, fs: FeatureSet) -> None:
    """The three tables evaluate() reads of a ground truth: features, feature_labels (with its summary), and
    one exemplar context per feature."""
    n, d = fs.direction.shape
    ids = {"layer": pa.array(fs.layer, pa.int16()), "feature_id": pa.array(fs.feature_id, pa.int32())}
    tables = {
        "features": {**ids, "direction": pa.FixedSizeListArray.from_arrays(pa.array(fs.direction.reshape(-1)), d)},
        "feature_labels": {**ids, "label": pa.array(fs.label), "labeler": pa.array(["hand"] * n),
                           "split": pa.array(list(fs.split))},
        "exemplars": {**ids, "context_id": pa.array(range(n), pa.int64()), "rank": pa.array([1] * n, pa.int64())},
    }  # fmt: skip
    for table, cols in tables.items():
        ds = Dataset(root, table, key)
        ds.create({})
        ds.write_shard(0, pa.table(cols))
        ds.mark_complete({"quality": {}})


@pytest.mark.parametrize(
    "select_score, chosen",
    [({1: 0.2, 10: 0.5, 100: 0.6}, 100), ({1: 0.2, 10: 0.6, 100: 0.6}, 10)],  # a tie: the first listed scale
)
def test_selfie_reports_the_scale_best_on_training_features_and_best_of_scales_per_item(
    tmp_path, monkeypatch, select_score, chosen
):
    """evaluate() with the models faked: SelfIE's descriptions name their scale, a fake scorer reads a table.
    On the held-out items scale 1 would win (mean .65), so choosing on them would show."""
    from tasks.features import evaluate as ev

    fs = _feature_set([1, 1, 1, 3, 3, 3, 1, 3], [f"label{i}" for i in range(8)], ["train"] * 6 + ["test"] * 2,
                      np.arange(32).reshape(8, 4), feature_id=[0, 1, 2, 0, 1, 2, 9, 9])  # fmt: skip
    _write_ground_truth(tmp_path, "gt", fs)
    test_score = {1: {"L1/F9": 0.9, "L3/F9": 0.4}, 10: {"L1/F9": 0.2, "L3/F9": 0.8}, 100: {"L1/F9": 0.3, "L3/F9": 0.3}}
    described = []

    def fake_selfie(target, items, scales, cfg, max_new_tokens, d_target, n_layers):
        described.append(items)
        return {s: [f"{s}|{it.example_id}|{it.split}" for it in items] for s in scales}

    def fake_score(items, descriptions, simulator=None):  # the faked truths below are the items themselves
        out = []
        for it, desc in zip(items, descriptions, strict=True):
            scale, example_id, split = desc.split("|") if "|" in desc else (None, it.example_id, it.split)
            if scale is None:  # gold and nearest neighbour: not under test
                out.append(0.0)
            elif split == "train":
                out.append(select_score[float(scale)])
            else:
                out.append(test_score[float(scale)][example_id])
        return out

    monkeypatch.setattr(ev, "selfie_descriptions", fake_selfie)
    monkeypatch.setattr(ev, "score_items", fake_score)
    monkeypatch.setattr(ev, "exemplar_truth", lambda items, caches, texts: items)
    monkeypatch.setattr(ev, "act_items", lambda *a: [])
    monkeypatch.setattr(ev, "delta_items", lambda *a: [])
    monkeypatch.setattr(ev, "ContextTexts", lambda root, key: None)
    monkeypatch.setattr(ev, "LayerCache", lambda plan, layer: SimpleNamespace(x=np.zeros((1, 4), np.float16)))
    monkeypatch.setattr(ev.models, "load_config", lambda cfg: SimpleNamespace(hidden_size=4, num_hidden_layers=4))
    recipe = tiny_features_recipe(tmp_path, tmp_path / "corpus.txt")
    recipe = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={
        "n_train": None, "judge": None, "simulator": "lexical", "embedding_similarity": False,
        "selfie_scales": [1.0, 10.0, 100.0], "selfie_select": 4, "alignment_contexts": 0})})  # fmt: skip
    plan = SimpleNamespace(home=str(tmp_path), tokens_key="tokens")
    metrics, predictions = ev.evaluate(recipe, plan, "gt", {}, "run")

    # SelfIE described the held-out items, then 4 training features (a seeded sample of the 6), never a test one
    (items,) = described
    assert [it.example_id for it in items[:2]] == ["L1/F9", "L3/F9"]
    picked = items[2:]
    assert len(picked) == 4 and {it.split for it in picked} == {"train"}
    train_dirs = {tuple(v) for v in fs.direction[:6]}
    assert all(tuple(it.vector) in train_dirs for it in picked)
    assert len({tuple(it.vector) for it in picked}) == 4  # without replacement
    value = {(m.method, m.split, m.metric): m.value for m in metrics}
    assert value[("selfie", "train", "selfie_scale")] == chosen
    held_out = [test_score[chosen]["L1/F9"], test_score[chosen]["L3/F9"]]
    assert value[("selfie", "test", "simulator_corr")] == pytest.approx(np.mean(held_out))
    # best of scales: L1/F9 at scale 1 (.9), L3/F9 at scale 10 (.8)
    assert value[("selfie_best_of_scales", "test", "simulator_corr")] == pytest.approx(0.85)
    said = {(p.method, p.example_id): (p.prediction, p.score) for p in predictions}
    assert said[("selfie", "L1/F9")] == (f"{float(chosen)}|L1/F9|test", test_score[chosen]["L1/F9"])
    assert said[("selfie_best_of_scales", "L1/F9")] == ("1.0|L1/F9|test", 0.9)
    assert said[("selfie_best_of_scales", "L3/F9")] == ("10.0|L3/F9|test", 0.8)


# -- the ACT and ΔACT sets -------------------------------------------------------------------------------


def _caches(monkeypatch, tables: dict[int, list[tuple[int, int, list[float]]]]) -> dict:
    """Real LayerCaches over hand-written rows (context_id, position, activation), in no particular order."""
    from tasks.features import ground_truth as gt

    def layer_activations(acts, layer):
        rows = tables[layer]
        return {"context_id": np.array([r[0] for r in rows]), "position": np.array([r[1] for r in rows]),
                "activation": np.array([r[2] for r in rows], dtype=np.float16)}  # fmt: skip

    monkeypatch.setattr(gt, "activations_dataset", lambda plan: None)
    monkeypatch.setattr(gt, "layer_activations", layer_activations)
    return {layer: gt.LayerCache(None, layer) for layer in tables}


ACT_ROWS = {
    1: [(5, 2, [0.0, 2.0]), (9, 3, [-1.0, -1.0]), (2, 1, [3.0, 1.0]), (5, 1, [1.0, 0.0]), (9, 1, [0.5, 0.5])],
    3: [(4, 1, [1.0, 1.0]), (7, 2, [2.0, -1.0])],
}
# per vector v, max over each context's rows of <h, v>, contexts by that descending (top 2):
#   c5p2 (0, 2):   c5 4,   c2 2,   c9 1    -> [5, 2]      c5p1 (1, 0):    c5 1, c2 3,  c9 .5 -> [2, 5]
#   c9p3 (-1, -1): c5 -1,  c2 -4,  c9 2    -> [9, 5]      c9p1 (.5, .5):  c5 1, c2 2,  c9 .5 -> [2, 5]
#   c2p1 (3, 1):   c5 3,   c2 10,  c9 2    -> [2, 5]
#   layer 3: c4p1 (1, 1): c4 2, c7 1 -> [4, 7];  c7p2 (2, -1): c4 1, c7 5 -> [7, 4]
ACT_TOP2 = {"act/L1/c5p2": [5, 2], "act/L1/c9p3": [9, 5], "act/L1/c2p1": [2, 5], "act/L1/c5p1": [2, 5],
            "act/L1/c9p1": [2, 5], "act/L3/c4p1": [4, 7], "act/L3/c7p2": [7, 4]}  # fmt: skip


def _eval_recipe(tmp_path, **eval_fields):
    recipe = tiny_features_recipe(tmp_path, tmp_path / "corpus.txt")
    return recipe.model_copy(update={"eval": recipe.eval.model_copy(update=eval_fields)})


def test_act_items_are_cached_residuals_with_their_top_contexts(tmp_path, monkeypatch):
    caches = _caches(monkeypatch, ACT_ROWS)
    items = act_items(_eval_recipe(tmp_path, ood_act_per_layer=5), caches, k=2)
    # 5 asked per layer: all 5 rows of layer 1, and layer 3's only 2
    assert sorted(it.example_id for it in items) == sorted(ACT_TOP2)
    stored = {(layer, c, p): v for layer, rows in ACT_ROWS.items() for c, p, v in rows}
    for it in items:
        layer, c, p = it.layer, *map(int, it.example_id.split("/c")[1].split("p"))
        assert it.example_id.startswith(f"act/L{layer}/")
        assert it.vector.dtype == np.float32 and it.vector.tolist() == stored[(layer, c, p)]  # the cached residual
        assert it.contexts == ACT_TOP2[it.example_id]
        assert (it.gold, it.split) == (None, "ood_act")
    few = act_items(_eval_recipe(tmp_path, ood_act_per_layer=2), caches, k=2)
    assert [it.layer for it in few] == [1, 1, 3, 3]  # 2 per layer, distinct rows
    assert len({it.example_id for it in few}) == 4 and {it.example_id for it in few} <= set(ACT_TOP2)
    assert [it.example_id for it in act_items(_eval_recipe(tmp_path, ood_act_per_layer=2), caches, k=2)] == [
        it.example_id for it in few
    ]  # seeded by sae.seed


def test_delta_items_are_the_difference_of_the_two_prompts_last_token_states(tmp_path, monkeypatch):
    import torch

    from tasks.common import models
    from tasks.features.evaluate import DELTA_TEMPLATES

    rng = np.random.default_rng(0)
    rows = [(c, p, rng.normal(size=64).tolist()) for c in range(3) for p in (1, 2)]
    caches = _caches(monkeypatch, {1: rows, 2: rows[::-1]})  # layer 3, the last, is normed in HF's states
    recipe = _eval_recipe(tmp_path, delta_act_per_layer=3)
    items = delta_items(recipe, caches, k=2)
    assert [it.layer for it in items] == [1, 2, 1, 2, 1, 2]  # 3 pairs, each at every cached layer
    lm = models.load(recipe.target)
    for it in items:
        j, subjects = it.example_id.split("/")[2].split(":")
        a, b = subjects.split("-")
        assert it.example_id.startswith(f"delta/L{it.layer}/") and a != b
        hidden = []  # HF's hidden_states[layer + 1]: the output of block `layer`, independent of residual_stream
        for subject in (a, b):
            ids = lm.tokenizer(DELTA_TEMPLATES[int(j) % len(DELTA_TEMPLATES)].format(subject), return_tensors="pt")
            with torch.no_grad():
                out = lm.model(**ids, output_hidden_states=True)
            hidden.append(out.hidden_states[it.layer + 1][0, -1].float().numpy())
        np.testing.assert_allclose(it.vector, hidden[0] - hidden[1], rtol=1e-5, atol=1e-5)
        assert it.contexts == caches[it.layer].top_contexts(it.vector, 2) and it.split == "ood_delta"
    assert delta_items(_eval_recipe(tmp_path, delta_act_per_layer=0), caches, k=2) == []


def test_each_items_truth_is_computed_once_and_scores_every_description_by_hand():
    """Context 7 holds positions 1..3 with h·v = 2, -1, 1: true activations [2, 0, 1] on " cat", " dog", " cow".
    Naming " cat" predicts [1, 0, 0]: corr = 1 / sqrt(2/3 · 2) = √3/2; naming no stored token scores 0."""
    from tasks.features.evaluate import exemplar_truth, score_items
    from tasks.features.ground_truth import LayerCache

    cache = LayerCache.__new__(LayerCache)  # the one context a real cache would hold, without a store
    cache.x = np.array([[2.0, 5.0], [-1.0, 5.0], [1.0, 5.0]], dtype=np.float16)
    cache.position, cache.rows = np.array([1, 2, 3]), {7: (0, 3)}
    texts = SimpleNamespace(tokens=lambda c: {7: ["<s>", " cat", " dog", " cow"]}[c])
    calls = []
    cache.true_acts = lambda v, c, real=cache.true_acts: calls.append(c) or real(v, c)
    item = EvalItem("f", 3, np.array([1.0, 0.0], dtype=np.float32), [7], None, "test")
    (truth,) = exemplar_truth([item], {3: cache}, texts)
    assert truth.tokens == [[" cat", " dog", " cow"]] and truth.acts[0].tolist() == [2.0, 0.0, 1.0]
    scores = score_items([truth] * 2, ['the token " cat"', 'the token " owl"'])
    assert scores == pytest.approx([3**0.5 / 2, 0.0]) and calls == [7]
