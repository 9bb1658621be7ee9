import pyarrow as pa

from storage.store import Dataset
from tasks.features.config import LabelConfig
from tasks.features.labels import exemplar_snippets, format_tokens_label, tokens_labels


class _Vocab:
    def __init__(self, texts):
        self.texts = texts

    def decode(self, ids):
        return "".join(self.texts[i] for i in ids)


def test_tokens_label_prefers_specific_tokens_over_frequent_ones(home):
    # token 0 " the" is everywhere; token 1 " Paris" is rare and the feature fires on every occurrence of it.
    n_the, n_paris = 1000, 20
    acts = Dataset(home, "activations", "a")
    acts.create({})
    ids = [0] * n_the + [1] * n_paris + [2] * 50
    acts.write_shard(
        0,
        pa.table({"layer": pa.array([5] * len(ids), pa.int16()), "token_id": pa.array(ids, pa.int32())}),
    )
    fa = Dataset(home, "feature_activations", "k")
    fa.create({})
    fired = [(0, 1.0)] * 60 + [(1, 2.0)] * n_paris  # fires on 6% of " the" (more mass), on all of " Paris"
    fa.write_shard(
        0,
        pa.table(
            {
                "layer": pa.array([5] * len(fired), pa.int16()),
                "feature_id": pa.array([9] * len(fired), pa.int32()),
                "token_id": pa.array([t for t, _ in fired], pa.int32()),
                "value": pa.array([v for _, v in fired], pa.float32()),
            }
        ),
    )
    eligible = pa.table({"layer": pa.array([5], pa.int16()), "feature_id": pa.array([9], pa.int32())})
    vocab = _Vocab({0: " the", 1: " Paris", 2: " x"})
    out = tokens_labels(home, "k", [str(p) for p in acts.shard_files()], vocab, LabelConfig(), eligible)
    assert out.to_pylist() == [{"layer": 5, "feature_id": 9, "label": 'the token "Paris"', "labeler": "tokens"}]


def test_label_formats_and_snippets():
    assert format_tokens_label([" def"]) == 'the token "def"'
    assert format_tokens_label(["a", "b", "c"]) == 'the tokens "a", "b" and "c"'
    assert exemplar_snippets([(["x", " y", " z", "\n"], 1)], width=1) == "- x« y» z "
