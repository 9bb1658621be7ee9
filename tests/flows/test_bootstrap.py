from pathlib import Path

import pytest

from flows.bootstrap import bootstrap
from flows.features import features
from storage.catalog import connect_read_only
from storage.errors import UserInputError
from storage.store import Dataset
from tasks.explainer import explain
from tasks.features import bootstrap as boot
from tasks.features.config import BootstrapRecipe, FeaturesRecipe
from tests.factories import PROSE, tiny_features_recipe


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A store holding a tiny features ground truth (two layers, 256 SAE features each) and its self explainer."""
    tmp = tmp_path_factory.mktemp("bootstrap")
    corpus = tmp / "corpus.txt"
    corpus.write_text(PROSE * 120)
    data = tiny_features_recipe(tmp / "store", corpus).model_dump()
    data["explainers"] = {"self": {**data["explainers"]["self"], "max_new_tokens": 6}}
    data["eval"].update(prompt_omissions=[], rotated_basis_roles=[], selfie=False)
    features(FeaturesRecipe.model_validate(data))
    return tmp / "store"


def _count(con, sql: str) -> int:
    return con.execute(sql).fetchone()[0]


def test_every_unlabelled_feature_is_described_and_a_sample_scored_beside_auto_interp(trained, monkeypatch):
    recipe = BootstrapRecipe(home=str(trained), n_sample=5, min_contexts=2, shard_size=64)
    result = bootstrap(recipe)
    con = connect_read_only(trained)
    total = _count(con, "select count(*) from features")
    labelled = _count(con, "select count(*) from feature_labels where labeler = 'tokens'")
    described = _count(con, "select count(*) from feature_labels where labeler like 'explainer:%'")
    assert total == 512 and 0 < labelled < total and described == total - labelled == result["described"]["described"]
    both = "select count(*) from feature_labels a join feature_labels b using (layer, feature_id) " \
           "where a.labeler = 'tokens' and b.labeler like 'explainer:%'"  # fmt: skip
    assert _count(con, both) == 0  # the explainer fills the gaps only (no held_out)
    eligible = _count(con, "select count(*) from (select layer, feature_id from feature_labels l join exemplars e "
                           "using (layer, feature_id) where l.labeler like 'explainer:%' group by all "
                           "having count(*) >= 2)")  # fmt: skip
    rows = con.execute("select method, metric, n from metrics where task = 'bootstrap' and split = 'sample' "
                       "order by method").fetchall()  # fmt: skip
    assert rows == [
        ("auto_interp", "simulator_corr", min(5, eligible)),
        ("trained", "simulator_corr", min(5, eligible)),
    ]
    gain = con.execute(
        "select n from paired_gains where task = 'bootstrap' and rival_method = 'auto_interp'"
    ).fetchall()
    assert gain == [(min(5, eligible),)]
    cost = dict(con.execute("select method, value from metrics where metric = 'seconds_per_feature'").fetchall())
    assert set(cost) == {"trained", "auto_interp"} and all(v > 0 for v in cost.values())
    (speedup,) = con.execute("select value from metrics where metric = 'speedup_over_auto_interp'").fetchone()
    assert speedup == pytest.approx(cost["auto_interp"] / cost["trained"])
    coverage = con.execute("select value from metrics where metric = 'coverage'").fetchone()[0]
    assert coverage == 1.0  # every feature has a label of one kind or the other
    # a rerun finds both stages done: nothing is described or scored again, no row is added
    monkeypatch.setattr(explain, "describe", lambda *a, **k: pytest.fail("described again"))
    assert bootstrap(recipe)["run_id"] == result["run_id"]
    assert _count(connect_read_only(trained), "select count(*) from metrics where task = 'bootstrap'") == 9


def test_a_lost_shard_is_described_again_alone_and_held_out_adds_the_test_features(trained, monkeypatch):
    recipe = BootstrapRecipe(home=str(trained), shard_size=64, n_sample=3)
    ck = boot.check_recipe(recipe)
    boot.describe_features(recipe, ck)
    out = Dataset(trained, "feature_labels", boot.labels_key(recipe, ck))
    (out.manifest_dir / "part-00001.json").unlink()
    (out.path / "_COMPLETE.json").unlink()
    asked = []
    real = explain.describe
    monkeypatch.setattr(
        explain, "describe", lambda e, v, layers, seed=None: asked.append(len(layers)) or real(e, v, layers)
    )
    boot.describe_features(recipe, ck)
    assert asked == [64]  # shard 1 alone, whole
    gt = str(ck.meta["gt"])
    unlabelled = boot.to_describe(trained, gt, held_out=False)
    with_test = boot.to_describe(trained, gt, held_out=True)
    assert with_test.num_rows == unlabelled.num_rows + 8  # 4 held-out features per layer
    assert set(with_test.column("split").to_pylist()) == {"unlabelled", "test"}


def test_a_store_without_the_explainers_ground_truth_is_one_line(tmp_path):
    with pytest.raises(UserInputError, match=r"^explainer: the store .* holds no trained features explainer"):
        boot.check_recipe(BootstrapRecipe(home=str(tmp_path / "empty")))
