from pathlib import Path

import pytest
import torch
from prefect import flow

from storage.errors import TransientError
from storage.store import Dataset
from tasks.common import orchestration
from tasks.common.models import oom_backoff
from tasks.common.orchestration import FAULT_ENV, stage_task


def _flaky_task(home: Path, failures: list[BaseException]):
    calls = []

    @stage_task("flaky", output=lambda p: Dataset(home, "flaky", "k"), retry_delay_seconds=0)
    def flaky(x: int) -> int:
        calls.append(x)
        if failures:
            raise failures.pop(0)
        return x * 2

    @flow
    def run(x: int) -> int:
        return flaky(x)

    return run, calls


def test_transient_errors_are_retried(home):
    run, calls = _flaky_task(home, [TransientError("nfs hiccup"), TimeoutError("slow disk")])
    assert run(21) == 42
    assert len(calls) == 3


def test_other_errors_fail_at_once(home):
    run, calls = _flaky_task(home, [ValueError("a bug")])
    with pytest.raises(ValueError, match="a bug"):
        run(1)
    assert len(calls) == 1


def test_injected_transient_fault_is_retried_to_success(home, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "flaky:transient")
    monkeypatch.setattr(orchestration, "_faults_raised", set())
    run, calls = _flaky_task(home, [])
    assert run(5) == 10 and len(calls) == 1  # the fault struck before the body, once


def test_injected_permanent_fault_fails_the_run_naming_the_task(home, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "flaky:permanent")
    run, calls = _flaky_task(home, [])
    with pytest.raises(RuntimeError, match="injected permanent fault in task 'flaky'"):
        run(5)
    assert calls == []


def test_oom_halves_the_batch_until_it_fits():
    tried = []

    def run(size: int) -> int:
        tried.append(size)
        if size > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return size

    assert oom_backoff(run, 32, "test") == 4 and tried == [32, 16, 8, 4]
    with pytest.raises(torch.cuda.OutOfMemoryError):
        oom_backoff(lambda size: run(size * 100), 2, "test")


def test_cache_key_exists_only_for_a_complete_dataset(home):
    from prefect.cache_policies import CacheKeyFnPolicy

    task = stage_task("keyed", output=lambda p: Dataset(home, "keyed", "k"))(lambda x: x)
    key = lambda: task.cache_policy.compute_key(None, {"x": 1}, {})  # noqa: E731
    assert isinstance(task.cache_policy, CacheKeyFnPolicy) and key() is None
    ds = Dataset(home, "keyed", "k")
    ds.create({})
    ds.mark_complete({})
    assert key().startswith("keyed-k-") and key().endswith(str(ds.summary()["completed_at"]))


def test_a_killed_holder_of_the_local_gpu_slot_frees_it_at_once(tmp_path, monkeypatch):
    """Without a Prefect server the slot is a file lock: held, it blocks another process; its holder killed
    mid-task (SIGKILL: no cleanup runs), the next task takes it at once instead of waiting forever."""
    import fcntl
    import os
    import signal
    import subprocess
    import sys
    import time

    lock = tmp_path / "gpu.lock"
    monkeypatch.setenv("SELFEXPLAIN_GPU_LOCK", str(lock))
    holder = subprocess.Popen(
        [sys.executable, "-c", "from tasks.common.orchestration import gpu_slot\nimport time\nwith gpu_slot():\n"
         "    print('held', flush=True)\n    time.sleep(600)"],
        env=dict(os.environ), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    with open(lock, "a") as f, pytest.raises(BlockingIOError):
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # busy while the holder lives
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    started = time.monotonic()
    with orchestration.gpu_slot():
        waited = time.monotonic() - started
    assert waited < 5
