from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from storage.errors import UserInputError
from tasks.common import corpus, models
from tasks.common.activations import (
    activation_shard,
    activations_dataset,
    check_layers,
    plan_cache,
    residual_stream,
    select_positions,
    write_activations,
)
from tasks.common.config import CacheConfig, ModelConfig


@pytest.fixture(scope="module")
def lm():
    return models.load(ModelConfig(name="tiny-llama", autocast="none"))


def _ids(lm, n: int = 3, length: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, len(lm.tokenizer), (n, length), generator=g)


def test_residual_stream_equals_hf_hidden_states(lm):
    ids = _ids(lm)
    with torch.inference_mode():
        hidden = lm.model(ids, output_hidden_states=True).hidden_states  # [n_layers + 1] x [B, L, d]
    got = residual_stream(lm, ids, [0, 2])
    torch.testing.assert_close(got[0], hidden[1], rtol=0, atol=0)
    torch.testing.assert_close(got[2], hidden[3], rtol=0, atol=0)


def test_forward_stops_after_the_deepest_requested_block(lm):
    ran = []
    handle = models.decoder_layers(lm.model)[3].register_forward_hook(lambda *a: ran.append(3))
    try:
        residual_stream(lm, _ids(lm), [1])
        assert ran == []
        residual_stream(lm, _ids(lm), [3])
        assert ran == [3]
    finally:
        handle.remove()


def test_sampled_positions_do_not_depend_on_batching():
    cfg = CacheConfig(layers=[0], positions_per_context=3, skip_first=2, seed=7)
    whole = select_positions(cfg, np.arange(10), 16)
    parts = np.concatenate([select_positions(cfg, np.arange(0, 4), 16), select_positions(cfg, np.arange(4, 10), 16)])
    np.testing.assert_array_equal(whole, parts)
    # each context's 3 positions: drawn from 2..15 without replacement by a generator seeded (seed, context_id)
    hand = [sorted(np.random.default_rng([7, c]).choice(np.arange(2, 16), 3, replace=False)) for c in range(10)]
    assert whole.tolist() == [[int(p) for p in row] for row in hand]
    assert all(len(set(row)) == 3 for row in whole)
    assert not np.array_equal(whole[0], whole[1])  # each context draws its own


@pytest.mark.parametrize("dtype, tol", [("float32", 0.0), ("float16", 1e-3)])
def test_shard_rows_hold_the_right_vectors(lm, dtype, tol):
    ids = _ids(lm, n=5, length=10).numpy().astype(np.int32)
    cfg = CacheConfig(layers=[1, 3], batch_size=2, dtype=dtype)
    table = activation_shard(lm, cfg, np.arange(100, 105), ids)
    assert table.num_rows == 2 * 5 * 9  # layers x contexts x positions 1..9
    # The reference runs the same batches of 2: float32 kernels may round differently at another batch shape.
    parts = [residual_stream(lm, torch.tensor(ids[s : s + 2], dtype=torch.long), [1, 3]) for s in range(0, 5, 2)]
    hidden = {layer: torch.cat([p[layer] for p in parts]) for layer in (1, 3)}
    rows = table.to_pylist()
    for row in (rows[0], rows[44], rows[45], rows[-1]):
        expected = hidden[row["layer"]][row["context_id"] - 100, row["position"]].numpy()
        np.testing.assert_allclose(np.array(row["activation"]), expected, rtol=tol, atol=tol)
        assert row["token_id"] == ids[row["context_id"] - 100, row["position"]]
    assert [r["layer"] for r in rows[:45]] == [1] * 45  # layer-major


def test_layer_out_of_range_names_the_fix():
    with pytest.raises(UserInputError, match=r"cache.layers: layer 4 is out of range .* use layers between 0 and 3"):
        check_layers([0, 4], 4, "tiny-llama")


def test_write_resumes_without_rewriting_done_shards(lm, recipe_factory):
    recipe = recipe_factory()
    plan = plan_cache(recipe)
    tokens = corpus.tokens_dataset(plan.home, plan.tokens_key)
    corpus.write_tokens(lm.tokenizer, recipe.corpus, tokens, recipe.cache.contexts_per_shard)
    out = activations_dataset(plan)
    first = write_activations(lm, recipe.cache, tokens, out)
    assert first["shards"] == 4 and first["shards_written"] == 4 and first["tokens"] == 64 * 31
    # Simulate a crash after shard 1: drop the completion marker and the later shards' manifest rows.
    (out.path / "_COMPLETE.json").unlink()
    for i in (2, 3):
        (out.manifest_dir / f"part-{i:05d}.json").unlink()
    kept = {i: out.shard_path(i).stat().st_ino for i in (0, 1)}
    before = [pq.read_table(out.shard_path(i)) for i in range(4)]
    again = write_activations(lm, recipe.cache, tokens, out)
    assert (again["shards_written"], again["shards_skipped"]) == (2, 2)
    assert {i: out.shard_path(i).stat().st_ino for i in (0, 1)} == kept
    for i in range(4):
        assert pq.read_table(out.shard_path(i)).equals(before[i])


def test_plan_keys_track_what_changes_the_result(recipe_factory):
    base = plan_cache(recipe_factory())
    assert plan_cache(recipe_factory(cache={"batch_size": 8})).activations_key == base.activations_key
    assert plan_cache(recipe_factory(cache={"layers": [1]})).activations_key != base.activations_key
    assert plan_cache(recipe_factory(cache={"dtype": "float32"})).activations_key != base.activations_key
    assert plan_cache(recipe_factory(model={"autocast": "bfloat16"})).activations_key != base.activations_key
    assert plan_cache(recipe_factory(model={"seed": 1})).tokens_key != base.tokens_key
    assert not Path(base.home).exists()  # planning writes nothing
