"""What every stage's Prefect task shares: cross-run cache keys, retries of transient errors only.

The compute of a stage lives in plain functions (tests call them directly); its @task wrapper is a few lines
built with `stage_task`. Prefect's cache key is the stage's output dataset key (config hash + code version)
plus the store's id, a random id made with the store: deleting a store (or pointing at another) never leaves
Prefect returning paths that are gone. Independently, each stage returns at once when its dataset is
complete and skips the shards its manifest lists, so a rerun without Prefect's cache redoes nothing either.
"""

from collections.abc import Callable
from typing import Any

from prefect import Task, task
from prefect.client.schemas.objects import TaskRun
from prefect.context import TaskRunContext
from prefect.states import State
from prefect.tasks import exponential_backoff

from storage.errors import is_transient
from storage.store import Dataset, store_id

RETRIES = 3


def retry_transient(task: Task, task_run: TaskRun, state: State) -> bool:
    """Retry only transient failures (flaky I/O, timeouts); a bug or bad input fails at once."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and is_transient(exc)


def complete_or(out: Dataset, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The summary of `out` when a previous run completed it (no model is loaded), else `compute()`'s."""
    if out.is_complete():
        return {"path": str(out.path), **out.summary()}
    return {"path": str(out.path), **compute()}


def stage_task(name: str, output: Callable[[dict[str, Any]], Dataset], **options: Any) -> Callable:
    """Decorator for a stage's task: `output(parameters)` names the dataset the task writes."""

    def cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
        dataset = output(parameters)
        return f"{name}-{dataset.key}-{store_id(dataset.root)}"

    settings: dict[str, Any] = {
        "name": name,
        "cache_key_fn": cache_key,
        "persist_result": True,
        "retries": RETRIES,
        "retry_delay_seconds": exponential_backoff(backoff_factor=2),
        "retry_condition_fn": retry_transient,
    }
    return task(**{**settings, **options})


@task(name="refresh-catalog", retries=RETRIES, retry_delay_seconds=[1, 4, 16], retry_condition_fn=retry_transient)
def refresh_catalog_task(home: str) -> str:
    """Rebuild the DuckDB catalog so the new tables are queryable."""
    from pathlib import Path

    from storage.catalog import refresh_catalog

    return str(refresh_catalog(Path(home)))


def progress_reporter(key: str, description: str) -> Callable[..., None]:
    """A callback(fraction, message) that updates a Prefect progress artifact (stable key) and logs."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact
    from prefect.logging import get_run_logger

    artifact_id = create_progress_artifact(progress=0.0, key=key, description=description)
    logger = get_run_logger()
    last = {"logged": -1.0}

    def report(fraction: float, message: str = "") -> None:
        update_progress_artifact(artifact_id=artifact_id, progress=round(100 * fraction, 1))
        if fraction - last["logged"] >= 0.1 or fraction >= 1:
            logger.info(f"{description}: {100 * fraction:.0f}% {message}")
            last["logged"] = fraction

    return report
