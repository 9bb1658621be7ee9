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


REFUSED = [
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
        # EXPLAIN ANALYZE runs what it wraps: judged by that, in every spelling of its options
        ("explain analyze copy (select 'x' as x) to '{home}/tables/numbers/a/part-00000.parquet'", "copy statements"),
        ("EXPLAIN  ANALYZE copy (select 1) to '{home}/new' (format parquet, partition_by x)", "copy statements"),
        ("explain (analyze) copy (select 1 as x) to '{home}/catalog.duckdb'", "copy statements"),
        ("explain (analyze, format json) create temp table t as select 1", "create statements"),
        ("explain analyze insert into numbers values (1)", "insert statements"),
        ("explain analyze checkpoint", "call statements"),
        ("select 1; explain analyze copy (select ')(') to '{home}/x.csv'", "copy statements"),
]  # fmt: skip


@pytest.mark.parametrize("query, problem", REFUSED)
def test_sql_entry_point_refuses_writes_escapes_and_extensions(store, tmp_path, query, problem):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "outside.txt").write_text("secret")
    with pytest.raises(UserInputError) as err:
        run_query(store, query.format(outside=outside, home=store))
    assert problem in str(err.value).lower() and str(err.value).startswith("query: ")
    assert list(outside.iterdir()) == []  # nothing written outside the store


def test_no_sql_statement_writes_a_byte_under_the_store(store, tmp_path):
    """Every refused statement of the catalogue above, and the reads below, leave the store's files (names,
    sizes, sha256) as they were; DuckDB's temp directory is not inside the store."""
    from storage.hashing import file_sha256

    def files() -> dict[str, tuple[int, str]]:
        return {str(p.relative_to(store)): (p.stat().st_size, file_sha256(str(p)))
                for p in sorted(store.rglob("*")) if p.is_file()}  # fmt: skip

    before = files()
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    refused = [q for q, _ in REFUSED]
    reads = ["explain analyze select sum(x) from numbers", "explain (format json) select 1", "summarize numbers",
             "select * from numbers order by x"]  # fmt: skip
    for query in refused + reads:
        try:
            run_query(store, query.format(outside=outside, home=store))
        except UserInputError:
            pass  # refused: the point is what it left on disk
    assert files() == before
    ((temp,),) = run_query(store, "select current_setting('temp_directory')")[1]
    assert not temp.startswith(str(store.resolve())) and temp


def test_a_shard_changed_after_the_refresh_is_never_served(store):
    path = Dataset(store, "numbers", "a").shard_files()[0]
    good = path.read_bytes()
    path.write_bytes(good[:-8])  # truncated
    with pytest.raises(UserInputError, match=r"^store: .*part-00000.parquet changed after the catalog verified it"):
        run_query(store, "select sum(x) from numbers")
    path.write_bytes(good)  # same bytes, a new mtime: refused until a refresh verifies them again
    with pytest.raises(UserInputError, match="changed after the catalog verified it"):
        run_query(store, "select 1")
    refresh_catalog(store)
    assert run_query(store, "select sum(x) from numbers")[1] == [(6,)]
    tampered = bytearray(good)
    tampered[len(good) // 2] ^= 0xFF  # same size, other bytes: the refresh's sha256 catches it
    path.write_bytes(bytes(tampered))
    refresh_catalog(store)
    assert not path.exists() and not Dataset(store, "numbers", "a").complete_or_invalidate()  # withdrawn
    with pytest.raises(UserInputError, match="Catalog Error"):
        run_query(store, "select * from numbers")


def test_a_refresh_hashes_only_shards_it_has_not_verified(store, monkeypatch):
    import storage.catalog as catalog

    hashed = []
    monkeypatch.setattr(catalog, "file_sha256", lambda p: hashed.append(p) or "x")
    _dataset(store, "b", [10])
    refresh_catalog(store)  # dataset a was verified by the fixture's refresh; b is new (and "damaged" here)
    assert [p.split("/")[-2] for p in hashed] == ["b"]


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


def test_a_catalog_from_before_the_integrity_records_asks_for_a_rebuild(store):
    with duckdb.connect(str(catalog_path(store))) as con:
        con.execute("alter table manifest drop column mtime_ns")
    with pytest.raises(UserInputError, match="^store: the catalog predates its integrity records; fix: run"):
        run_query(store, "select 1")
    refresh_catalog(store)  # an unreadable record verifies nothing: every shard is hashed again
    assert run_query(store, "select sum(x) from numbers")[1] == [(6,)]
