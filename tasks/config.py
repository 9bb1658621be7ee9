"""Typed configs for every stage. Each field's description is the CLI help and the Prefect UI form label.

Recipes (YAML under recipes/) are validated against these models; an unknown key is an error, never ignored.
"""

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from storage.errors import UserInputError


class StrictModel(BaseModel):
    """Base for every config: unknown keys are errors, instances are immutable (they get hashed)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(StrictModel):
    """Which model to load, and where and how to run it."""

    name: str = Field(
        "smollm2-135m-instruct",
        description="Registry name (smollm2-135m-instruct, gemma3-270m, tiny-llama, tiny-gemma3), "
        "a local Hugging Face model folder, or a hub id (needs the hub to be reachable).",
    )
    device: str = Field("auto", description="'auto' (cuda when present, else cpu), 'cpu', 'cuda' or 'cuda:N'.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype. 'auto': bfloat16 on cuda, float32 on cpu."
    )
    autocast: Literal["auto", "none", "bfloat16", "float16"] = Field(
        "auto",
        description="Mixed-precision compute. 'auto': bfloat16 autocast on a CPU with AMX/AVX512-BF16 "
        "(2-3x faster), none elsewhere. 'none' gives the float32 reference.",
    )
    seed: int = Field(0, description="Seed of the random initialisation (tiny-* test models only).")


class CorpusConfig(StrictModel):
    """The text the target reads, and how it is cut into fixed-length contexts."""

    source: str = Field(
        "builtin:python-docs",
        description="'builtin:python-docs' (Python's reference topics plus stdlib, numpy and torch docstrings: "
        "about 2.3M SmolLM2 tokens, on every install), or a path: a .txt/.jsonl/.parquet file, a folder of them, or a datasets save_to_disk folder.",
    )
    text_field: str = Field("text", description="Column / JSON key holding the text (jsonl, parquet, datasets).")
    n_tokens: int = Field(100_000, gt=0, description="Tokens to take from the corpus (rounded up to whole contexts).")
    context_length: int = Field(128, ge=2, description="Tokens per context, the first being BOS.")


class CacheConfig(StrictModel):
    """What to record of the residual stream."""

    layers: list[int] = Field(
        [3, 15],
        min_length=1,
        description="Layers whose residual stream is cached: the output of decoder block l (0-based; "
        "HF hidden_states[l+1], TransformerLens blocks.l.hook_resid_post).",
    )
    skip_first: int = Field(
        1, ge=0, description="Positions at the start of each context not stored (the BOS / attention sink)."
    )
    positions_per_context: int | None = Field(
        None, gt=0, description="Store this many positions per context, sampled with `seed`; null stores all."
    )
    seed: int = Field(0, description="Seed of the position sampling.")
    dtype: Literal["float16", "float32"] = Field("float16", description="Storage dtype of the activations.")
    batch_size: int = Field(16, gt=0, description="Contexts per forward pass.")
    contexts_per_shard: int = Field(
        64, gt=0, description="Contexts per Parquet shard: the unit of resume after a crash."
    )

    @field_validator("layers")
    @classmethod
    def _sorted_unique(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError("layers must not repeat")
        return sorted(v)


class CacheRecipe(StrictModel):
    """Recipe of the cache-activations flow: run `model` over `corpus` and store the residual stream."""

    home: str | None = Field(None, description="Store root; null uses $SELFEXPLAIN_HOME or ./.selfexplain.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The target model.")
    corpus: CorpusConfig = Field(default_factory=CorpusConfig, description="The text it reads.")
    cache: CacheConfig = Field(default_factory=CacheConfig, description="What is recorded.")


RECIPES: dict[str, type[StrictModel]] = {"cache-activations": CacheRecipe}


def _field_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "<recipe>"


def _one_line(err: ValidationError) -> UserInputError:
    """The first pydantic error as one line naming the field and the fix."""
    e = err.errors()[0]
    field = "recipe field '" + _field_path(e["loc"]) + "'"
    if e["type"] == "extra_forbidden":
        return UserInputError(
            field, "unknown key", "remove it or correct its spelling (`selfexplain recipe <flow>` lists the keys)"
        )
    return UserInputError(field, e["msg"].lower(), f"give a valid value (got {e.get('input')!r})")


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set data['a']['b'] = value for dotted='a.b', creating dicts on the way."""
    *parents, leaf = dotted.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise UserInputError(f"--set {dotted}", f"'{p}' is not a section", "set a key inside a section")
    node[leaf] = value


def load_recipe(
    kind: type[StrictModel], path: str | Path | None = None, overrides: list[str] | None = None
) -> StrictModel:
    """Read a YAML recipe, apply `key.sub=value` overrides (values parsed as YAML), validate strictly."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserInputError("--config", f"recipe file {str(p)!r} not found", "pass an existing YAML file")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise UserInputError("--config", f"{p} is not valid YAML{where}", "fix the YAML syntax") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise UserInputError("--config", f"{p} must hold a mapping at the top", "write key: value pairs")
        data = loaded or {}
    for item in overrides or []:
        if "=" not in item:
            raise UserInputError("--set", f"{item!r} has no '='", "write --set section.key=value")
        key, raw = item.split("=", 1)
        set_dotted(data, key.strip(), yaml.safe_load(raw))
    try:
        return kind.model_validate(data)
    except ValidationError as err:
        raise _one_line(err) from None
