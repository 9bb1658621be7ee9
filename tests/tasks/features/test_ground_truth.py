"""The features ground truth's split by feature."""

import pyarrow as pa

from tasks.features.ground_truth import _assign_split


def _labels(layers: list[int]) -> pa.Table:
    return pa.table({"layer": pa.array(layers, pa.int16()), "feature_id": pa.array(range(len(layers)), pa.int32()),
                     "label": pa.array([f"l{i}" for i in range(len(layers))])})  # fmt: skip


LAYERS = [1] * 6 + [3] * 4 + [1, 3, 3] + [5]  # layers interleaved; layer 5 has a single feature


def test_the_split_holds_out_test_per_layer_features_of_every_layer():
    split = _assign_split(_labels(LAYERS), 2, seed=0)
    assert split.column_names == ["layer", "feature_id", "label", "split"]
    assert split.column("feature_id").to_pylist() == list(range(len(LAYERS)))  # rows kept, in order
    tests = [(layer, s) for layer, s in zip(LAYERS, split.column("split").to_pylist(), strict=True) if s == "test"]
    assert sorted(layer for layer, _ in tests) == [1, 1, 3, 3, 5]  # 2 of layer 1's 7, 2 of layer 3's 6, layer 5's one
    assert set(split.column("split").to_pylist()) == {"train", "test"}
    assert len(split) - len(tests) == 9


def test_the_split_is_the_same_for_a_seed_and_differs_for_another():
    def test_ids(seed):
        t = _assign_split(_labels(LAYERS), 2, seed)
        return [f for f, s in zip(t.column("feature_id").to_pylist(), t.column("split").to_pylist(), strict=True)
                if s == "test"]  # fmt: skip

    assert test_ids(0) == test_ids(0)
    assert test_ids(0) != test_ids(1)
    # a layer with fewer features than test_per_layer holds them all out, whatever the seed
    assert all(13 in test_ids(seed) for seed in range(5))
