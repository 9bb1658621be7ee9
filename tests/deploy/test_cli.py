import json
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.cli import main
from storage.catalog import refresh_catalog
from tasks.common import corpus, models
from tasks.common.activations import activations_dataset, plan_cache, write_activations


def _run(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deploy.cli", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "sets, message",
    [
        (["model.name=no-such-model"], "error: model.name: 'no-such-model' is not a registry name"),
        (["model.name=tiny-llama", "cache.layers=[1,7]"], "error: cache.layers: layer 7 is out of range"),
        (
            ["model.name=tiny-llama", "cache.layers=[1]", "corpus.source=/no/such/file.txt"],
            "error: corpus.source: /no/such/file.txt does",
        ),
        (["model.name=tiny-llama", "cache.layerz=[1]"], "error: recipe field 'cache.layerz': unknown key"),
    ],
    ids=["unknown-model", "layer-out-of-range", "missing-corpus", "unknown-key"],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, cli_env, sets, message):
    args = ["run", "cache-activations", "--home", str(tmp_path / "store")] + sum((["--set", s] for s in sets), [])
    proc = _run(args, cli_env, tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message) and "; fix: " in lines[0], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no store, no catalog, nothing


def test_features_flow_checks_explainer_models_before_running(tmp_path, cli_env):
    sets = ["target.name=tiny-llama", "cache.layers=[1]", "explainers.self.model.name=nope-model"]
    args = ["run", "features", "--home", str(tmp_path / "s")] + sum((["--set", s] for s in sets), [])
    proc = _run(args, cli_env, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith("error: explainers.self.model.name: 'nope-model' is not a registry name")
    assert not (tmp_path / "s").exists()


def test_unknown_key_in_a_recipe_file(tmp_path, cli_env):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  name: tiny-llama\ncache:\n  layers: [1]\n  batchsize: 4\n")
    proc = _run(["run", "cache-activations", "-c", str(recipe), "--home", str(tmp_path / "s")], cli_env, tmp_path)
    assert proc.returncode == 2 and "recipe field 'cache.batchsize': unknown key" in proc.stderr
    assert not (tmp_path / "s").exists()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A small store built with the plain functions (no Prefect): tokens + activations + catalog."""
    from tests.factories import PROSE, make_recipe

    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "c.txt").write_text(PROSE * 10)
    recipe = make_recipe(tmp / "store", tmp / "c.txt", corpus={"n_tokens": 320}, cache={"layers": [0, 2]})
    plan = plan_cache(recipe)
    lm = models.load(recipe.model)
    tokens = corpus.tokens_dataset(plan.home, plan.tokens_key)
    corpus.write_tokens(lm.tokenizer, recipe.corpus, tokens, recipe.cache.contexts_per_shard)
    write_activations(lm, recipe.cache, tokens, activations_dataset(plan))
    refresh_catalog(Path(plan.home))
    return Path(plan.home)


QUERY = "select layer, count(*) as n from activations group by layer order by layer"


def test_sql_prints_one_row_per_layer(store, capsys):
    assert main(["sql", QUERY, "--home", str(store)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["layer", "n"] and lines[2].split() == ["0", "310"] and lines[3].split() == ["2", "310"]
    assert lines[-1] == "(2 rows)"


def test_sql_csv_and_json(store, capsys):
    main(["sql", QUERY, "--home", str(store), "--format", "csv"])
    assert capsys.readouterr().out.splitlines() == ["layer,n", "0,310", "2,310"]
    main(["sql", QUERY, "--home", str(store), "--format", "json"])
    assert json.loads(capsys.readouterr().out) == [{"layer": 0, "n": 310}, {"layer": 2, "n": 310}]


def test_sql_errors_are_one_line_exit_2(store, capsys):
    assert main(["sql", "select * from no_such_table", "--home", str(store)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: query: Catalog Error") and len(err.strip().splitlines()) == 1
    assert main(["sql", "create table t (x int)", "--home", str(store)]) == 2  # read-only
    assert main(["sql", "select 1", "--home", str(store.parent / "nowhere")]) == 2


def test_recipe_lists_every_key_with_its_description(capsys):
    assert main(["recipe", "cache-activations"]) == 0
    out = capsys.readouterr().out
    assert "  layers: [3, 15]  # Layers whose residual stream is cached" in out
    assert "n_tokens: 100000" in out
    assert main(["recipe", "nope"]) == 2
