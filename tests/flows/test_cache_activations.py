import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from flows.cache_activations import cache_activations
from storage.catalog import connect_read_only, refresh_catalog
from tasks.common import corpus, models
from tasks.common.activations import activations_dataset, plan_cache, write_activations


def _task_states(flow_state) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id]))
        )
    return {r.name.rsplit("-", 1)[0]: r.state.name for r in runs}


def test_flow_writes_queryable_tables_and_a_rerun_is_cached(recipe_factory):
    recipe = recipe_factory()
    state = cache_activations(recipe, return_state=True)
    result = state.result()
    assert result["activations"]["rows"] == 2 * 64 * 31  # layers x contexts x (32 - BOS)
    con = connect_read_only(Path(recipe.home))
    assert con.execute("select layer, count(*) from activations group by layer order by layer").fetchall() == [
        (1, 64 * 31),
        (3, 64 * 31),
    ]
    assert con.execute("select count(*) from tokens").fetchone() == (64 * 32,)
    # the stored token text lines up with the stored activations
    joined = con.execute(
        "select count(*) from activations a join tokens t using (context_id, position) where a.token_id = t.token_id"
    ).fetchone()
    assert joined == (2 * 64 * 31,)
    con.close()
    # The first rerun finds the datasets complete (no model is loaded); from then on Prefect's cache answers.
    cache_activations(recipe)
    again = cache_activations(recipe, return_state=True)
    states = _task_states(again)
    assert states["tokenize-corpus"] == "Cached" and states["cache-residual-stream"] == "Cached"


def _cli(args: list[str], env: dict, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "deploy.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the kill takes the Prefect server with it
        **kw,
    )


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_matches_an_uninterrupted_run(tmp_path, cli_env):
    text = tmp_path / "big.txt"
    text.write_text(("Interpretability asks what a network computes, and why. " * 40 + "\n") * 100)
    home = tmp_path / "killed"
    sets = [
        "model.name=tiny-llama", "model.autocast=none", f"corpus.source={text}", "corpus.n_tokens=131072",
        "corpus.context_length=64", "cache.layers=[0,3]", "cache.contexts_per_shard=8", "cache.batch_size=8",
    ]  # fmt: skip
    args = ["run", "cache-activations", "--home", str(home), *sum((["--set", s] for s in sets), [])]
    proc = _cli(args, cli_env)
    manifest = None
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        found = list(home.glob("tables/activations/*/_manifest/part-*.json"))
        if len(found) >= 3:
            manifest = found[0].parent
            break
        time.sleep(0.02)
    assert manifest is not None, f"no shard appeared: {proc.communicate()}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    dataset = manifest.parent
    done = sorted(p.name.replace(".json", ".parquet") for p in manifest.glob("part-*.json"))
    assert not (dataset / "_COMPLETE.json").exists() and 3 <= len(done) < 256
    stamps = {n: ((dataset / n).stat().st_ino, (dataset / n).stat().st_mtime_ns) for n in done}

    rerun = _cli(args, cli_env)
    out, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err[-2000:]
    assert (dataset / "_COMPLETE.json").exists()
    assert {n: ((dataset / n).stat().st_ino, (dataset / n).stat().st_mtime_ns) for n in done} == stamps
    assert not list(dataset.glob(".*tmp*"))

    # The same recipe, uninterrupted, computed in-process in another store.
    from deploy.cli import RECIPES, load_recipe

    recipe = load_recipe(RECIPES["cache-activations"], None, sets + [f"home={tmp_path / 'clean'}"])
    plan = plan_cache(recipe)
    assert plan.activations_key == dataset.name
    lm = models.load(recipe.model)
    tokens = corpus.tokens_dataset(plan.home, plan.tokens_key)
    corpus.write_tokens(lm.tokenizer, recipe.corpus, tokens, recipe.cache.contexts_per_shard)
    write_activations(lm, recipe.cache, tokens, activations_dataset(plan))
    refresh_catalog(Path(plan.home))

    query = "select layer, context_id, position, token_id, activation from activations order by all"
    a = connect_read_only(home).execute(query).fetchnumpy()
    b = connect_read_only(Path(plan.home)).execute(query).fetchnumpy()
    assert len(a["layer"]) == 2 * 2048 * 63
    for col in ("layer", "context_id", "position", "token_id"):
        np.testing.assert_array_equal(a[col], b[col])
    np.testing.assert_array_equal(np.stack(a["activation"]), np.stack(b["activation"]))


def test_two_runs_writing_the_same_dataset_at_once_leave_one_complete_copy(tmp_path, cli_env, recipe_factory):
    """Two CLI runs of one recipe on one store, started together: the per-dataset lock lets one write while
    the other waits and then finds it complete; the table equals an in-process run's, no shard torn."""
    text = tmp_path / "c.txt"
    text.write_text("Locks keep two writers from tearing one dataset apart. " * 400)
    sets = ["model.name=tiny-llama", "model.autocast=none", f"corpus.source={text}", "corpus.n_tokens=8192",
            "corpus.context_length=64", "cache.layers=[0,3]", "cache.contexts_per_shard=16"]  # fmt: skip
    args = ["run", "cache-activations", "--home", str(tmp_path / "shared"), *sum((["--set", s] for s in sets), [])]
    procs = [_cli(args, {**cli_env, "PREFECT_HOME": str(tmp_path / f"prefect-{i}")}) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    from deploy.cli import RECIPES, load_recipe

    clean = load_recipe(RECIPES["cache-activations"], None, sets + [f"home={tmp_path / 'clean'}"])
    cache_activations(clean)
    query = "select layer, context_id, position, activation from activations order by all"
    a = connect_read_only(tmp_path / "shared").execute(query).fetchnumpy()
    b = connect_read_only(tmp_path / "clean").execute(query).fetchnumpy()
    assert len(a["layer"]) == 2 * 128 * 63
    np.testing.assert_array_equal(np.stack(a["activation"]), np.stack(b["activation"]))
    shared = tmp_path / "shared" / "tables" / "activations"
    (dataset,) = [d for d in shared.iterdir() if d.is_dir()]
    assert len(list(dataset.glob("part-*.parquet"))) == len(list((dataset / "_manifest").glob("*.json"))) == 8
    assert not list(dataset.glob(".*tmp*"))


def test_a_permanent_fault_fails_the_run_by_name_and_no_partial_table_is_visible(recipe_factory, monkeypatch):
    from storage.catalog import refresh_catalog
    from tasks.common.orchestration import FAULT_ENV

    monkeypatch.setenv(FAULT_ENV, "cache-residual-stream:permanent")
    recipe = recipe_factory()
    with pytest.raises(RuntimeError, match="injected permanent fault in task 'cache-residual-stream'"):
        cache_activations(recipe)
    refresh_catalog(Path(recipe.home))
    with connect_read_only(Path(recipe.home)) as con:
        views = {r[0] for r in con.execute("select table_name from information_schema.tables").fetchall()}
    assert "tokens" in views and "activations" not in views


def test_a_damaged_shard_is_recomputed_on_the_next_run_not_served(recipe_factory):
    recipe = recipe_factory()
    cache_activations(recipe)
    query = "select layer, context_id, position, activation from activations order by all"
    with connect_read_only(Path(recipe.home)) as con:
        before = con.execute(query).fetchnumpy()
    (shard,) = list(Path(recipe.home).glob("tables/activations/*/part-00001.parquet"))
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated behind the store's back
    untouched = {p: p.stat().st_mtime_ns for p in shard.parent.glob("part-*.parquet") if p != shard}
    cache_activations(recipe)  # detects it, rewrites that shard only
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched
    with connect_read_only(Path(recipe.home)) as con:
        after = con.execute(query).fetchnumpy()
    np.testing.assert_array_equal(np.stack(after["activation"]), np.stack(before["activation"]))
