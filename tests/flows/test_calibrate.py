from pathlib import Path

from flows.calibrate import calibrate
from storage.catalog import connect_read_only
from tasks.config import CalibrateRecipe


def tiny_calibrate_recipe(home: Path, corpus: Path, **explainer) -> CalibrateRecipe:
    """tiny-llama reads its own layer-1 and layer-3 residuals of byte tokens (the corpus's letters)."""
    tiny = {"name": "tiny-llama", "autocast": "none"}
    return CalibrateRecipe.model_validate(
        {
            "home": str(home),
            "target": tiny,
            "corpus": {"source": str(corpus), "n_tokens": 2048, "context_length": 64},
            "cache": {"layers": [1, 3], "contexts_per_shard": 32},
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
                **explainer,
            },  # fmt: skip
            "calibration": {"injections": ["residual"], "n_train": 960, "n_test": 20, "split": "occurrences"},
        }
    )


def test_training_makes_the_answer_follow_the_vector(tmp_path, text_file):
    """The readout fails this test the day the vector stops mattering: trained exact match far above v = 0,
    and with shuffled v the answers name the donor's token."""
    recipe = tiny_calibrate_recipe(tmp_path / "store", text_file)
    result = calibrate(recipe)
    con = connect_read_only(tmp_path / "store")
    em = dict(con.execute("select method, value from metrics where task = 'calibration' and split = 'test' "
                          "and metric = 'exact_match'").fetchall())  # fmt: skip
    assert set(em) == {"trained", "zero_vector", "shuffled_vector", "zero_shot"}
    assert em["trained"] >= em["zero_vector"] + 0.3, em
    follows = con.execute("select value from metrics where metric = 'follows_vector' and split = 'test'").fetchone()
    assert follows[0] >= em["shuffled_vector"] + 0.3, (follows, em)
    steps = con.execute("select value from metrics where metric = 'train_steps'").fetchone()[0]
    assert steps == 120
    layers = con.execute("select distinct split from metrics where metric = 'exact_match' order by 1").fetchall()
    assert [s for (s,) in layers] == ["layer_1", "layer_3", "test"]
    assert list(result["results"]) == ["residual"] and result["results"]["residual"]["run_id"].startswith(
        "calibration-residual-"
    )
