"""The DuckDB catalog: one view per table over the shards of every complete dataset (and `paired_gains`,
derived from `predictions`). DuckDB only reads here.

The catalog file is rebuilt whole into a temp file and renamed over the old one, so a user who holds it open
read-only keeps a consistent (older) snapshot and a writer never waits on their lock. Views list shard files
from the manifests, so a half-written dataset or a stray temp file is never visible.

Integrity: a refresh checks every shard's sha256 against its manifest before a view may list it (a damaged
dataset is withdrawn, as `Dataset.invalidate` does, and its stage recomputes it) and records each verified
file's size and mtime; a shard already verified with the same size and mtime is not read again. `selfexplain
sql` stats every listed shard before it runs and refuses when one changed since: a tampered or truncated shard
is never served. (Hashing at every query instead would read the whole store per query; a stat costs ~µs.)
"""

import os
import shutil
import tempfile
import threading
from pathlib import Path

import duckdb

from storage.errors import UserInputError
from storage.hashing import file_sha256
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


def _verified_before(root: Path) -> set[tuple[str, int, int]]:
    """(path, bytes, mtime_ns) of every shard the current catalog verified; empty without one. A catalog that
    cannot be read (damaged, or from before these columns) verifies nothing: every shard is hashed again."""
    path = catalog_path(root)
    if not path.is_file():
        return set()
    try:
        with duckdb.connect(str(path), read_only=True) as con:
            return set(con.execute("SELECT path, bytes, mtime_ns FROM manifest").fetchall())
    except duckdb.Error:
        return set()  # the safe direction: re-verify all (the refresh then replaces the unreadable file)


def _stat(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path), st.st_size, st.st_mtime_ns


def verified_datasets(root: Path) -> list[Dataset]:
    """The complete datasets whose every shard matches its manifest sha256 (hashing only shards the last
    refresh did not verify at their current size and mtime); a damaged one is withdrawn, with a warning."""
    seen = _verified_before(root)
    out = []
    for ds in complete_datasets(root):
        problems = {
            r["shard"]: f"{ds.shard_path(r['shard'])} does not match its manifest sha256"
            for r in ds.manifest()
            if _stat(ds.shard_path(r["shard"])) not in seen
            and file_sha256(str(ds.shard_path(r["shard"]))) != r["sha256"]
        }
        if problems:
            ds.invalidate(problems)
        else:
            out.append(ds)
    return out


def refresh_catalog(root: Path) -> Path:
    """Rebuild the catalog of the store at `root`: views per table over verified shards, plus `datasets` and
    `manifest` tables."""
    by_table: dict[str, list[Dataset]] = {}
    for ds in verified_datasets(root):
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
            "CREATE TABLE manifest (tbl VARCHAR, dataset VARCHAR, shard INTEGER, file VARCHAR, rows BIGINT, "
            "bytes BIGINT, sha256 VARCHAR, written_at DOUBLE, path VARCHAR, mtime_ns BIGINT)"
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
                    "INSERT INTO manifest VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        [table, ds.key, r["shard"], r["file"], r["rows"], r["bytes"], r["sha256"], r["written_at"],
                         str(ds.shard_path(r["shard"])), ds.shard_path(r["shard"]).stat().st_mtime_ns]
                        for r in ds.manifest()
                    ],
                )  # fmt: skip
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


# The SQL entry point (`selfexplain sql`) runs only reads: SELECT (DESCRIBE / SHOW / SUMMARIZE parse as SELECT),
# and EXPLAIN [ANALYZE] of a read. EXPLAIN ANALYZE *executes* the statement it wraps, so what it wraps is parsed
# and judged like any other (a COPY inside it is a COPY). Anything else (CREATE, COPY, ATTACH, INSTALL, LOAD,
# SET, ...) is refused before it runs.


def _explained(query: str) -> list[str]:
    """The statement texts an EXPLAIN can wrap: past the keyword, an optional ANALYZE and an optional option
    list in parentheses. Both readings of a leading '(' are returned: '(select 1)' is a statement, '(analyze)'
    options; a reading that does not parse is dropped by the caller."""
    starts = [p for p, _ in duckdb.tokenize(query)]
    words = [query[a:b].strip() for a, b in zip(starts, [*starts[1:], len(query)], strict=True)]
    i = 1 + (len(words) > 1 and words[1].lower() == "analyze")
    readings = [query[starts[i] :]] if i < len(words) else []
    if i < len(words) and words[i].startswith("("):
        depth = 0
        for j in range(i, len(words)):
            depth += words[j].count("(") - words[j].count(")") if not words[j].startswith("'") else 0
            if depth <= 0:
                readings += [query[starts[j + 1] :]] if j + 1 < len(words) else []
                break
    return readings


def refused(statement: "duckdb.Statement") -> str | None:
    """None for a read; else the kind of statement that would run (`EXPLAIN` is judged by what it wraps)."""
    if statement.type == duckdb.StatementType.SELECT:
        return None
    if statement.type != duckdb.StatementType.EXPLAIN:
        return statement.type.name.lower()
    inner = []
    for text in _explained(statement.query):
        try:
            inner += duckdb.extract_statements(text)
        except duckdb.Error:
            continue  # not this reading (e.g. an option list read as a statement)
    if not inner:
        return "explain"
    return next((kind for st in inner if (kind := refused(st))), None)


def connect_sandboxed(root: Path, temp_dir: Path) -> duckdb.DuckDBPyConnection:
    """The catalog read-only, with file access confined to the store and the configuration locked: no reads
    of files outside the store, no writes anywhere, no extension installs or loads, no way to undo it. DuckDB
    spills to `temp_dir` (outside the store: by default it would spill beside the catalog)."""
    con = duckdb.connect(
        str(_existing_catalog(root)),
        read_only=True,
        config={"autoinstall_known_extensions": False, "autoload_known_extensions": False,
                "temp_directory": str(temp_dir)},
    )  # fmt: skip
    con.execute(f"SET allowed_directories = [{_quote(str(root.resolve()) + os.sep)}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def check_unchanged(con: duckdb.DuckDBPyConnection) -> None:
    """Refuse when a shard the catalog lists differs in size or mtime from what its refresh verified."""
    try:
        listed = con.execute("SELECT path, bytes, mtime_ns FROM manifest").fetchall()
    except duckdb.BinderException:
        raise UserInputError("store", "the catalog predates its integrity records",
                             "run `selfexplain catalog` to rebuild it") from None  # fmt: skip
    for path, size, mtime_ns in listed:
        p = Path(path)
        if not p.is_file() or _stat(p) != (path, size, mtime_ns):
            raise UserInputError("store", f"{path} changed after the catalog verified it",
                                 "run `selfexplain catalog`: it withdraws a damaged dataset, and rerunning its "
                                 "flow recomputes it")  # fmt: skip


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
        if kind := refused(st):
            raise UserInputError("query", f"{kind} statements are refused: the SQL entry point only reads",
                                 "write a SELECT (DESCRIBE/SHOW/SUMMARIZE/EXPLAIN work too); save output with "
                                 "--format csv > file")  # fmt: skip
    temp_dir = Path(tempfile.mkdtemp(prefix="selfexplain-sql-"))
    try:
        con = connect_sandboxed(root, temp_dir)
    except BaseException:
        shutil.rmtree(temp_dir)
        raise
    timer = threading.Timer(timeout_s, con.interrupt) if timeout_s else None
    try:
        check_unchanged(con)
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
        shutil.rmtree(temp_dir)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0]
