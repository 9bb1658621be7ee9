"""Outcome explainers: sizes come from the whole ground truth, not from the sample they train on; the
statistics of patching vectors under layer_mean."""

import numpy as np
import pyarrow as pa
import pytest

from storage.errors import UserInputError
from storage.store import Dataset
from tasks.outcomes.explainers import load_rows, target_dims, vector_stats


def test_projection_covers_every_layer_even_when_the_train_sample_misses_the_deepest(tmp_path):
    # Train rows patch layers 0-1, test rows layers 2-3: a Π table sized from the 8 train rows would have
    # 2 entries, and decoding the test rows would index past it (the demo's n_train = 8 cell did).
    gt = Dataset(tmp_path, "patching_gt", "k")
    gt.create({"stage": "test"})
    rows = [{"split": "train", "layer": [0, 1], "intervention_vector": [0.5] * 6}] * 8
    rows += [{"split": "test", "layer": [2, 3], "intervention_vector": [1.0] * 6}] * 4
    gt.write_shard(0, pa.Table.from_pylist(rows))
    gt.mark_complete({})
    assert max(max(r["layer"]) for r in load_rows(gt, "train", 8, seed=0)) == 1
    assert target_dims("patching", gt) == (6, 4)
    assert target_dims("ablation", gt) == (None, 1)


def test_vector_stats_are_per_chunk_from_train_vectors_off_the_sink(tmp_path):
    gt = Dataset(tmp_path, "patching_gt", "k")
    gt.create({"stage": "test"})
    row = lambda split, layer, pos, v: {"split": split, "layer": layer, "counterfact_pos": pos,  # noqa: E731
                                        "intervention_vector": v}  # fmt: skip
    rows = [row("train", [0, 1], 3, [1.0, 0.0]), row("train", [0, 1], 4, [3.0, 0.0]),
            row("train", [0, 1], 0, [900.0, 900.0]),  # the attention sink: left out
            row("test", [0, 1], 2, [50.0, 50.0]),  # another split: left out
            row("train", [2, 3], 5, [0.0, 2.0]), row("train", [2, 3], 6, [0.0, 4.0]), row("train", [2, 3], 7, [0.0, 9.0])]  # fmt: skip
    gt.write_shard(0, pa.Table.from_pylist(rows))
    gt.mark_complete({})
    stats = vector_stats(gt)
    assert sorted(stats.mean) == [0, 2]  # indexed by each chunk's first layer, as Π is
    np.testing.assert_allclose(stats.mean[0], [2.0, 0.0])
    assert stats.spread[0] == 1.0  # |v − μ| = 1, 1
    np.testing.assert_allclose(stats.mean[2], [0.0, 5.0])
    assert stats.spread[2] == 3.0  # |v − μ| = 3, 1, 4: median 3
    np.testing.assert_allclose(stats.centre[2], stats.mean[2])  # residual inputs: centred by their own mean


def test_vector_stats_refuse_a_chunk_with_no_training_vector(tmp_path):
    gt = Dataset(tmp_path, "patching_gt", "k")
    gt.create({"stage": "test"})
    rows = [{"split": "train", "layer": [0], "counterfact_pos": 0, "intervention_vector": [1.0, 0.0]},
            {"split": "test", "layer": [0], "counterfact_pos": 2, "intervention_vector": [1.0, 0.0]}]  # fmt: skip
    gt.write_shard(0, pa.Table.from_pylist(rows))
    gt.mark_complete({})
    with pytest.raises(UserInputError, match="no training vector off position 0 for the chunk at layer 0"):
        vector_stats(gt)
