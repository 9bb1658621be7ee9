"""The experiment flow on tiny models: every cell's rows, a rerun that trains nothing, the report."""

from flows.experiment import experiment
from storage.catalog import connect_read_only
from storage.store import complete_datasets
from tasks.experiment.config import RunnerConfig
from tests.factories import tiny_experiment


def test_experiment_grid_rows_rerun_and_report(tmp_path, text_file):
    text_file.write_text(text_file.read_text() * 6)
    recipe = tiny_experiment(tmp_path, text_file)
    result = experiment(recipe)
    con = connect_read_only(tmp_path / "store")
    rows = con.execute(
        "select c.task, m.explainer_model, count(distinct c.n_train) from metrics m join experiment_cells c "
        "using (run_id) where m.method = 'trained' group by all order by all"
    ).fetchall()
    assert rows == [
        (task, model, 2) for task in ("ablation", "features", "patching") for model in ("tiny-gemma3", "tiny-llama")
    ]
    # n_train and seed are filled; flat baselines come from one cell per task
    flat = con.execute("select c.task, method, count(distinct run_id) from metrics join experiment_cells c "
                       "using (run_id) where method in ('selfie', 'zero_shot') group by all order by all").fetchall()  # fmt: skip
    assert flat == [("ablation", "zero_shot", 1), ("features", "selfie", 1), ("patching", "zero_shot", 1)]
    # the n_train-dependent controls run in the largest cell only (grid.controls = 'largest')
    controls = con.execute("select task, method, list(distinct n_train) from metrics where method in "
                           "('zero_vector', 'no_activation') and split = 'test' group by all order by all").fetchall()  # fmt: skip
    assert controls == [("features", "zero_vector", [12]), ("patching", "no_activation", [12]),
                        ("patching", "zero_vector", [12])]  # fmt: skip
    trained_n = con.execute(
        "select distinct n_train from metrics where method = 'trained' and task = 'features'"
    ).fetchall()
    assert sorted(n for (n,) in trained_n) == [4, 12]
    con.close()
    report = tmp_path / "store" / "reports" / result["experiment"]["experiment"] / "report.md"
    text = report.read_text()
    assert "## Task A: feature descriptions" in text and "## Task C: input ablation" in text
    assert "| self |" in text and (report.parent / "self-vs-other.png").exists()

    # A rerun of the finished grid trains and scores nothing: no dataset is added or rewritten.
    before = {ds.path: (ds.path / "_COMPLETE.json").stat().st_mtime_ns for ds in complete_datasets(tmp_path / "store")}
    again = experiment(recipe)
    after = {ds.path: (ds.path / "_COMPLETE.json").stat().st_mtime_ns for ds in complete_datasets(tmp_path / "store")}
    assert after == before and again["experiment"]["cells"] == 3 * 2  # tasks x n_train x seeds


def test_cells_fanned_out_on_dask_workers_give_the_in_process_numbers(tmp_path, text_file):
    """recipe.runner.kind = dask: every cell is a task on a local Dask cluster (two worker processes); the
    metrics equal those of the same grid run cell after cell in this process."""
    base = tiny_experiment(tmp_path, text_file).model_copy(update={"tasks": ["ablation"]})
    query = ("select c.n_train, m.method, m.explainer_model, m.metric, m.value from metrics m "
             "join experiment_cells c using (run_id) where m.split = 'test' order by all")  # fmt: skip
    tables = {}
    for kind in ("local", "dask"):
        store = tmp_path / kind
        recipe = base.model_copy(update={"home": str(store), "runner": RunnerConfig(kind=kind, n_workers=2)})
        result = experiment(recipe)
        assert result["experiment"]["cells"] == 2
        with connect_read_only(store) as con:
            tables[kind] = con.execute(query).fetchall()
    assert {n for n, *_ in tables["dask"]} == {4, 12}
    assert tables["dask"] == tables["local"]
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    with get_client(sync_client=True) as client:  # the dask run's cells were tasks of the Dask runner
        cells = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="experiment-cell")))
    assert sorted(r.state.name for r in cells) == ["Completed", "Completed"]


def test_a_features_cell_with_a_nonzero_seed_carries_it_into_every_row(tmp_path, text_file):
    """One cell of a two-seed grid (seed 3, no flat baselines, no controls), run as the experiment runs it:
    every metrics row carries the grid seed, and nearest neighbour answers from that seed's training subset."""
    import numpy as np

    from flows.features import features
    from tasks.experiment.grid import Cell, cell_recipe
    from tasks.features.ground_truth import FeatureSet
    from tasks.features.train import training_subset

    text_file.write_text(text_file.read_text() * 6)
    base = tiny_experiment(tmp_path, text_file)
    one = base.features.model_copy(update={"explainers": {"self": base.features.explainers["self"]}})
    recipe = base.model_copy(update={"features": one, "grid": base.grid.model_copy(update={"seeds": [0, 3]})})
    result = features(cell_recipe(recipe, Cell("features", 4, 3, False, False)))
    run_id = result["results"]["run_id"]
    with connect_read_only(tmp_path / "store") as con:
        seeds = con.execute(f"select distinct seed from metrics where run_id = '{run_id}'").fetchall()
        trained = con.execute(f"select distinct n_train from metrics where run_id = '{run_id}' and "
                              "method = 'trained' and metric = 'simulator_corr'").fetchall()  # fmt: skip
        gt = con.execute("select layer, feature_id, label, split from feature_labels order by layer, feature_id")
        layer, feature_id, label, split = zip(*gt.fetchall(), strict=True)
        answered = con.execute(f"select distinct prediction from predictions where run_id = '{run_id}' and "
                               "method = 'nearest_neighbor'").fetchall()  # fmt: skip
    assert seeds == [(3,)] and trained == [(4,)]
    fs = FeatureSet(np.array(layer), np.array(feature_id), list(label), np.array(split),
                    np.zeros((len(layer), 1), dtype=np.float32))  # fmt: skip
    subset = set(training_subset(fs, 4, 3).label)
    assert {p for (p,) in answered} <= subset
    assert training_subset(fs, 4, 3).ids() != training_subset(fs, 4, 0).ids()  # seed 0 would draw another
