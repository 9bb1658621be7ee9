import duckdb
import numpy as np
import pyarrow as pa
import pytest

from storage.catalog import catalog_path, connect_read_only, refresh_catalog, run_query
from storage.errors import UserInputError
from storage.store import Dataset


def _dataset(home, key: str, values: list[int], complete: bool = True) -> Dataset:
    ds = Dataset(home, "numbers", key)
    ds.create({"stage": "test"})
    ds.write_shard(0, pa.table({"x": pa.array(np.array(values, dtype=np.int64))}))
    if complete:
        ds.mark_complete({"rows": len(values)})
    return ds


def test_views_cover_complete_datasets_only(home):
    _dataset(home, "a", [1, 2, 3])
    _dataset(home, "b", [10])
    _dataset(home, "c", [100], complete=False)
    refresh_catalog(home)
    con = connect_read_only(home)
    rows = con.execute("select dataset, sum(x) from numbers group by dataset order by dataset").fetchall()
    assert rows == [("a", 6), ("b", 10)]
    assert con.execute("select count(*) from manifest").fetchone() == (2,)
    assert con.execute("select count(*) from datasets where tbl = 'numbers'").fetchone() == (2,)


def test_paired_gains_compare_a_trained_explainer_with_every_method_on_the_same_items(home):
    ds = Dataset(home, "predictions", "run1")
    ds.create({"run_id": "run1"})
    rows = [  # (example, model, method, score): trained beats v = 0 by 1, 0 and 0.5 on three items
        ("e1", "m", "trained", 1.0), ("e2", "m", "trained", 0.5), ("e3", "m", "trained", 0.5),
        ("e1", "m", "zero_vector", 0.0), ("e2", "m", "zero_vector", 0.5), ("e3", "m", "zero_vector", 0.0),
        ("e1", "", "gold", 1.0), ("e2", "", "gold", 1.0), ("e3", "", "gold", 1.0),
    ]  # fmt: skip
    ds.write_shard(0, pa.Table.from_pylist([
        {"run_id": "run1", "task": "t", "example_id": e, "explainer_model": m, "method": k, "split": "test",
         "prediction": "", "reference": "", "score": v} for e, m, k, v in rows]))  # fmt: skip
    ds.mark_complete({"rows": len(rows)})
    refresh_catalog(home)
    got = (
        connect_read_only(home)
        .execute("select explainer_model, rival_model, rival_method, n, gain, se from paired_gains")
        .fetchall()
    )
    # diffs 1, 0, 0.5: mean 0.5, sample sd 0.5, se 0.5 / sqrt(3); gold is no rival
    assert got == [("m", "m", "zero_vector", 3, 0.5, pytest.approx(0.5 / np.sqrt(3)))]


def test_catalog_is_read_only_for_users_and_opens_with_stock_duckdb(home):
    _dataset(home, "a", [1])
    refresh_catalog(home)
    con = duckdb.connect(str(catalog_path(home)), read_only=True)
    assert con.execute("select x from numbers").fetchall() == [(1,)]
    with pytest.raises(duckdb.Error):
        con.execute("create table t (x int)")


def test_refresh_while_a_reader_holds_the_old_catalog(home):
    _dataset(home, "a", [1])
    refresh_catalog(home)
    reader = connect_read_only(home)
    _dataset(home, "b", [2])
    refresh_catalog(home)  # replaces the file by rename: no lock conflict with the open reader
    assert reader.execute("select count(*) from numbers").fetchone() == (1,)  # old snapshot
    reader.close()  # (DuckDB shares one instance per file within a process: close before reopening)
    assert connect_read_only(home).execute("select count(*) from numbers").fetchone() == (2,)


def test_missing_catalog_names_the_fix(home):
    with pytest.raises(UserInputError, match="run a flow first"):
        connect_read_only(home)


@pytest.fixture
def store(home):
    _dataset(home, "a", [1, 2, 3])
    refresh_catalog(home)
    return home


@pytest.mark.parametrize(
    "query, problem",
    [
        ("create table t as select 1", "create statements are refused"),
        ("copy (select 1) to '{outside}/leak.csv'", "copy statements are refused"),
        ("select * from read_csv('/etc/passwd')", "file system operations are disabled"),
        ("select * from read_text('{home}/../outside.txt')", "file system operations are disabled"),
        ("attach '{outside}/other.duckdb' as o", "attach statements are refused"),
        ("install httpfs", "load statements are refused"),
        ("load httpfs", "load statements are refused"),
        ("set enable_external_access = true", "set statements are refused"),
        ("select 1; drop view numbers", "drop statements are refused"),
        ("selec 1", "syntax error"),
    ],
)
def test_sql_entry_point_refuses_writes_escapes_and_extensions(store, tmp_path, query, problem):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "outside.txt").write_text("secret")
    with pytest.raises(UserInputError) as err:
        run_query(store, query.format(outside=outside, home=store))
    assert problem in str(err.value).lower() and str(err.value).startswith("query: ")
    assert list(outside.iterdir()) == []  # nothing written outside the store


def test_sql_entry_point_reads_every_view_and_table(store):
    with connect_read_only(store) as con:
        views = [r[0] for r in con.execute("select table_name from information_schema.tables").fetchall()]
    assert set(views) >= {"numbers", "datasets", "manifest"}
    for view in views:
        columns, rows = run_query(store, f"select count(*) as n from {view}")
        assert columns == ["n"] and rows[0][0] >= 1
    assert run_query(store, "describe numbers")[1][0][0] == "dataset"
    assert run_query(store, "select 1 as a; select sum(x) as s from numbers") == (["s"], [(6,)])
    # reading the store's own Parquet files directly is allowed
    path = Dataset(store, "numbers", "a").shard_files()[0]
    assert run_query(store, f"select sum(x) from read_parquet('{path}')")[1] == [(6,)]


def test_sql_entry_point_stops_at_the_time_limit(store):
    with pytest.raises(UserInputError, match="time limit"):
        run_query(store, "select count(*) from range(100000000000) a", timeout_s=0.3)
