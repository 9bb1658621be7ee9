"""Error types shared by every layer: bad user input (exit 2) and transient failures (retried)."""


class UserInputError(ValueError):
    """Bad input from a user: names the offending field and the fix. The CLI prints it as one line, exit 2."""

    def __init__(self, field: str, problem: str, fix: str) -> None:
        self.field, self.problem, self.fix = field, problem, fix
        super().__init__(f"{field}: {problem}; fix: {fix}")


class CorruptShardError(RuntimeError):
    """A stored shard no longer matches its manifest. It has been withdrawn; a rerun recomputes it."""


class TransientError(RuntimeError):
    """A failure worth retrying (flaky filesystem, pre-empted worker, busy lock). Prefect retries only these."""


# Exceptions from the OS and the network that are worth a retry. Everything else (bugs, bad input, OOM that
# a task did not handle) fails the run at once, with its cause, instead of burning retries.
TRANSIENT_TYPES: tuple[type[BaseException], ...] = (
    TransientError,
    TimeoutError,
    ConnectionError,
    BlockingIOError,
    InterruptedError,
)


def is_transient(exc: BaseException | None) -> bool:
    """True when `exc` (or an exception it was raised from) is a transient failure."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, TRANSIENT_TYPES):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False
