"""Result tables shared by every task: `metrics`, `predictions`, `runs` (one dataset per run id).

metrics(run_id, task, target_model, explainer_model, method, n_train, seed, split, metric, value, se, n)
predictions(run_id, task, example_id, explainer_model, method, split, prediction, reference, score)
runs(run_id, flow, recipe, config_hash, code_version, started_at, finished_at, status)
"""

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from storage.store import Dataset


@dataclass(frozen=True)
class Metric:
    run_id: str
    task: str
    target_model: str
    explainer_model: str
    method: str
    n_train: int
    seed: int
    split: str
    metric: str
    value: float
    se: float
    n: int


@dataclass(frozen=True)
class Prediction:
    run_id: str
    task: str
    example_id: str
    explainer_model: str
    method: str
    split: str
    prediction: str
    reference: str
    score: float


METRIC_SCHEMA = pa.schema(
    [("run_id", pa.string()), ("task", pa.string()), ("target_model", pa.string()), ("explainer_model", pa.string()),
     ("method", pa.string()), ("n_train", pa.int64()), ("seed", pa.int64()), ("split", pa.string()),
     ("metric", pa.string()), ("value", pa.float64()), ("se", pa.float64()), ("n", pa.int64())]
)  # fmt: skip
PREDICTION_SCHEMA = pa.schema(
    [("run_id", pa.string()), ("task", pa.string()), ("example_id", pa.string()), ("explainer_model", pa.string()),
     ("method", pa.string()), ("split", pa.string()), ("prediction", pa.string()), ("reference", pa.string()),
     ("score", pa.float64())]
)  # fmt: skip


def write_results(
    root: Path, run_id: str, metrics: list[Metric], predictions: list[Prediction], run: dict[str, Any]
) -> dict[str, int]:
    """Write one run's rows to `metrics`, `predictions` and `runs` (each a dataset keyed by the run id)."""
    tables = {
        "metrics": pa.Table.from_pylist([asdict(m) for m in metrics], schema=METRIC_SCHEMA),
        "predictions": pa.Table.from_pylist([asdict(p) for p in predictions], schema=PREDICTION_SCHEMA),
        "runs": pa.Table.from_pylist(
            [
                {
                    **run,
                    "run_id": run_id,
                    "recipe": json.dumps(run.get("recipe"), default=str),
                    "finished_at": time.time(),
                }
            ]
        ),
    }
    for name, table in tables.items():
        ds = Dataset(root, name, run_id)
        ds.create({"run_id": run_id})
        ds.write_shard(0, table)
        ds.mark_complete({"rows": table.num_rows})
    return {k: v.num_rows for k, v in tables.items()}


def recorded(root: Path, run_id: str) -> dict[str, Any] | None:
    """The row counts of a run whose result tables are all complete (a rerun then evaluates nothing)."""
    datasets = {name: Dataset(root, name, run_id) for name in ("metrics", "predictions", "runs")}
    if not all(ds.complete_or_invalidate() for ds in datasets.values()):
        return None
    return {"run_id": run_id, **{name: ds.summary()["rows"] for name, ds in datasets.items()}}


def record_run(
    root: Path,
    flow: str,
    recipe: Any,
    run_id: str,
    metrics: list[Metric],
    predictions: list[Prediction],
    started: float,
    code_version: str,
) -> dict[str, Any]:
    """Write the run's result tables and publish its metrics as a table artifact (key `<flow>-metrics`)."""
    from prefect.artifacts import create_table_artifact

    run = {"flow": flow, "recipe": recipe.model_dump(mode="json"), "config_hash": run_id.split("-", 1)[1],
           "code_version": code_version, "started_at": started, "status": "completed"}  # fmt: skip
    counts = write_results(root, run_id, metrics, predictions, run)
    create_table_artifact(
        key=f"{flow}-metrics",
        table=[{k: v for k, v in asdict(m).items() if k != "run_id"} for m in metrics],
        description=f"{flow}: metrics of run {run_id}",
    )
    return {"run_id": run_id, **counts}
