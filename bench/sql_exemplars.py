"""Benchmark the exemplar query: top-20 contexts per feature from the sparse feature-activation table
(the SQL of tasks.features.sae.write_exemplars) at 1M and 10M rows of synthetic Parquet, timed in DuckDB against
the query as it was (every row grouped by context, then ranked), alternating, medians of 3. Agreement: both
results are equal at every size, and equal a NumPy reference on the 1M table. Beside it, the cost of the catalog's
integrity checks on the same files (storage/catalog.py): the sha256 a refresh computes once per new shard, and
the stat of every shard that `selfexplain sql` makes before each query.

    .venv/bin/python bench/sql_exemplars.py [--quick]

Ends with `RESULT exemplars_1m_s <s> goal -` and `RESULT exemplars_10m_s <s> goal 2`, each after its
`RESULT verify_<n>m_s` (sha256 of every shard) and `RESULT stat_check_<n>m_ms` (stat of every shard).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storage.hashing import file_sha256  # noqa: E402
from storage.store import write_parquet  # noqa: E402
from tasks.features.sae import exemplars_sql  # noqa: E402


def synthetic(rows: int, folder: Path, seed: int = 0) -> list[str]:
    """Sparse activations like the features stage writes: 4 layers x 4,608 features, 3,200 contexts x 128."""
    rng = np.random.default_rng(seed)
    files = []
    per_file = 1_000_000
    for i in range(0, rows, per_file):
        n = min(per_file, rows - i)
        table = pa.table({
            "layer": rng.choice([3, 9, 15, 21], n).astype(np.int16),
            "feature_id": rng.integers(0, 4608, n, dtype=np.int32),
            "context_id": rng.integers(0, 3200, n, dtype=np.int32),
            "position": rng.integers(1, 128, n, dtype=np.int16),
            "value": rng.exponential(1.0, n).astype(np.float32),
        })  # fmt: skip
        path = folder / f"part-{i // per_file:05d}.parquet"
        write_parquet(table, path)
        files.append(str(path))
    return files


def grouped_sql(files: list[str], n_exemplars: int) -> str:
    """The query before the candidate threshold: one group per (layer, feature, context), then the rank."""
    return f"""
        with per_context as (
            select layer, feature_id, context_id, max(value) as max_value, arg_max(position, value) as max_position
            from read_parquet({files}) group by all
        )
        select layer, feature_id, context_id, max_value, max_position,
               row_number() over (partition by layer, feature_id order by max_value desc, context_id) as rank
        from per_context qualify rank <= {int(n_exemplars)} order by layer, feature_id, rank
        """


def reference_top(files: list[str]) -> set[tuple[int, int, int]]:
    t = duckdb.connect().execute(f"select * from read_parquet({files})").fetchnumpy()
    best: dict[tuple[int, int, int], float] = {}
    for layer, f, c, v in zip(t["layer"], t["feature_id"], t["context_id"], t["value"], strict=True):
        k = (int(layer), int(f), int(c))
        best[k] = max(best.get(k, -1.0), float(v))
    by_feature: dict[tuple[int, int], list[tuple[float, int]]] = {}
    for (layer, f, c), v in best.items():
        by_feature.setdefault((layer, f), []).append((-v, c))
    return {(lf[0], lf[1], c) for lf, vs in by_feature.items() for _, c in sorted(vs)[:20]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    sizes = [1_000_000] if args.quick else [1_000_000, 10_000_000]
    with tempfile.TemporaryDirectory() as tmp:
        for rows in sizes:
            folder = Path(tmp) / str(rows)
            folder.mkdir()
            files = synthetic(rows, folder)
            times: dict[str, list[float]] = {"ours": [], "grouped": []}
            results = {}
            for _ in range(3):
                for name, sql in (("ours", exemplars_sql(files, 20)), ("grouped", grouped_sql(files, 20))):
                    t = time.perf_counter()
                    results[name] = duckdb.connect().sql(sql).to_arrow_table()
                    times[name].append(time.perf_counter() - t)
            label = f"{rows // 1_000_000}m"
            ours, grouped = statistics.median(times["ours"]), statistics.median(times["grouped"])
            result = results["ours"]
            print(
                f"{rows:,} rows: {result.num_rows:,} exemplar rows, median {ours:.2f} s, the query as it was "
                f"{grouped:.2f} s ({grouped / ours:.2f}x); results equal: {result.equals(results['grouped'])}"
            )
            if rows == 1_000_000:
                cols = ("layer", "feature_id", "context_id")
                got = set(zip(*(result.column(c).to_pylist() for c in cols), strict=True))
                print(f"agreement with the NumPy reference: {got == reference_top(files)}")
            t = time.perf_counter()
            for f in files:
                file_sha256(f)
            print(f"RESULT verify_{label}_s {time.perf_counter() - t:.2f} goal -")
            t = time.perf_counter()
            for _ in range(100):
                for f in files:
                    os.stat(f)
            print(f"RESULT stat_check_{label}_ms {(time.perf_counter() - t) * 10:.3f} goal -")
            print(f"RESULT exemplars_{label}_s {ours:.2f} goal {'2' if rows == 10_000_000 else '-'}")


if __name__ == "__main__":
    main()
