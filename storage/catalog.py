"""The DuckDB catalog: one view per table over the shards of every complete dataset. DuckDB only reads here.

The catalog file is rebuilt whole into a temp file and renamed over the old one, so a user who holds it open
read-only keeps a consistent (older) snapshot and a writer never waits on their lock. Views list shard files
from the manifests, so a half-written dataset or a stray temp file is never visible.
"""

import os
from pathlib import Path

import duckdb

from storage.errors import UserInputError
from storage.store import Dataset, complete_datasets

CATALOG_FILE = "catalog.duckdb"


def catalog_path(root: Path) -> Path:
    return root / CATALOG_FILE


def _quote(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _ident(s: str) -> str:
    return '"' + s.replace('"', '""') + '"'


def view_sql(table: str, datasets: list[Dataset]) -> str:
    """A view over `datasets` of one table, with a leading `dataset` column naming each row's dataset key."""
    parts = []
    for ds in datasets:
        files = ", ".join(_quote(str(p)) for p in ds.shard_files())
        parts.append(f"SELECT {_quote(ds.key)} AS dataset, * FROM read_parquet([{files}], union_by_name = true)")
    return f"CREATE VIEW {_ident(table)} AS " + "\nUNION ALL BY NAME\n".join(parts)


def refresh_catalog(root: Path) -> Path:
    """Rebuild the catalog of the store at `root`: views per table, plus `datasets` and `manifest` tables."""
    by_table: dict[str, list[Dataset]] = {}
    for ds in complete_datasets(root):
        if ds.shard_files():
            by_table.setdefault(ds.table, []).append(ds)
    final = catalog_path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    con = duckdb.connect(str(tmp))
    try:
        con.execute("CREATE TABLE datasets (tbl VARCHAR, dataset VARCHAR, path VARCHAR, info JSON, summary JSON)")
        con.execute(
            "CREATE TABLE manifest (tbl VARCHAR, dataset VARCHAR, shard INTEGER, file VARCHAR, "
            "rows BIGINT, bytes BIGINT, sha256 VARCHAR, written_at DOUBLE)"
        )
        for table, datasets in sorted(by_table.items()):
            con.execute(view_sql(table, datasets))
            for ds in datasets:
                con.execute(
                    "INSERT INTO datasets VALUES (?, ?, ?, ?, ?)",
                    [
                        table,
                        ds.key,
                        str(ds.path),
                        (ds.path / "_dataset.json").read_text(),
                        (ds.path / "_COMPLETE.json").read_text(),
                    ],
                )
                con.executemany(
                    "INSERT INTO manifest VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        [table, ds.key, r["shard"], r["file"], r["rows"], r["bytes"], r["sha256"], r["written_at"]]
                        for r in ds.manifest()
                    ],
                )
        con.execute("CHECKPOINT")
    finally:
        con.close()
    os.replace(tmp, final)
    return final


def connect_read_only(root: Path) -> duckdb.DuckDBPyConnection:
    """Open the catalog read-only (the way users and `selfexplain sql` do)."""
    path = catalog_path(root)
    if not path.exists():
        raise UserInputError(
            "store",
            f"no catalog at {path}",
            "run a flow first (e.g. `selfexplain run cache-activations`) or set SELFEXPLAIN_HOME to an existing store",
        )
    return duckdb.connect(str(path), read_only=True)
