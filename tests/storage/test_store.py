import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.errors import UserInputError
from storage.hashing import config_hash, file_sha256
from storage.store import Dataset, check_store, complete_datasets, store_id, store_root


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


def _complete(home, key="k", shards=3) -> Dataset:
    ds = Dataset(home, "acts", key)
    ds.create({"stage": "test"})
    for i in range(shards):
        ds.write_shard(i, _table(10 + i))
    ds.mark_complete({"shards": shards})
    return ds


def test_a_truncated_shard_withdraws_the_dataset_and_only_that_shard(home):
    ds = _complete(home)
    assert ds.intact()
    victim = ds.shard_path(1)
    victim.write_bytes(victim.read_bytes()[:-20])  # a torn write / full disk
    assert not ds.intact() and (ds.path / "_COMPLETE.json").exists() and victim.exists()  # asked, nothing deleted
    assert not ds.complete_or_invalidate()  # detected by size, the cheap check every stage and the catalog make
    assert not (ds.path / "_COMPLETE.json").exists() and not victim.exists()
    assert [ds.shard_done(i) for i in range(3)] == [True, False, True]  # a rerun rewrites shard 1 only
    assert list(complete_datasets(home)) == []


def test_a_corrupt_shard_is_caught_on_read_and_never_served(home):
    from storage.errors import CorruptShardError

    ds = _complete(home)
    victim = ds.shard_path(2)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    victim.write_bytes(bytes(data))
    assert ds.complete_or_invalidate()  # the size check cannot see it ...
    assert ds.damaged(full=True) == {2: f"{victim} does not match its manifest sha256"}
    with pytest.raises(CorruptShardError, match="part-00002.parquet is corrupt"):
        list(ds.iter_shards())  # ... the read does, before serving it
    assert not ds.complete_or_invalidate() and [ds.shard_done(i) for i in range(3)] == [True, True, False]


def test_the_dataset_lock_serialises_writers(home):
    """Two writers that provably run at the same time: b asks for the lock while a holds it (a waits for b's
    request before letting go), and b gets it only after a released it."""
    import threading

    ds = Dataset(home, "acts", "k")
    times: dict[str, float] = {}
    a_holds, b_asks = threading.Event(), threading.Event()

    def a() -> None:
        with ds.lock():
            times["a in"] = time.monotonic()
            a_holds.set()
            assert b_asks.wait(10)  # bounded: a failure here shows as a missing "a out"
            time.sleep(0.2)  # b is blocked in flock by now; a lock that let it in would show it in[b] < out[a]
            times["a out"] = time.monotonic()

    def b() -> None:
        assert a_holds.wait(10)
        times["b asks"] = time.monotonic()
        b_asks.set()
        with ds.lock():
            times["b in"] = time.monotonic()
        times["b out"] = time.monotonic()

    threads = [threading.Thread(target=f) for f in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert set(times) == {"a in", "a out", "b asks", "b in", "b out"}, times
    assert times["a in"] < times["b asks"] < times["a out"]  # the two writers overlapped: b waited on a's lock
    assert times["b in"] >= times["a out"]  # and held it only after a let go


def test_config_hash_walks_nested_models_and_skips_resource_knobs():
    from tasks.common.config import ModelConfig
    from tasks.explainer.config import ExplainerConfig

    a = {"cfg": ExplainerConfig(model=ModelConfig(name="m"))}
    b = {"cfg": ExplainerConfig(model=ModelConfig(name="m", memory_fraction=0.5))}  # affects_results=False
    c = {"cfg": ExplainerConfig(model=ModelConfig(name="m", dtype="float16"))}
    assert config_hash("s", 1, a) == config_hash("s", 1, b) != config_hash("s", 1, c)
    assert config_hash("s", 1, a) == config_hash(
        "s", 1, {"cfg": a["cfg"].model_dump(exclude={"model": {"memory_fraction"}, "readout_steps": True})}
    )  # readout_steps, added later, is hashed only when set


def test_create_sweeps_temp_files_of_a_killed_writer(home):
    ds = Dataset(home, "acts", "k")
    ds.create({})
    (ds.path / ".part-00003.parquet.tmp-999999").write_bytes(b"half a shard")
    (ds.manifest_dir / ".part-00003.json.tmp-999999").write_text("{")
    ds.create({})
    assert not list(ds.path.rglob(".*tmp*"))


@pytest.mark.parametrize(
    "home, message",
    [
        ("afile", "store: {tmp}/afile is a file, not a store folder; fix: point --home"),
        ("afile/store", "store: {tmp}/afile is a file, so no store can be made at {tmp}/afile/store; fix: "),
        ("afile/a/b", "store: {tmp}/afile is a file, so no store can be made at {tmp}/afile/a/b"),
        ("catalog_dir", "store: {tmp}/catalog_dir/catalog.duckdb is a folder, not a DuckDB catalog; fix: move it"),
    ],
)
def test_check_store_refuses_a_root_no_run_can_use_and_writes_nothing(tmp_path, home, message):
    (tmp_path / "afile").write_text("not a store")
    (tmp_path / "catalog_dir" / "catalog.duckdb").mkdir(parents=True)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(UserInputError) as err:
        check_store(tmp_path / home)
    assert str(err.value).startswith(message.format(tmp=tmp_path)), str(err.value)
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("home", ["new", "new/deeper", "existing"])
def test_check_store_takes_a_folder_or_a_path_to_make_and_creates_nothing(tmp_path, home):
    (tmp_path / "existing").mkdir()
    assert check_store(tmp_path / home) == tmp_path / home
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]
