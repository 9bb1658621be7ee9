"""What every stage's Prefect task shares: cross-run cache keys, retries of transient errors only.

The compute of a stage lives in plain functions (tests call them directly); its @task wrapper is a few lines
built with `stage_task`. Prefect's cache key is the stage's output dataset key (config hash + code version),
the store's id (a random id made with the store) and the time the dataset was completed; while the dataset
is incomplete, damaged or deleted there is no key, so Prefect runs the stage and never returns paths that
are gone. Independently, each stage returns at once when its dataset is complete and skips the shards its
manifest lists: the first rerun after a completion runs the stage function, which returns without loading a
model; later reruns are `Cached`.
"""

import contextlib
import functools
import inspect
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prefect import Task, task
from prefect.client.schemas.objects import TaskRun
from prefect.context import TaskRunContext
from prefect.states import State
from prefect.tasks import exponential_backoff

from storage.errors import TransientError, is_transient
from storage.store import Dataset, file_lock, store_id

RETRIES = 3
GPU_SLOT = "gpu"  # global concurrency limit held by every task that keeps a model on the accelerator
GPU_LEASE_S = 60  # the shortest lease Prefect's API grants: a crashed holder's slot returns within about this


def retry_transient(task: Task, task_run: TaskRun, state: State) -> bool:
    """Retry only transient failures (flaky I/O, timeouts); a bug or bad input fails at once."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and is_transient(exc)


def complete_or(out: Dataset, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The summary of `out` when a previous run completed it (no model is loaded), else `compute()`'s."""
    if out.complete_or_invalidate():
        return {"path": str(out.path), **out.summary()}
    return {"path": str(out.path), **compute()}


def stage_task(name: str, output: Callable[[dict[str, Any]], Dataset], gpu: bool = False, **options: Any) -> Callable:
    """Decorator for a stage's task: `output(parameters)` names the dataset the task writes; `gpu` makes the
    task hold one slot of the global concurrency limit `gpu` while it runs (models on the accelerator)."""

    def cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
        # No cache entry while the output is incomplete, damaged or deleted: Prefect must run the stage (which
        # then resumes from its manifest). Once complete, the key names this completion of this dataset.
        dataset = output(parameters)
        if not dataset.complete_or_invalidate():
            return None
        return f"{name}-{dataset.key}-{store_id(dataset.root)}-{dataset.summary()['completed_at']}"

    settings: dict[str, Any] = {
        "name": name,
        "cache_key_fn": cache_key,
        "persist_result": True,
        "retries": RETRIES,
        "retry_delay_seconds": exponential_backoff(backoff_factor=2),
        "retry_condition_fn": retry_transient,
    }

    def decorate(fn: Callable) -> Task:
        body = _holding_output_lock(fn, output)
        body = _holding_gpu_slot(body) if gpu else body
        return task(**{**settings, **options})(_with_fault_injection(name, body))

    return decorate


def _holding_output_lock(fn: Callable, output: Callable[[dict[str, Any]], Dataset]) -> Callable:
    """Two runs computing the same dataset at once: the second waits for the first, then finds it complete."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        with output(bound.arguments).lock():
            return fn(*args, **kwargs)

    return run


def _holding_gpu_slot(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with gpu_slot():
            return fn(*args, **kwargs)

    return run


@contextlib.contextmanager
def gpu_slot() -> Iterator[None]:
    """Hold one accelerator slot while the body runs.

    With a Prefect server (PREFECT_API_URL set): a slot of the global concurrency limit `gpu`, visible in the
    UI, on a lease the client renews while the task runs; if the holder dies, the server's repossessor
    reclaims the slot once the lease lapses (GPU_LEASE_S). Without one (`selfexplain run` on Prefect's
    ephemeral API) nothing would ever reclaim a dead holder's slot — the ephemeral API runs no repossessor and
    keeps leases in memory — so a killed run would block every later run forever; there the slot is an
    exclusive file lock (machine-wide, `local_gpu_lock_path()`), which the kernel releases with its holder.
    """
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        from prefect.concurrency.sync import concurrency

        with concurrency(GPU_SLOT, occupy=1, strict=False, lease_duration=GPU_LEASE_S):
            yield
    else:
        with file_lock(local_gpu_lock_path()):
            yield


def local_gpu_lock_path() -> Path:
    """The file lock of the accelerator for runs without a Prefect server: $SELFEXPLAIN_GPU_LOCK, else one
    per user in the temp directory (so every store and Prefect home on the machine shares it)."""
    default = Path(tempfile.gettempdir()) / f"selfexplain-gpu-{os.getuid()}.lock"
    return Path(os.environ.get("SELFEXPLAIN_GPU_LOCK", default))


def ensure_gpu_limit(slots: int | None = None) -> None:
    """On a Prefect server: create the global concurrency limit `gpu` (1 slot) if missing, or set it to
    `slots` when given. Without a server the slot is a file lock and there is nothing to create."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        return
    with get_client(sync_client=True) as client:
        if slots is None:
            try:
                client.read_global_concurrency_limit_by_name(GPU_SLOT)
                return
            except ObjectNotFound:
                slots = 1
        client.upsert_global_concurrency_limit_by_name(GPU_SLOT, slots)


# Fault injection for reliability tests: SELFEXPLAIN_FAULT="<task name>:transient" makes that task raise a
# TransientError on its first attempt in this process (then succeed on retry); "<task name>:permanent"
# makes every attempt raise a RuntimeError. Unset, it costs one environment lookup per task run.
FAULT_ENV = "SELFEXPLAIN_FAULT"
_faults_raised: set[str] = set()


def _with_fault_injection(name: str, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        spec = os.environ.get(FAULT_ENV, "")
        target, _, kind = spec.partition(":")
        if target == name:
            if kind == "permanent":
                raise RuntimeError(f"injected permanent fault in task {name!r} ({FAULT_ENV})")
            if kind == "transient" and name not in _faults_raised:
                _faults_raised.add(name)
                raise TransientError(f"injected transient fault in task {name!r} ({FAULT_ENV})")
        return fn(*args, **kwargs)

    return run


@task(name="refresh-catalog", retries=RETRIES, retry_delay_seconds=[1, 4, 16], retry_condition_fn=retry_transient)
def refresh_catalog_task(home: str) -> str:
    """Rebuild the DuckDB catalog so the new tables are queryable."""
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
