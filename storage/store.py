"""The on-disk store: one directory per stage output, Parquet shards written atomically, a manifest per shard.

Layout under the store root (``$SELFEXPLAIN_HOME``, a recipe's ``home``, or ``./.selfexplain``)::

    tables/<table>/<key>/_dataset.json          what produced it (stage, version, config)
    tables/<table>/<key>/part-00000.parquet     a shard, renamed into place once fully written
    tables/<table>/<key>/_manifest/part-00000.json   the manifest row that marks that shard complete
    tables/<table>/<key>/_COMPLETE.json         written last: every shard is there
    catalog.duckdb                              views over every complete dataset (see catalog.py)

``<key>`` is the hash of the stage's config and code version, so a rerun of the same config finds its own
shards and skips them, and a changed config never overwrites an older result.
"""

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from storage.errors import CorruptShardError, UserInputError
from storage.hashing import file_sha256

log = logging.getLogger(__name__)

DEFAULT_HOME = ".selfexplain"


def store_root(home: str | os.PathLike | None = None) -> Path:
    """The store root: an explicit `home` (a recipe's), else $SELFEXPLAIN_HOME, else ./.selfexplain."""
    chosen = home or os.environ.get("SELFEXPLAIN_HOME") or DEFAULT_HOME
    return Path(chosen).expanduser().resolve()


STORE_FIX = "point --home (or the recipe's home, or $SELFEXPLAIN_HOME) at a folder"


def check_store(home: str | os.PathLike | None = None, fix: str = STORE_FIX) -> Path:
    """The store root of `home` (as `store_root`) when a run can use it, checked before anything is created:
    a folder, or a path not made yet under a folder; a catalog in it must be a file. Nothing is written. `fix`
    says where the root came from."""
    from storage.catalog import catalog_path

    root = store_root(home)
    if root.exists() and not root.is_dir():
        raise UserInputError("store", f"{root} is a file, not a store folder", fix)
    above = next(p for p in root.parents if p.exists())  # the filesystem root always exists
    if not root.exists() and not above.is_dir():
        raise UserInputError("store", f"{above} is a file, so no store can be made at {root}", fix)
    if catalog_path(root).is_dir():
        raise UserInputError("store", f"{catalog_path(root)} is a folder, not a DuckDB catalog",
                             "move it away, then run `selfexplain catalog`: it rebuilds the catalog from the datasets")  # fmt: skip
    return root


def store_id(root: Path) -> str:
    """A random id made once per store (file `_store.json`): part of Prefect cache keys."""
    path = root / "_store.json"
    if not path.exists():
        root.mkdir(parents=True, exist_ok=True)
        candidate = {"store_id": uuid.uuid4().hex[:12], "created_at": time.time()}
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(candidate))
        try:
            os.link(tmp, path)  # first writer wins; a racing writer reads the winner's id
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return json.loads(path.read_text())["store_id"]


def sweep_stale_temps(folder: Path) -> None:
    """Remove `.<name>.tmp-<pid>` files and folders in `folder` whose writing process is gone (killed runs)."""
    for stale in folder.glob(".*.tmp-*"):
        pid = stale.name.rsplit(".tmp-", 1)[1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # its writer is alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, another user's
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write JSON through a temp file and a rename: readers see the old file or the new one, never half."""
    _atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n").encode())


def write_parquet(table: pa.Table, path: Path) -> None:
    """Write `table` to `path` atomically: zstd; dictionary encoding and min/max statistics only for non-float
    columns (float vectors gain nothing from either, and their statistics cost more than the compression)."""

    def is_float(t: pa.DataType) -> bool:
        while pa.types.is_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t):
            t = t.value_type
        return pa.types.is_floating(t)

    dict_cols = [f.name for f in table.schema if not is_float(f.type)]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(
        table, tmp, compression="zstd", use_dictionary=dict_cols, write_statistics=dict_cols, row_group_size=64 * 1024
    )
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive `flock` on `path` (created if missing): blocks while another process holds it; the kernel
    releases it when the holder exits or dies, so a killed process never leaves it stale."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass(frozen=True)
class Dataset:
    """One stage output: ``tables/<table>/<key>`` under the store root."""

    root: Path
    table: str
    key: str

    @property
    def path(self) -> Path:
        return self.root / "tables" / self.table / self.key

    @property
    def manifest_dir(self) -> Path:
        return self.path / "_manifest"

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """An exclusive lock on this dataset (flock on `<key>.lock` beside it), held while a stage writes it:
        a second writer of the same key blocks, then finds the dataset complete. Released when the holder
        exits or dies, so a killed run never leaves a stale lock."""
        with file_lock(self.path.with_name(f"{self.key}.lock")):
            yield

    def shard_path(self, index: int) -> Path:
        return self.path / f"part-{index:05d}.parquet"

    def create(self, info: dict[str, Any]) -> None:
        """Make the directory and record what produces it; sweep temp files a killed writer left. Idempotent.
        (Writers hold the dataset's lock, so no live writer owns a temp file here.)"""
        self.manifest_dir.mkdir(parents=True, exist_ok=True)
        sweep_stale_temps(self.path)
        sweep_stale_temps(self.manifest_dir)
        if not (self.path / "_dataset.json").exists():
            atomic_write_json(self.path / "_dataset.json", {"table": self.table, "key": self.key, **info})

    def shard_done(self, index: int) -> bool:
        """A shard counts only when its manifest row exists and the file it names is there, at its size."""
        row = self.manifest_dir / f"part-{index:05d}.json"
        path = self.shard_path(index)
        return row.exists() and path.exists() and path.stat().st_size == json.loads(row.read_text())["bytes"]

    def write_shard(self, index: int, table: pa.Table) -> dict[str, Any]:
        """Write shard `index`, then its manifest row (rows, bytes, sha256). Returns the manifest row."""
        path = self.shard_path(index)
        write_parquet(table, path)
        row = {
            "table": self.table,
            "dataset": self.key,
            "shard": index,
            "file": path.name,
            "rows": table.num_rows,
            "bytes": path.stat().st_size,
            "sha256": file_sha256(str(path)),
            "written_at": time.time(),
        }
        atomic_write_json(self.manifest_dir / f"part-{index:05d}.json", row)
        return row

    def manifest(self) -> list[dict[str, Any]]:
        """Manifest rows of completed shards, in shard order."""
        if not self.manifest_dir.exists():
            return []
        rows = [json.loads(p.read_text()) for p in sorted(self.manifest_dir.glob("part-*.json"))]
        return [r for r in rows if self.shard_path(r["shard"]).exists()]

    def shard_files(self) -> list[Path]:
        return [self.shard_path(r["shard"]) for r in self.manifest()]

    def mark_complete(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.path / "_COMPLETE.json", {"completed_at": time.time(), **summary})

    def marked_complete(self) -> bool:
        """Marked complete by its writer (nothing read beyond the marker, nothing changed)."""
        return (self.path / "_COMPLETE.json").exists()

    def intact(self) -> bool:
        """Marked complete, and every shard present at its manifest size: what a recipe check asks, reading
        only (a check writes and deletes nothing; the stage that owns the dataset repairs it)."""
        return self.marked_complete() and not self.damaged(full=False)

    def complete_or_invalidate(self) -> bool:
        """True when marked complete and every shard is present at its manifest size. Otherwise False, and a
        damaged dataset is un-completed here: its marker and its damaged shards are deleted (`invalidate`), so
        the next run of its stage recomputes just those shards. `intact` asks the same without deleting."""
        if not self.marked_complete():
            return False
        problems = self.damaged(full=False)
        if problems:
            self.invalidate(problems)
            return False
        return True

    def damaged(self, full: bool = False) -> dict[int, str]:
        """{shard: problem} for manifest rows whose file is missing or of the wrong size; with `full`, whose
        sha256 differs from the manifest's too (one read of every shard)."""
        if not self.manifest_dir.exists():
            return {}
        out = {}
        for row_path in sorted(self.manifest_dir.glob("part-*.json")):
            row = json.loads(row_path.read_text())
            path = self.shard_path(row["shard"])
            if not path.exists():
                out[row["shard"]] = f"{path} is missing"
            elif path.stat().st_size != row["bytes"]:
                out[row["shard"]] = f"{path} has {path.stat().st_size} bytes, its manifest says {row['bytes']}"
            elif full and file_sha256(str(path)) != row["sha256"]:
                out[row["shard"]] = f"{path} does not match its manifest sha256"
        return out

    def invalidate(self, problems: dict[int, str]) -> None:
        """Withdraw the completion marker and the damaged shards (file and manifest row), with a warning that
        names them: readers stop seeing the dataset, and its stage's next run rewrites just those shards."""
        (self.path / "_COMPLETE.json").unlink(missing_ok=True)
        for shard, problem in problems.items():
            log.warning(f"{self.table}/{self.key}: {problem}; withdrawn, the next run recomputes it")
            (self.manifest_dir / f"part-{shard:05d}.json").unlink(missing_ok=True)
            self.shard_path(shard).unlink(missing_ok=True)

    def summary(self) -> dict[str, Any]:
        return json.loads((self.path / "_COMPLETE.json").read_text())

    def iter_shards(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """Read completed shards one at a time (memory stays at one shard), each checked against its manifest
        sha256 first: a corrupt shard is withdrawn (`invalidate`) and raises CorruptShardError, never served."""
        for row in self.manifest():
            path = self.shard_path(row["shard"])
            if file_sha256(str(path)) != row["sha256"]:
                self.invalidate({row["shard"]: f"{path} does not match its manifest sha256"})
                raise CorruptShardError(
                    f"{self.table}/{self.key}: shard {path.name} is corrupt (sha256 mismatch); it was withdrawn: "
                    "rerun the flow to recompute it"
                )
            yield pq.read_table(path, columns=columns)


def complete_datasets(root: Path) -> Iterator[Dataset]:
    """Every complete dataset under `root`, sorted by (table, key)."""
    for marker in sorted((root / "tables").glob("*/*/_COMPLETE.json")):
        ds = Dataset(root, marker.parent.parent.name, marker.parent.name)
        if ds.complete_or_invalidate():  # a damaged one is withdrawn, not listed
            yield ds
