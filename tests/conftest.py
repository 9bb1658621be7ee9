"""Shared fixtures: an isolated Prefect home, model cache and store per session, tiny models and corpora, configs."""

import os
import tempfile
from pathlib import Path

# Before anything imports prefect: a private Prefect home (its ephemeral API DB), quiet telemetry, and no hub.
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="selfexplain-tests-"))
os.environ.setdefault("PREFECT_HOME", str(_SESSION_DIR / "prefect"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # as the CLI: a fresh home is slow
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # its INFO lines at exit hit pytest's closed capture
os.environ["HF_HUB_OFFLINE"] = "1"
# Tiny models are built into this session's own cache: a first run on a fresh machine and a rerun behave alike.
os.environ["SELFEXPLAIN_MODEL_CACHE"] = str(_SESSION_DIR / "models")
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("SELFEXPLAIN_HOME", None)

import pytest  # noqa: E402

from tests.factories import PROSE, make_recipe  # noqa: E402 (after the environment above)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """An empty store root."""
    return tmp_path / "store"


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    """A small plain-text corpus (about 6k byte tokens)."""
    path = tmp_path / "corpus.txt"
    path.write_text(PROSE * 20)
    return path


@pytest.fixture
def recipe_factory(home: Path, text_file: Path):
    """Build tiny cache recipes: recipe_factory(cache={"layers": [0]})."""
    return lambda **sections: make_recipe(home, text_file, **sections)


@pytest.fixture(scope="session")
def cli_env() -> dict[str, str]:
    """Environment for `selfexplain` subprocesses: their own Prefect home (SQLite is not shared with the
    in-process ephemeral API of the test session)."""
    env = dict(os.environ)
    env["PREFECT_HOME"] = str(_SESSION_DIR / "prefect-cli")
    return env
