import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.hashing import config_hash, file_sha256
from storage.store import Dataset, complete_datasets, store_id, store_root


def _table(n: int = 10, d: int = 4) -> pa.Table:
    acts = np.arange(n * d, dtype=np.float32) / 7
    return pa.table(
        {
            "layer": pa.array(np.full(n, 3, dtype=np.int16)),
            "activation": pa.FixedSizeListArray.from_arrays(pa.array(acts), d),
        }
    )


def test_store_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFEXPLAIN_HOME", str(tmp_path / "env"))
    assert store_root() == tmp_path / "env"
    assert store_root(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv("SELFEXPLAIN_HOME")
    monkeypatch.chdir(tmp_path)
    assert store_root() == tmp_path / ".selfexplain"


def test_write_shard_is_atomic_and_manifested(home):
    ds = Dataset(home, "activations", "abc")
    ds.create({"stage": "x"})
    assert not ds.shard_done(0)
    row = ds.write_shard(0, _table())
    assert ds.shard_done(0)
    assert row["rows"] == 10 and row["sha256"] == file_sha256(str(ds.shard_path(0)))
    assert [p.name for p in ds.path.iterdir() if p.name.startswith(".")] == []  # no temp file left
    back = pq.read_table(ds.shard_path(0))
    np.testing.assert_array_equal(
        back.column("activation").combine_chunks().flatten().to_numpy(), np.arange(40, dtype=np.float32) / 7
    )


def test_parquet_is_zstd_and_floats_are_not_dictionary_encoded(home):
    ds = Dataset(home, "t", "k")
    ds.create({})
    ds.write_shard(0, _table())
    meta = pq.ParquetFile(ds.shard_path(0)).metadata.row_group(0)
    cols = {meta.column(i).path_in_schema: meta.column(i) for i in range(meta.num_columns)}
    assert all(c.compression == "ZSTD" for c in cols.values())
    float_col = next(c for name, c in cols.items() if name.startswith("activation"))
    assert "RLE_DICTIONARY" not in float_col.encodings and "PLAIN_DICTIONARY" not in float_col.encodings
    assert "RLE_DICTIONARY" in cols["layer"].encodings


def test_a_shard_without_manifest_row_is_not_done(home):
    ds = Dataset(home, "t", "k")
    ds.create({})
    ds.write_shard(0, _table())
    (ds.manifest_dir / "part-00000.json").unlink()  # as if killed between the rename and the manifest row
    assert not ds.shard_done(0)
    assert ds.shard_files() == []


def test_complete_datasets_lists_only_complete_ones(home):
    a, b = Dataset(home, "t", "a"), Dataset(home, "t", "b")
    for ds in (a, b):
        ds.create({})
        ds.write_shard(0, _table())
    a.mark_complete({"rows": 10})
    assert [d.key for d in complete_datasets(home)] == ["a"]
    assert json.loads((a.path / "_COMPLETE.json").read_text())["rows"] == 10


def test_store_id_is_stable(home):
    first = store_id(home)
    assert store_id(home) == first and len(first) == 12


def test_config_hash_depends_on_version_and_config():
    base = config_hash("s", 1, {"a": 1, "b": [1, 2]})
    assert base == config_hash("s", 1, {"b": [1, 2], "a": 1})  # key order does not matter
    assert base != config_hash("s", 2, {"a": 1, "b": [1, 2]})
    assert base != config_hash("s", 1, {"a": 2, "b": [1, 2]})
