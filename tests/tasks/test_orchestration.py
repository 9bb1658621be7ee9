from pathlib import Path

import pytest
from prefect import flow

from storage.errors import TransientError
from storage.store import Dataset
from tasks.orchestration import stage_task


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
