"""The DuckDB catalog: one view per table over the shards of every complete dataset (and `paired_gains`,
derived from `predictions`). DuckDB only reads here.

The catalog file is rebuilt whole into a temp file and renamed over the old one, so a user who holds it open
read-only keeps a consistent (older) snapshot and a writer never waits on their lock. Views list shard files
from the manifests, so a half-written dataset or a stray temp file is never visible.
"""

import os
import threading
from pathlib import Path

import duckdb

from storage.errors import UserInputError
from storage.store import Dataset, complete_datasets, sweep_stale_temps

CATALOG_FILE = "catalog.duckdb"
# A derived view over `predictions`: every trained explainer against every other method scored on the same
# items of the same run (its own controls, the baselines, the other explainers), as the mean per-item
# difference and its paired SE. A gain more than twice its SE is an ordering that holds.
PAIRED_GAINS_SQL = """CREATE VIEW paired_gains AS
SELECT a.run_id, a.task, a.split, a.explainer_model, a.method,
       b.explainer_model AS rival_model, b.method AS rival_method, count(*) AS n,
       avg(a.score - b.score) AS gain, coalesce(stddev_samp(a.score - b.score), 0) / sqrt(count(*)) AS se
FROM predictions a JOIN predictions b USING (run_id, task, split, example_id)
WHERE a.method = 'trained' AND b.method <> 'gold' AND NOT (b.method = 'trained' AND b.explainer_model = a.explainer_model)
GROUP BY ALL"""


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
    sweep_stale_temps(root)
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
            if table == "predictions":
                con.execute(PAIRED_GAINS_SQL)
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


def _existing_catalog(root: Path) -> Path:
    path = catalog_path(root)
    if not path.exists():
        raise UserInputError(
            "store",
            f"no catalog at {path}",
            "run a flow first (e.g. `selfexplain run cache-activations`) or set SELFEXPLAIN_HOME to an existing store",
        )
    return path


def connect_read_only(root: Path) -> duckdb.DuckDBPyConnection:
    """Open the catalog read-only (Python users; `selfexplain sql` adds the sandbox of `connect_sandboxed`)."""
    return duckdb.connect(str(_existing_catalog(root)), read_only=True)


# The SQL entry point (`selfexplain sql`) runs only these statement kinds; DESCRIBE / SHOW / SUMMARIZE parse
# as SELECT. Anything else (CREATE, COPY, ATTACH, INSTALL, LOAD, SET, ...) is refused before it runs.
READ_STATEMENTS = frozenset({duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN})


def connect_sandboxed(root: Path) -> duckdb.DuckDBPyConnection:
    """The catalog read-only, with file access confined to the store and the configuration locked: no reads
    of files outside the store, no writes anywhere, no extension installs or loads, no way to undo it."""
    con = duckdb.connect(
        str(_existing_catalog(root)),
        read_only=True,
        config={"autoinstall_known_extensions": False, "autoload_known_extensions": False},
    )
    con.execute(f"SET allowed_directories = [{_quote(str(root.resolve()) + os.sep)}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def run_query(root: Path, query: str, timeout_s: float | None = None) -> tuple[list[str], list[tuple]]:
    """(column names, rows) of the last statement of `query`, run in the sandbox; every statement must read.

    Bad SQL, a refused statement or a query past `timeout_s` is a UserInputError naming the fix.
    """
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as exc:
        raise UserInputError("query", _first_line(exc), "fix the SQL syntax") from None
    if not statements:
        raise UserInputError("query", "no SQL statement given", 'pass one, e.g. "show tables"')
    for st in statements:
        if st.type not in READ_STATEMENTS:
            kind = st.type.name.lower()
            raise UserInputError("query", f"{kind} statements are refused: the SQL entry point only reads",
                                 "write a SELECT (DESCRIBE/SHOW/SUMMARIZE/EXPLAIN work too); save output with "
                                 "--format csv > file")  # fmt: skip
    con = connect_sandboxed(root)
    timer = threading.Timer(timeout_s, con.interrupt) if timeout_s else None
    try:
        if timer:
            timer.start()
        for st in statements:
            cur = con.execute(st.query)
        columns = [d[0] for d in cur.description] if cur.description else []
        return columns, (cur.fetchall() if columns else [])
    except duckdb.InterruptException:
        raise UserInputError(
            "query", f"stopped at the {timeout_s:g} s time limit", "narrow it or raise --timeout"
        ) from None
    except duckdb.PermissionException as exc:
        raise UserInputError("query", _first_line(exc), "query the catalog's views; files outside the store are "
                             "off limits") from None  # fmt: skip
    except duckdb.Error as exc:
        raise UserInputError(
            "query", _first_line(exc), 'fix the SQL; `selfexplain sql "show tables"` lists the tables'
        ) from None
    finally:
        if timer:
            timer.cancel()
        con.close()


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0]
