import random
from pathlib import Path

from flows.calibrate import calibrate
from storage.catalog import connect_read_only
from tasks.explainer.config import CalibrateRecipe


def tiny_calibrate_recipe(home: Path, corpus: Path, **explainer) -> CalibrateRecipe:
    """tiny-llama reads its own layer-0 and layer-1 residuals of byte tokens. A random-init model learns to read a
    vector quickly only when it stands out of the stream: early_add at 20 x |h| after block 0."""
    tiny = {"name": "tiny-llama", "autocast": "none"}
    return CalibrateRecipe.model_validate(
        {
            "home": str(home),
            "target": tiny,
            "corpus": {"source": str(corpus), "n_tokens": 2048, "context_length": 64},
            "cache": {"layers": [0, 1], "contexts_per_shard": 32},
            "explainer": {
                "model": tiny,
                "format": "base",
                "finetune": "full",
                "lr": 3e-3,
                "batch_size": 16,
                "epochs": 1,
                "min_steps": 120,
                "max_steps": 120,
                "max_new_tokens": 16,
                "inject_layer": 0,
                "inject_scale": 20.0,
                **explainer,
            },  # fmt: skip
            "calibration": {"injections": ["early_add"], "n_train": 960, "n_test": 20, "split": "occurrences"},
        }
    )


def test_training_makes_the_answer_follow_the_vector(tmp_path):
    """The readout fails this test the day the vector stops mattering: trained exact match far above v = 0,
    and with shuffled v the answers name the donor's token."""
    corpus = tmp_path / "letters.txt"  # six token types, each seen often enough to learn in 120 steps
    rng = random.Random(0)
    corpus.write_text("".join(rng.choice("abcdef") for _ in range(4000)))
    recipe = tiny_calibrate_recipe(tmp_path / "store", corpus)
    result = calibrate(recipe)
    con = connect_read_only(tmp_path / "store")
    em = dict(con.execute("select method, value from metrics where task = 'calibration' and split = 'test' "
                          "and metric = 'exact_match'").fetchall())  # fmt: skip
    assert set(em) == {"trained", "zero_vector", "shuffled_vector", "zero_shot"}
    assert em["trained"] >= em["zero_vector"] + 0.5, em
    follows = con.execute("select value from metrics where metric = 'follows_vector' and split = 'test'").fetchone()
    assert follows[0] >= em["shuffled_vector"] + 0.5, (follows, em)
    steps = con.execute("select value from metrics where metric = 'train_steps'").fetchone()[0]
    assert steps == 120
    layers = con.execute("select distinct split from metrics where metric = 'exact_match' order by 1").fetchall()
    assert [s for (s,) in layers] == ["layer_0", "layer_1", "test"]
    assert list(result["results"]) == ["early_add"]
    assert result["results"]["early_add"]["run_id"].startswith("calibration-early_add-")


def test_the_fitted_mode_fits_pi_on_training_types_only(tmp_path):
    """Mode embedding_fitted: a run of its own, and a Π fitted on every cached position whose token is not a
    test type (the checkpoint records the pairs per layer; the byte tokenizer pairs every text token)."""
    import json

    import pyarrow.parquet as pq

    from tasks.common.models import byte_tokenizer

    corpus = tmp_path / "letters.txt"
    rng = random.Random(1)
    corpus.write_text("".join(rng.choice("abcdefghijklmnopqrst") for _ in range(4000)))
    recipe = tiny_calibrate_recipe(tmp_path / "store", corpus, min_steps=4, max_steps=4)
    recipe = recipe.model_copy(update={"calibration": recipe.calibration.model_copy(
        update={"injections": ["embedding_fitted"], "split": "types", "test_fraction": 0.3})})  # fmt: skip
    result = calibrate(recipe)
    assert result["results"]["embedding_fitted"]["run_id"].startswith("calibration-embedding_fitted-")
    con = connect_read_only(tmp_path / "store")
    tested = {
        t for (t,) in con.execute("select distinct reference from predictions where task = 'calibration'").fetchall()
    }
    names = {t[len('the token "') : -1] for t in tested}
    tok = byte_tokenizer()
    want: dict[str, int] = {}
    for path in (tmp_path / "store" / "tables" / "activations").rglob("*.parquet"):
        shard = pq.read_table(path, columns=["layer", "position", "token_id"]).to_pydict()
        for layer, position, tid in zip(shard["layer"], shard["position"], shard["token_id"], strict=True):
            if position > 0 and tok.decode([tid]).strip() not in names:  # position 0: the start token, no text
                want[str(layer)] = want.get(str(layer), 0) + 1
    (meta,) = [json.loads(p.read_text()) for p in (tmp_path / "store").rglob("checkpoint/explainer.json")]
    assert meta["fit_pairs"] == want and set(want) == {"0", "1"}
