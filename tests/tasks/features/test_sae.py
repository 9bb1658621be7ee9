import duckdb
import numpy as np
import pyarrow as pa
import pytest
import torch

from storage.errors import UserInputError
from storage.store import Dataset
from tasks.features.config import SAETrainConfig
from tasks.features.sae import (
    encode,
    exemplars_sql,
    layer_activations,
    layer_seed,
    train_topk_sae,
    write_exemplars,
)


def _sparse_data(n=6000, d=16, n_atoms=24, active=2, seed=0):
    """Vectors that are sums of `active` unit atoms from a known dictionary, with positive weights."""
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(n_atoms, d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    x = np.zeros((n, d))
    for i in range(n):
        idx = rng.choice(n_atoms, active, replace=False)
        x[i] = (rng.uniform(1, 3, size=active)[:, None] * atoms[idx]).sum(0)
    return x.astype(np.float16), atoms


def test_topk_sae_learns_a_sparse_dictionary():
    x, atoms = _sparse_data()
    cfg = SAETrainConfig(expansion=2, k=2, lr=3e-3, batch_tokens=256, epochs=20)
    sae, scale, metrics = train_topk_sae(x, cfg, torch.device("cpu"), seed=0)
    assert metrics["sae_explained_variance"] > 0.8 and metrics["sae_l0"] <= 2.0
    w = sae.W_dec.detach().numpy()
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, atol=1e-5)  # unit decoder directions
    best = (atoms @ w.T).max(axis=1)  # how well each true atom is recovered by some decoder direction
    assert np.median(best) > 0.9
    rows, feats, vals = encode(sae, x[:100], scale, torch.device("cpu"))
    # the sparse triples are exactly the nonzeros of the dense codes of the scaled inputs
    with torch.no_grad():
        dense = sae.encode(torch.from_numpy(x[:100].astype(np.float32) * scale)).numpy()
    nz_rows, nz_feats = np.nonzero(dense > 0)
    assert sorted(zip(rows.tolist(), feats.tolist(), strict=True)) == list(
        zip(nz_rows.tolist(), nz_feats.tolist(), strict=True)
    )
    np.testing.assert_array_equal(vals, dense[rows, feats])
    assert (vals > 0).all() and np.bincount(rows, minlength=100).max() <= 2


def test_every_layer_draws_its_own_sae_initialisation():
    x, _ = _sparse_data(n=512)
    cfg = SAETrainConfig(expansion=2, k=2, batch_tokens=256, epochs=1)
    assert len({layer_seed(0, layer) for layer in range(30)}) == 30 and layer_seed(0, 3) != layer_seed(1, 3)
    w3, w15 = (train_topk_sae(x, cfg, torch.device("cpu"), layer_seed(0, layer))[0].W_dec.detach() for layer in (3, 15))
    same = train_topk_sae(x, cfg, torch.device("cpu"), layer_seed(0, 3))[0].W_dec.detach()
    torch.testing.assert_close(same, w3, rtol=0, atol=0)  # seeded: reproducible
    assert (w3 * w15).sum(-1).abs().mean() < 0.5  # feature i of two layers no longer starts from one direction


def test_exemplars_rank_contexts_by_their_maximum(home):
    fa = Dataset(home, "feature_activations", "k")
    fa.create({})
    fa.write_shard(
        0,
        pa.table(
            {
                "layer": pa.array([3] * 6, pa.int16()),
                "feature_id": pa.array([7] * 5 + [8], pa.int32()),
                "context_id": pa.array([1, 1, 2, 3, 3, 1], pa.int64()),
                "position": pa.array([4, 5, 1, 2, 9, 4], pa.int32()),
                "token_id": pa.array([0] * 6, pa.int32()),
                "value": pa.array([1.0, 4.0, 2.0, 3.0, 0.5, 9.0], pa.float32()),
            }
        ),
    )
    assert write_exemplars(home, "k", n_exemplars=2) == 3
    rows = pa.Table.from_batches(Dataset(home, "exemplars", "k").iter_shards().__next__().to_batches()).to_pylist()
    f7 = [(r["context_id"], r["max_value"], r["max_position"], r["rank"]) for r in rows if r["feature_id"] == 7]
    assert f7 == [(1, 4.0, 5, 1), (3, 3.0, 2, 2)]  # top-2 contexts by max, with the argmax position


def test_a_layer_not_in_the_cache_is_named(home):
    acts = Dataset(home, "activations", "a")
    acts.create({})
    acts.write_shard(
        0,
        pa.table(
            {
                "layer": pa.array([1], pa.int16()),
                "context_id": pa.array([0], pa.int64()),
                "position": pa.array([1], pa.int32()),
                "token_id": pa.array([5], pa.int32()),
                "activation": pa.FixedSizeListArray.from_arrays(pa.array([1.0, 2.0], pa.float16()), 2),
            }
        ),
    )
    assert layer_activations(acts, 1)["activation"].tolist() == [[1.0, 2.0]]
    with pytest.raises(UserInputError, match="layer 2 is not in the activation cache"):
        layer_activations(acts, 2)


def test_exemplars_are_each_features_top_k_contexts_by_max_activation(home):
    """Two layers in two shards (as write_sae_layer writes them), one feature id at both layers, a tie."""
    fa = Dataset(home, "feature_activations", "k")
    fa.create({})
    rows = {  # (feature_id, context_id, position, value)
        1: [(0, 10, 3, 2.0), (0, 10, 7, 5.0), (0, 4, 1, 5.0), (0, 8, 2, 1.0), (0, 8, 4, 0.5), (0, 6, 9, 3.0),
            (2, 4, 5, 0.25)],
        3: [(0, 4, 2, 9.0), (0, 8, 3, 1.0)],
    }  # fmt: skip
    for shard, (layer, rs) in enumerate(rows.items()):
        cols = list(zip(*rs, strict=True))
        fa.write_shard(shard, pa.table({
            "layer": pa.array([layer] * len(rs), pa.int16()), "feature_id": pa.array(cols[0], pa.int32()),
            "context_id": pa.array(cols[1], pa.int64()), "position": pa.array(cols[2], pa.int32()),
            "token_id": pa.array([0] * len(rs), pa.int32()), "value": pa.array(cols[3], pa.float32()),
        }))  # fmt: skip
    assert write_exemplars(home, "k", n_exemplars=3) == 6
    (table,) = Dataset(home, "exemplars", "k").iter_shards()
    got = [(r["layer"], r["feature_id"], r["context_id"], r["max_value"], r["max_position"], r["rank"])
           for r in table.to_pylist()]  # fmt: skip
    # layer 1 feature 0, max per context: c4 5.0 @1, c10 5.0 @7 (tied: lower context first), c6 3.0 @9, c8 1.0
    # (cut by k = 3); feature 2 has one context; layer 3's feature 0 is its own feature
    assert got == [(1, 0, 4, 5.0, 1, 1), (1, 0, 10, 5.0, 7, 2), (1, 0, 6, 3.0, 9, 3), (1, 2, 4, 0.25, 5, 1),
                   (3, 0, 4, 9.0, 2, 1), (3, 0, 8, 1.0, 3, 2)]  # fmt: skip


def test_exemplars_from_candidate_rows_equal_the_full_grouping(home):
    """k = 2 with 2 candidate rows per feature: feature 1's top-2 values (6.0, 4.0) lie in two contexts, so its
    rows ≥ 4.0 decide; feature 0's (9.0, 8.0) both lie in context 5, so it is grouped in full."""
    fa = Dataset(home, "feature_activations", "k")
    fa.create({})
    rs = [(0, 5, 1, 9.0), (0, 5, 2, 8.0), (0, 6, 3, 3.0), (0, 7, 4, 2.0),
          (1, 1, 1, 1.0), (1, 2, 2, 6.0), (1, 3, 5, 4.0), (1, 3, 6, 0.5)]  # fmt: skip
    cols = list(zip(*rs, strict=True))
    fa.write_shard(0, pa.table({
        "layer": pa.array([1] * len(rs), pa.int16()), "feature_id": pa.array(cols[0], pa.int32()),
        "context_id": pa.array(cols[1], pa.int64()), "position": pa.array(cols[2], pa.int32()),
        "token_id": pa.array([0] * len(rs), pa.int32()), "value": pa.array(cols[3], pa.float32()),
    }))  # fmt: skip
    files = [str(p) for p in fa.shard_files()]
    got = duckdb.sql(exemplars_sql(files, 2, candidates=2)).fetchall()
    assert got == [(1, 0, 5, 9.0, 1, 1), (1, 0, 6, 3.0, 3, 2), (1, 1, 2, 6.0, 2, 1), (1, 1, 3, 4.0, 5, 2)]
    assert got == duckdb.sql(exemplars_sql(files, 2, candidates=len(rs))).fetchall()  # every row a candidate
