"""Stable content hashes of configs: the names of stage directories and the keys of Prefect's cache."""

import hashlib
import json
from typing import Any

from pydantic import BaseModel


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace; pydantic models are dumped in JSON mode first."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(stage: str, stage_version: int, config: Any, length: int = 16) -> str:
    """Hash of (stage name, stage code version, config). A stage bumps its version when its output changes."""
    payload = canonical_json({"stage": stage, "version": stage_version, "config": config})
    return hashlib.sha256(payload.encode()).hexdigest()[:length]


def file_sha256(path: str, chunk_bytes: int = 1 << 20) -> str:
    """sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()
