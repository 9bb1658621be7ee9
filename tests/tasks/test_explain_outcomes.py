"""Outcome explainers' sizes come from the whole ground truth, not from the sample they train on."""

import pyarrow as pa

from storage.store import Dataset
from tasks.explain_outcomes import load_rows, target_dims


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
