"""What the importers of the paper's public datasets share: reading local Parquet / JSON(L) / save_to_disk
folders, import keys by file digest, rows in a table's declared column order, writing imported rows as a
ground-truth table, and the Prefect task of a ground truth that is imported or built. Each importer sits
beside the builder of the same table, so a user who has the public data trains on it unchanged: act_patch in
tasks/patching/ground_truth.py, input_ablation in tasks/ablation/ground_truth.py, the features archive in
tasks/features/archive.py.
"""

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from storage.errors import UserInputError
from storage.hashing import config_hash, file_sha256
from storage.store import Dataset

if TYPE_CHECKING:
    from prefect import Task

IMPORT_VERSION = 1


def read_rows(path: str | Path, field: str) -> list[dict[str, Any]]:
    """Rows of a .parquet, .json (a list), .jsonl file, or a datasets save_to_disk folder (split train)."""
    p = Path(path)
    if not p.exists():
        raise UserInputError(field, f"{p} does not exist", "point it at a .parquet/.json/.jsonl file or a folder")
    if p.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else ds[sorted(ds)[0]]
        return ds.to_list()
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(p).to_pylist()
    text = p.read_text(encoding="utf-8")
    try:
        return json.loads(text) if p.suffix == ".json" else [json.loads(x) for x in text.splitlines() if x.strip()]
    except json.JSONDecodeError as exc:
        raise UserInputError(field, f"{p} is not valid JSON ({exc.msg}, line {exc.lineno})", "fix the file") from None


def require_columns(rows: list[dict[str, Any]], columns: tuple[str, ...], field: str, path: str | Path) -> None:
    if not rows:
        raise UserInputError(field, f"{path} holds no rows", "give a non-empty file")
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise UserInputError(field, f"{path} lacks column(s) {', '.join(missing)}", "use the public schema")


def table_row(table: str, columns: tuple[str, ...], values: dict[str, Any]) -> dict[str, Any]:
    """A row of `table` in the order `columns` declares; a missing or unknown column is a bug, raised at once."""
    if missing := [c for c in columns if c not in values]:
        raise ValueError(f"a {table} row lacks {missing}")
    if unknown := sorted(set(values) - set(columns)):
        raise ValueError(f"a {table} row has columns {unknown} that {table} does not declare")
    return {c: values[c] for c in columns}


def digest(path: str) -> str:
    """sha256 of a file, or of a folder's (relative path, sha256) list."""
    p = Path(path)
    if p.is_dir():
        return config_hash("folder", 1, [(str(f.relative_to(p)), file_sha256(str(f))) for f in sorted(p.rglob("*"))
                                          if f.is_file()])  # fmt: skip
    return file_sha256(str(p))


def check_import(train: str | None, test: str | None, field: str) -> bool:
    """True when a public dataset is to be imported; both splits or neither, and both must exist."""
    if train is None and test is None:
        return False
    for name, value in (("import_train", train), ("import_test", test)):
        if value is None:
            raise UserInputError(f"{field}.{name}", "is missing", "give both import_train and import_test")
        if not Path(value).exists():
            raise UserInputError(f"{field}.{name}", f"{value} does not exist", "point it at the dataset file/folder")
    return True


def import_key(stage: str, train: str, test: str) -> str:
    """Dataset key of an imported ground truth: the content of both splits, not their paths."""
    return config_hash(f"{stage}-import", IMPORT_VERSION, {"train": digest(train), "test": digest(test)})


def ground_truth_key(stage: str, version: int, target: Any, cfg: Any, field: str) -> str:
    """Key of a ground-truth dataset that is either imported (the files' content) or built from the target
    (its weights and the config; the import paths play no part in what is built)."""
    if check_import(cfg.import_train, cfg.import_test, field):
        return import_key(stage, cfg.import_train, cfg.import_test)
    from tasks.common.models import target_key

    return target_key(stage, version, target, cfg.model_dump(exclude={"import_train", "import_test"}))


def imported_or(
    out: Dataset, cfg: Any, importer: Callable[[str, str], list[dict[str, Any]]], build: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """`out`'s summary: as a previous run left it, or after importing both splits, or after `build()`."""
    from tasks.common.orchestration import complete_or

    def make() -> dict[str, Any]:
        if not (cfg.import_train and cfg.import_test):
            return build()
        rows = importer(cfg.import_train, "train") + importer(cfg.import_test, "test")
        return write_imported(out, rows, {"train": cfg.import_train, "test": cfg.import_test})

    return complete_or(out, make)


def ground_truth_task(
    stage: str, key: Callable[[Any], str], field: str, importer: Callable[[str, str], list[dict[str, Any]]]
) -> Callable[[Callable[[Any, Dataset], dict[str, Any]]], "Task"]:
    """Decorator making the Prefect task `<field>-ground-truth` (it holds a GPU slot) of a ground-truth table
    from its builder `build(recipe, out)`: the task, called with the recipe alone, writes table `stage` under
    `key(recipe)` in the recipe's store, imported when its `field` section names both public splits, else by
    `build`, and returns the table's summary. Patching and ablation build theirs this one way."""
    from storage.store import store_root
    from tasks.common.orchestration import stage_task  # as in imported_or: importing this module needs no Prefect

    def dataset(recipe: Any) -> Dataset:
        return Dataset(store_root(recipe.home), stage, key(recipe))

    def decorate(build: Callable[[Any, Dataset], dict[str, Any]]) -> "Task":
        def run(recipe: Any) -> dict[str, Any]:
            out = dataset(recipe)
            return imported_or(out, getattr(recipe, field), importer, lambda: build(recipe, out))

        # Prefect names the task's key by the function's qualified name and describes it by the docstring
        run.__name__, run.__qualname__, run.__module__ = build.__name__, build.__qualname__, build.__module__
        run.__doc__ = build.__doc__
        return stage_task(f"{field}-ground-truth", gpu=True, output=lambda p: dataset(p["recipe"]))(run)

    return decorate


def write_imported(out: Dataset, rows: list[dict[str, Any]], source: dict[str, str]) -> dict[str, Any]:
    """Write imported rows as the ground-truth table `out` (one shard) and mark it complete."""
    out.create({"stage": out.table, "imported_from": source})
    columns = {k: [r[k] for r in rows] for k in rows[0] if k != "intervention_vector"}
    table = pa.table(columns)
    if "intervention_vector" in rows[0]:
        vectors = np.stack([r["intervention_vector"] for r in rows]).astype(np.float32)  # [N, d]
        table = table.append_column(
            "intervention_vector", pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
        )
    out.write_shard(0, table)
    summary = {"rows": len(rows), "imported_from": source,
               "test": sum(r["split"] == "test" for r in rows)}  # fmt: skip
    out.mark_complete(summary)
    return summary


# -- the features archive: pickles, read without running code ---------------------------------------------
