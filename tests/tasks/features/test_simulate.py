import numpy as np
import pytest
import torch

from tasks.features.labels import format_tokens_label
from tasks.features.simulate import (
    SentenceEmbedder,
    description_keys,
    lexical_simulate,
    mean_se,
    pooled_corr,
    simulator_score,
)


def _constructed_feature():
    """A feature that fires on ' Paris' and ' Lyon' (more on Paris) in three exemplar sentences."""
    sents = [
        [" The", " capital", " is", " Paris", ".", " Lyon", " is", " big"],
        [" Paris", " has", " a", " river"],
        [" I", " flew", " from", " Lyon", " to", " Paris", " today"],
    ]
    acts = [np.array([5.0 if t == " Paris" else 3.0 if t == " Lyon" else 0.0 for t in s]) for s in sents]
    return sents, acts


def test_exact_description_beats_shuffled_descriptions():
    sents, acts = _constructed_feature()
    exact = simulator_score('the tokens "Paris" and "Lyon"', sents, acts)
    assert exact > 0.95
    shuffled = [simulator_score(d, sents, acts) for d in ('the token "river"', 'the tokens "is" and "big"')]
    assert all(s < exact - 0.5 for s in shuffled)
    assert simulator_score('the token "Paris"', sents, acts) > simulator_score('the token "Lyon"', sents, acts)


def test_free_text_is_read_by_its_words():
    assert description_keys("The meaning of the word is Paris, a city") == {"paris", ",", "city"}
    assert lexical_simulate("mentions of Paris", [" Paris", " London"]).tolist() == [1.0, 0.0]


def test_pooled_corr_clips_true_activations_and_handles_constants():
    assert pooled_corr(np.array([1.0, 0.0, 1.0]), np.array([2.0, -5.0, 2.0])) == pytest.approx(1.0)
    assert pooled_corr(np.zeros(3), np.array([1.0, 2.0, 3.0])) == 0.0  # no information
    assert pooled_corr(np.array([0.0, 1.0, 0.0]), np.array([1.0, 0.0, 1.0])) == pytest.approx(-1.0)


def test_mean_se():
    mean, se, n = mean_se([1.0, 2.0, 3.0, 4.0])
    assert (mean, n) == (2.5, 4) and se == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)


def test_sentence_embeddings_rank_paraphrases_above_unrelated_text():
    emb = SentenceEmbedder()
    sims = emb.similarity(["mentions of dogs and puppies", "mentions of dogs and puppies"],
                          ["references to dogs", "tax law in the eighteenth century"])  # fmt: skip
    assert sims[0] > sims[1] + 0.3
    assert emb.similarity(["same text"], ["same text"])[0] == pytest.approx(1.0, abs=1e-5)


def test_judge_rating_maps_the_rubric_and_counts_unparseable_replies():
    from tasks.features.simulate import JUDGE_PROMPT, judge_rating

    assert [judge_rating(r) for r in ("5", "Rating: 3", "1.", "no idea", "9")] == [1.0, 0.5, 0.0, None, None]
    assert JUDGE_PROMPT.splitlines()[0].endswith("activates? ")  # verbatim, trailing space included
    assert "Predicted: x\nExpected: y" in JUDGE_PROMPT.format(predicted_label="x", expected_label="y")


def test_lm_simulator_reads_one_expected_bin_per_exemplar_token():
    from tasks.features.simulate import LMSimulator

    sim = LMSimulator("tiny-llama")  # byte tokenizer: bins 0-9 are single tokens, "10" is not
    assert sim.values.tolist() == list(range(10))
    exemplars = [[" Paris", " is", " big"], ["Lyon", "!"]]
    preds = sim.predict('the token "Paris"', exemplars)
    assert [len(p) for p in preds] == [3, 2]
    # each value is the expected bin, sum_k k * softmax(logits of bins)_k, at the last simulator token of the
    # exemplar token: computed here on each exemplar alone (byte tokenizer: that token ends at the same character)
    tok = sim.lm.tokenizer
    for toks, pred in zip(exemplars, preds, strict=True):
        prefix = sim.PROMPT.format(description='the token "Paris"')
        ids = tok(prefix + "".join(toks), return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad(), sim.lm.runtime.autocast_context():  # the simulator's precision
            logits = sim.lm.model(input_ids=ids).logits[0].float()
        ends = np.cumsum([len(t.encode()) for t in toks]) + len(prefix.encode()) - 1  # one token a byte
        assert ids.shape[1] == len((prefix + "".join(toks)).encode())
        hand = [float((logits[e, sim.bin_ids].softmax(-1) * torch.arange(10.0)).sum()) for e in ends]
        np.testing.assert_allclose(pred, hand, rtol=0, atol=2e-3)  # alone vs in a right-padded batch
    # the prediction for a token depends only on the text up to it (causal LM): the same prefix, the same value
    again = sim.predict('the token "Paris"', [[" Paris", " is", " small", " today"]])
    np.testing.assert_allclose(again[0][:2], preds[0][:2], rtol=1e-5, atol=1e-5)
    score = simulator_score('the token "Paris"', exemplars, [np.array([3.0, 0, 0]), np.array([1.0, 0])], sim)
    hand = abs(np.corrcoef(np.concatenate(preds), [3.0, 0, 0, 1.0, 0])[0, 1])  # |Pearson|, pooled over 5 tokens
    assert score == pytest.approx(hand, rel=1e-6)


def test_labels_are_read_the_way_they_are_written():
    """format_tokens_label quotes with json.dumps: an escaped quote or backslash is that token, not a '\\'."""
    label = format_tokens_label(['"', "\\", "def"])
    assert label == 'the tokens "\\"", "\\\\" and "def"'
    assert description_keys(label) == {'"', "\\", "def"}
    assert lexical_simulate(label, ['"', "\\", " def", "x"]).tolist() == [1.0, 1.0, 1.0, 0.0]
