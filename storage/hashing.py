"""Stable content hashes of configs: the names of stage directories and the keys of Prefect's cache."""

import hashlib
import json
from typing import Any

from pydantic import BaseModel


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace; pydantic models (at any depth) become their fields,
    less those marked `json_schema_extra={"affects_results": False}` (resource knobs such as a GPU memory
    cap): changing one of those must not move a result to a new cache key. A renamed field keeps its old
    name in hashes with `json_schema_extra={"hashed_as": "<old name>"}`, so its results keep their keys, and a
    field added later with `json_schema_extra={"hashed_unless_default": True}` is left out while it holds its
    default, so adding an option moves no result that does not use it."""
    return json.dumps(_hashable(obj), sort_keys=True, separators=(",", ":"), default=str)


def _hashable(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        fields = type(obj).model_fields
        dumped = obj.model_dump(mode="json")
        extra = {
            name: f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {} for name, f in fields.items()
        }
        return {extra[name].get("hashed_as", name): _hashable(getattr(obj, name))
                if isinstance(getattr(obj, name), BaseModel | dict | list) else dumped[name]
                for name in fields if extra[name].get("affects_results") is not False
                and not (extra[name].get("hashed_unless_default") and getattr(obj, name) == fields[name].default)}  # fmt: skip
    if isinstance(obj, dict):
        return {k: _hashable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_hashable(v) for v in obj]
    return obj


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
