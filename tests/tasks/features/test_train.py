"""The training subsets behind the features data-efficiency curve."""

import numpy as np
import pytest

from storage.errors import UserInputError
from tasks.features.ground_truth import FeatureSet
from tasks.features.train import explainer_key, readout_set, training_subset
from tests.factories import tiny_features_recipe


def _features(n_train=10, n_test=3) -> FeatureSet:
    split = np.array(["train", "test"] * n_test + ["train"] * (n_train - n_test), dtype=object)  # interleaved
    n = len(split)
    return FeatureSet(np.array([1, 3] * (n // 2) + [1] * (n % 2)), np.arange(n), [f"f{i}" for i in range(n)], split,
                      np.arange(n * 2, dtype=np.float32).reshape(n, 2))  # fmt: skip


def test_a_smaller_n_train_is_a_prefix_of_the_same_permutation_as_a_larger_one():
    fs = _features()
    train_ids = {i for i, s in enumerate(fs.split) if s == "train"}
    subsets = [set(training_subset(fs, n, seed=4).feature_id.tolist()) for n in range(1, 11)]
    assert [len(s) for s in subsets] == list(range(1, 11))
    assert all(a < b for a, b in zip(subsets, subsets[1:], strict=False))  # nested, one feature added per size
    assert subsets[-1] == train_ids  # n_train = all: every training feature, never a test one
    assert set(training_subset(fs, None, seed=4).feature_id.tolist()) == train_ids
    # the order they are added in is seed 4's permutation of the training rows
    order = [next(iter(b - a)) for a, b in zip([set()] + subsets, subsets, strict=False)]
    train_rows = sorted(train_ids)
    assert order == [train_rows[i] for i in np.random.default_rng(4).permutation(10)]
    # another seed, another subset; the same seed, the same one (labels and directions travel with the ids)
    assert set(training_subset(fs, 4, seed=5).feature_id.tolist()) != subsets[3]
    again = training_subset(fs, 4, seed=4)
    assert set(again.feature_id.tolist()) == subsets[3]
    assert again.label == [f"f{i}" for i in again.feature_id] and again.direction.tolist() == [
        [2 * i, 2 * i + 1] for i in again.feature_id
    ]


def test_an_n_train_beyond_the_training_features_is_refused():
    with pytest.raises(UserInputError, match="eval.n_train: 11 exceeds the 10 labelled training features"):
        training_subset(_features(), 11, seed=0)


def test_the_readout_set_names_the_token_under_each_centred_residual():
    # layer 3: rows of tokens 5, 5, 6, 9 (9 has no name, so it is never drawn); layer 9: one row of token 6
    h3 = np.array([[1, 0], [3, 0], [0, 2], [8, 8]], dtype=np.float16)
    layers = {9: {"activation": np.array([[2, 2]], dtype=np.float16), "token_id": np.array([6])},
              3: {"activation": h3, "token_id": np.array([5, 5, 6, 9])}}  # fmt: skip
    vectors, at, labels = readout_set(layers, {5: "a", 6: 'b"'}, 6, seed=0)
    assert at == [3, 9, 3, 9, 3, 9]  # the layers take turns, in order
    # h − μ of each token's rows, μ = (3, 2.5) the mean of all four layer-3 rows (token 9's too)
    allowed = {'the token "a"': [[-2, -2.5], [0, -2.5]], 'the token "b\\""': [[-3, -0.5]]}
    for v, layer, label in zip(vectors, at, labels, strict=True):
        if layer == 9:  # one row, so μ is that row: the centred residual is 0
            assert label == 'the token "b\\""' and v.tolist() == [0, 0]
        else:
            assert v.tolist() in allowed[label]
    assert vectors.dtype == np.float32 and vectors.shape == (6, 2)
    assert readout_set(layers, {5: "a", 6: 'b"'}, 6, seed=0)[2] == labels  # seeded


def test_the_warm_up_moves_the_key_of_every_explainer_that_reads_a_vector_and_not_of_the_text_only_one(tmp_path):
    recipe = tiny_features_recipe(tmp_path, tmp_path / "corpus.txt")
    warmed = recipe.explainers["self"].model_copy(update={"readout_steps": 8})
    warm = recipe.model_copy(update={"explainers": {**recipe.explainers, "self": warmed}})

    def keys(r):
        return {v: explainer_key(r, "gt", "self", v) for v in ("trained", "no_layer", "rotated_basis", "no_activation")}

    before, after = keys(recipe), keys(warm)
    assert {v for v in before if before[v] != after[v]} == {"trained", "no_layer", "rotated_basis"}
