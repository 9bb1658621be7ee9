import numpy as np
import pyarrow as pa
import pytest
import torch

from storage.errors import UserInputError
from storage.store import Dataset
from tasks.features.config import SAETrainConfig
from tasks.features.sae import encode, layer_activations, layer_seed, train_topk_sae, write_exemplars


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
