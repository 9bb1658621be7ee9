"""Error types shared by every layer: bad user input (exit 2) and transient failures (retried)."""

import reprlib
from typing import Any

MAX_PART_CHARS = 600  # of a field, problem or fix: an error is one readable line, whatever input caused it

# Nested and long values (a recipe's lists, a YAML alias expansion) are shown by their start, never in full.
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 3, 6, 6, 6, 60, 60


def one_line(text: str, limit: int = MAX_PART_CHARS) -> str:
    """`text` cut to `limit` characters with line breaks and other control characters escaped (a YAML key or
    a path may hold a newline), so that it prints as one line."""
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type when it has none): a library's error, in one line."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def short_repr(value: Any, limit: int = 100) -> str:
    """repr(value) for a message: nested containers and long strings shown by their start (never expanded)."""
    return one_line(_SHORT.repr(value), limit)


class UserInputError(ValueError):
    """Bad input from a user: names the offending field and the fix. The CLI prints it as one line, exit 2."""

    def __init__(self, field: str, problem: str, fix: str) -> None:
        self.field, self.problem, self.fix = (one_line(str(part)) for part in (field, problem, fix))
        super().__init__(f"{self.field}: {self.problem}; fix: {self.fix}")


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
