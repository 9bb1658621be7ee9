"""Patching as an outcome task: its questions in every mode, its sizes from the whole ground truth (not from the
sample it trains on), and the statistics of its vectors under layer_mean."""

import numpy as np
import pyarrow as pa
import pytest

from storage.errors import UserInputError
from storage.store import Dataset
from tasks.common import models
from tasks.explainer.model import SPAN
from tasks.outcomes.protocol import load_rows
from tasks.patching.prompts import DROP, PATCHING_TEMPLATES
from tasks.patching.sweep import all_layers
from tasks.patching.task import PATCHING, prompt_states
from tests.factories import TARGET

ROW = {"pair_id": 3, "chunk": 1, "orig_pos": 5, "layer": [2, 3], "orig_text_token": " Paris",
       "input_text": "The capital of France is", "intervention_vector": [1.0, -2.0, 0.5],
       "is_different": True, "ablated_continuation": [" Rome"]}  # fmt: skip


def test_query_modes_ask_the_same_question_with_and_without_v():
    trained, zero, none, zshot, no_layer, no_token = (
        PATCHING.queries([ROW] * 3, m, seed=1, with_answer=True)[2]
        for m in ("trained", "zero_vector", "no_activation", "zero_shot", "no_layer", "no_token"))  # fmt: skip
    assert trained.text == zero.text and SPAN in trained.text and "<<<The capital of France is>>>" in trained.text
    assert "layer 2, 3" in trained.text and "< Paris>" in trained.text and trained.layer == 2
    np.testing.assert_array_equal(trained.vector, [1.0, -2.0, 0.5])
    assert not zero.vector.any()
    assert none.vector is None and SPAN not in none.text and "feature at" in none.text
    assert zshot.text.startswith(f"If feature {SPAN} at layer 2, 3 is inserted into token < Paris>")
    assert trained.answer == "The most likely output would change to <<< Rome>>>." == zshot.answer
    assert trained.example_id == "pair3/c1/t5"
    assert "layer" not in no_layer.text and "< Paris>" in no_layer.text and SPAN in no_layer.text
    assert "Paris" not in no_token.text and "layer 2, 3" in no_token.text and "  " not in no_token.text
    for template in PATCHING_TEMPLATES:  # every template loses exactly its layer / token phrase
        assert "{layer}" not in DROP["no_layer"].sub("", template) and "{tokens}" in DROP["no_layer"].sub("", template)
        assert "{tokens}" not in DROP["no_token"].sub("", template) and "{layer}" in DROP["no_token"].sub("", template)
    with pytest.raises(ValueError, match="unknown mode"):
        PATCHING.queries([ROW], "no_such_mode", seed=0, with_answer=False)


def test_shuffled_vector_asks_the_same_question_about_another_rows_vector_of_its_chunk():
    rows = [{**ROW, "pair_id": i, "layer": layer, "intervention_vector": [float(i)] * 3}
            for i, layer in enumerate([[0, 1], [0, 1], [2, 3], [2, 3], [2, 3]])]  # fmt: skip
    trained = PATCHING.queries(rows, "trained", seed=4, with_answer=False)
    shuffled = PATCHING.queries(rows, "shuffled_vector", seed=4, with_answer=False)
    assert [q.text for q in shuffled] == [q.text for q in trained]
    donors = [int(q.vector[0]) for q in shuffled]
    assert donors[:2] == [1, 0]  # a chunk of two rows: each takes the other's vector
    assert sorted(donors[2:]) == [2, 3, 4] and all(d != i for i, d in enumerate(donors))  # same chunk, never itself


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
    assert PATCHING.dims(gt) == (6, 4)


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
    stats = PATCHING.vector_stats(gt)
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
        PATCHING.vector_stats(gt)


def test_prompt_states_are_the_sweeps_chunk_means_at_every_text_token_but_the_first():
    """What a fitted Π of patching is fitted on: v as the sweep computes it (the mean over the chunk's layers of
    the block outputs), at each token of each prompt but the first, with the token's string at position + 1."""
    lm = models.load(TARGET)
    texts = ["Paris is in France", "Rome is"]
    states, pieces = prompt_states(lm, texts, [(0, 1), (2, 3)], max_rows=1000, seed=0)
    ids = [lm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert sorted(states) == [0, 2]  # indexed by each chunk's first layer
    s = states[2]
    assert s["context_id"].tolist() == [0] * (len(ids[0]) - 1) + [1] * (len(ids[1]) - 1)
    assert s["position"].tolist() == [*range(2, len(ids[0]) + 1), *range(2, len(ids[1]) + 1)]
    assert s["token_id"].tolist() == ids[0][1:] + ids[1][1:]
    h = all_layers(lm, ids[1])  # [n_layers, T, d]
    np.testing.assert_allclose(s["activation"][-1], h[2:4, -1].mean(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(states[0]["activation"][len(ids[0]) - 1], h[0:2, 1].mean(0).numpy(), rtol=1e-6)
    assert "".join(pieces.tokens(0)) == texts[0] and pieces.tokens(1)[0] == ""  # the empty start piece
    assert len(prompt_states(lm, texts, [(0, 1)], max_rows=3, seed=0)[0][0]["position"]) == 3  # seeded cap
