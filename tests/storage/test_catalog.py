import duckdb
import numpy as np
import pyarrow as pa
import pytest

from storage.catalog import catalog_path, connect_read_only, refresh_catalog
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
