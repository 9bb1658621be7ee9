"""What every recipe is built from: the strict base model, the target model, corpus and activation-cache
configs, and recipe loading from YAML. Each field's description is the CLI help and the Prefect UI form label.

Recipes (YAML under recipes/) are validated against these models; an unknown key is an error, never ignored.
Each task's own configs live in its folder (tasks/<task>/config.py); tasks/recipes.py lists every recipe.
"""

import functools
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Self, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from storage.errors import UserInputError, one_line, short_repr

# Upper bounds of the integer fields: generous for an 8B model on a large GPU, yet small enough that no value
# reaches a loader, an allocation or a seeded generator that cannot take it (a 400-digit batch size).
MAX_BATCH = 65_536  # items per forward pass, decode batch or shard
MAX_TOKENS = 10**12  # tokens of a corpus
MAX_ITEMS = 10**9  # examples, rows, pairs, features, positions, optimizer steps
MAX_LENGTH = 1_048_576  # tokens of one context or prompt
MAX_LAYERS = 4096  # decoder blocks (layer indices, chunks)
MAX_SEED = 2**32 - 1  # numpy, torch and random all take 0..2**32-1
SEED = {"ge": 0, "le": MAX_SEED}


def count_cap(description: str) -> Any:
    """The field of an `int | None` that caps how many of something a stage uses: a positive count up to
    MAX_ITEMS, null (the default) for all of them. `description` says what is capped."""
    return Field(None, gt=0, le=MAX_ITEMS, description=f"{description}; null uses all.")


def _leaf_types(annotation: Any) -> set[Any]:
    """The scalar types a field holds: through Optional/Union, list and Annotated (not into dicts or models)."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType, list, Annotated):
        args = get_args(annotation)[:1] if origin is Annotated else get_args(annotation)
        return set().union(*(_leaf_types(a) for a in args))
    return {annotation}


@functools.cache
def _number_fields(model: type[BaseModel]) -> frozenset[str]:
    """Fields of `model` whose values are ints or floats (or lists of them), not booleans."""
    return frozenset(name for name, field in model.model_fields.items()
                     if bool not in (leaves := _leaf_types(field.annotation)) and leaves & {int, float})  # fmt: skip


class StrictModel(BaseModel):
    """Base for every config: unknown keys are errors, instances are immutable (they get hashed). Besides
    pydantic's checks, every config refuses what lax validation would take silently: true/false for a number
    (`layers: [true]` is not layer 1), inf and nan for a float, and a value repeated in a list (lists are sets
    of layers, sizes, seeds, roles, modes...)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, v: Any, info: ValidationInfo) -> Any:
        if info.field_name in _number_fields(cls) and any(
            isinstance(x, bool) for x in (v if isinstance(v, list) else [v])
        ):
            raise ValueError("true/false is not a number")
        return v

    @field_validator("*", mode="after")
    @classmethod
    def _no_repeats(cls, v: Any) -> Any:
        if isinstance(v, list):
            for i, x in enumerate(v):
                if x in v[:i]:
                    raise ValueError(f"{short_repr(x)} is given twice")
        return v


RESOURCE_ONLY = {"affects_results": False}  # a field excluded from dataset hashes: it changes speed, not results


class ModelConfig(StrictModel):
    """Which model to load, and where and how to run it."""

    name: str = Field(
        "smollm2-135m-instruct",
        description="Registry name (smollm2-135m-instruct, gemma3-270m, tiny-llama, tiny-gemma3), "
        "a local Hugging Face model folder, or a hub id already in the local HF cache (nothing is downloaded).",
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
    seed: int = Field(0, **SEED, description="Seed of the random initialisation (tiny-* test models only).")
    memory_fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description="cuda only: cap this process's share of GPU memory (null: no cap). Not part of cache keys.",
        json_schema_extra=RESOURCE_ONLY,
    )


class CorpusConfig(StrictModel):
    """The text the target reads, and how it is cut into fixed-length contexts."""

    source: str = Field(
        "builtin:python-docs",
        description="'builtin:python-docs' (Python's reference topics plus stdlib, numpy and torch docstrings: "
        "about 2.3M SmolLM2 tokens, on every install), or a path: a .txt/.jsonl/.parquet file, a folder of them, "
        "or a datasets save_to_disk folder.",
    )
    text_field: str = Field("text", description="Column / JSON key holding the text (jsonl, parquet, datasets).")
    n_tokens: int = Field(
        100_000, gt=0, le=MAX_TOKENS, description="Tokens to take from the corpus (rounded up to whole contexts)."
    )
    context_length: int = Field(128, ge=2, le=MAX_LENGTH, description="Tokens per context, the first being BOS.")


class CacheConfig(StrictModel):
    """What to record of the residual stream."""

    layers: list[Annotated[int, Field(le=MAX_LAYERS)]] = Field(
        [3, 15],
        min_length=1,
        description="Layers whose residual stream is cached: the output of decoder block l (0-based; "
        "HF hidden_states[l+1], TransformerLens blocks.l.hook_resid_post).",
    )
    skip_first: int = Field(
        1,
        ge=0,
        le=MAX_LENGTH,
        description="Positions at the start of each context not stored (the BOS / attention sink).",
    )
    positions_per_context: int | None = Field(
        None,
        gt=0,
        le=MAX_LENGTH,
        description="Store this many positions per context, sampled with `seed`; null stores all.",
    )
    seed: int = Field(0, **SEED, description="Seed of the position sampling.")
    dtype: Literal["float16", "float32"] = Field("float16", description="Storage dtype of the activations.")
    batch_size: int = Field(16, gt=0, le=MAX_BATCH, description="Contexts per forward pass.")
    contexts_per_shard: int = Field(
        64, gt=0, le=MAX_BATCH, description="Contexts per Parquet shard: the unit of resume after a crash."
    )

    @field_validator("layers")
    @classmethod
    def _sorted(cls, v: list[int]) -> list[int]:
        return sorted(v)  # repeats are refused by StrictModel


def check_positions(corpus: CorpusConfig, cache: CacheConfig) -> None:
    """A context of `corpus` must hold a position to store, and the `cache.positions_per_context` asked."""
    storable = corpus.context_length - cache.skip_first
    if storable <= 0:
        raise UserInputError("cache.skip_first", f"{cache.skip_first} skips all {corpus.context_length} positions "
                             "of a context", "lower it below corpus.context_length")  # fmt: skip
    if cache.positions_per_context is not None and cache.positions_per_context > storable:
        raise UserInputError("cache.positions_per_context", f"{cache.positions_per_context} asked but a context "
                             f"of {corpus.context_length} tokens holds {storable} storable positions (skip_first "
                             f"{cache.skip_first})", f"use at most {storable}, or null to store all")  # fmt: skip


class CacheRecipeBase(StrictModel):
    """What every recipe that caches the target's residual stream holds: the store, the corpus and the cache,
    checked together. Its subclasses add the target under their own name (`model`, `target`), the name their
    recipes and hashes have always used."""

    home: str | None = Field(None, description="Store root; null uses $SELFEXPLAIN_HOME or ./.selfexplain.")
    corpus: CorpusConfig = Field(
        default_factory=CorpusConfig, description="Text the target reads; its activations are cached."
    )
    cache: CacheConfig = Field(
        default_factory=CacheConfig, description="Layers and positions of the residual stream cached."
    )

    @model_validator(mode="after")
    def _positions_fit(self) -> Self:
        check_positions(self.corpus, self.cache)
        return self


class CacheRecipe(CacheRecipeBase):
    """Recipe of the cache-activations flow: run `model` over `corpus` and store the residual stream."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="The target model.")


class CachedRecipe(CacheRecipeBase):
    """What the recipes that start from the target's activation cache share: store, target, corpus, cache."""

    target: ModelConfig = Field(default_factory=ModelConfig, description="The frozen target model.")

    def cache_recipe(self) -> CacheRecipe:
        """The cache-activations recipe the flow runs first (same store, model, corpus, cache)."""
        return CacheRecipe(home=self.home, model=self.target, corpus=self.corpus, cache=self.cache)


def _user_path(data: Any, loc: tuple[Any, ...], missing: bool) -> str:
    """The dotted path of an error's location as the user wrote it: pydantic's union-member tags (`int`,
    `literal[...]`) are not keys of the input and are left out."""
    parts, node = [], data
    for i, seg in enumerate(loc):
        in_dict = isinstance(node, dict) and seg in node
        in_list = isinstance(node, list) and isinstance(seg, int) and seg < len(node)
        if in_dict or in_list:
            parts.append(seg)
            node = node[seg]
        elif missing and i == len(loc) - 1:
            parts.append(seg)
    return ".".join(one_line(str(p), 60) for p in parts) or "(top level)"


def _one_line(err: ValidationError, data: dict[str, Any]) -> UserInputError:
    """The first pydantic error as one line naming the field (as written in the recipe) and the fix. A model
    validator's UserInputError names its field relative to the model it checks; it keeps its problem and fix."""
    e = err.errors()[0]
    cause = e.get("ctx", {}).get("error")
    if e["type"] == "value_error" and isinstance(cause, UserInputError):
        at = _user_path(data, e["loc"], False)
        return UserInputError(f"recipe field '{cause.field if at == '(top level)' else at + '.' + cause.field}'",
                              cause.problem, cause.fix)  # fmt: skip
    field = "recipe field '" + _user_path(data, e["loc"], e["type"] == "missing") + "'"
    if e["type"] == "extra_forbidden":
        return UserInputError(
            field, "unknown key", "remove it or correct its spelling (`selfexplain recipe <flow>` lists the keys)"
        )
    msg = str(e.get("ctx", {}).get("error", e["msg"])) if e["type"] == "value_error" else e["msg"]  # no "Value error, "
    return UserInputError(field, msg[:1].lower() + msg[1:], f"give a valid value (got {short_repr(e.get('input'))})")


MAX_YAML_VALUES = 10_000  # a recipe holds a few hundred; more is an alias bomb (or not a recipe)


class RecipeYAMLError(yaml.constructor.ConstructorError):
    """Valid YAML that a recipe may not hold; `fix` says what to write instead."""

    def __init__(self, problem: str, mark: yaml.Mark | None, fix: str) -> None:
        super().__init__(None, None, problem, mark)
        self.fix = fix


class RecipeLoader(yaml.SafeLoader):
    """yaml.safe_load, stricter where PyYAML is silent: a key given twice (PyYAML keeps the last), a key that
    is not a name (null, a number, ''), a tag such as !!python/object, and aliases that expand past
    MAX_YAML_VALUES values (a 'billion laughs' bomb) or into themselves are errors."""

    def compose_document(self) -> yaml.Node | None:
        node = super().compose_document()
        if node is not None:
            _expanded_size(node, {}, set())
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` merges, and the keys written beside it override: not duplicates
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str) or not key:
                raise RecipeYAMLError(f"the key {short_repr(key)} is not a name", key_node.start_mark,
                                      "keys are section and field names (`selfexplain recipe <flow>` lists them)")  # fmt: skip
            if key in seen:
                raise RecipeYAMLError(f"the key {short_repr(key)} is given twice (first at line "
                                      f"{seen[key].start_mark.line + 1})", key_node.start_mark, "give each key once")  # fmt: skip
            seen[key] = key_node
        return super().construct_mapping(node, deep)

    def construct_undefined(self, node: yaml.Node) -> Any:
        tag = node.tag.replace("tag:yaml.org,2002:", "!!")
        raise RecipeYAMLError(f"the tag {short_repr(tag)} is not allowed", node.start_mark,
                              "write plain YAML values (recipes hold no tags)")  # fmt: skip


RecipeLoader.add_constructor(None, RecipeLoader.construct_undefined)


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_: set[int]) -> int:
    """Values `node` stands for once every alias is written out (counted without writing them out)."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_:
        raise RecipeYAMLError("an alias refers to the value that holds it", node.start_mark, "remove that alias")
    open_.add(id(node))
    children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else node.value
    size = 1 + (sum(_expanded_size(c, sizes, open_) for c in children) if isinstance(node, yaml.CollectionNode) else 0)
    open_.discard(id(node))
    if size > MAX_YAML_VALUES:
        raise RecipeYAMLError(f"its aliases expand to more than {MAX_YAML_VALUES} values", node.start_mark,
                              "write the values out, with fewer aliases")  # fmt: skip
    sizes[id(node)] = size
    return size


def parse_yaml(text: str, field: str, what: str) -> Any:
    """`text` read with RecipeLoader; any problem is a UserInputError of `field` naming `what` and the line."""
    try:
        return yaml.load(text, Loader=RecipeLoader)  # a SafeLoader: no Python objects
    except RecipeYAMLError as exc:
        line = f" at line {exc.problem_mark.line + 1}" if exc.problem_mark else ""
        raise UserInputError(field, f"{what}{line}: {exc.problem}", exc.fix) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise UserInputError(field, f"{what} is not valid YAML{line}: {problem}", "fix the YAML syntax") from None
    except RecursionError:
        raise UserInputError(field, f"{what} nests too deeply", "write a flatter recipe") from None


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set data['a']['b'] = value for dotted='a.b', creating dicts on the way."""
    *parents, leaf = dotted.split(".")
    if not all(p.strip() for p in [*parents, leaf]):
        raise UserInputError("--set", f"{dotted!r} has an empty key", "write --set section.key=value")
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
        if p.is_dir():
            raise UserInputError("--config", f"{str(p)!r} is a folder, not a recipe file", "pass a YAML file")
        if not p.is_file():
            raise UserInputError("--config", f"recipe file {str(p)!r} not found", "pass an existing YAML file")
        try:
            text = p.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            raise UserInputError("--config", f"{p} is not UTF-8 text (byte {exc.start})",
                                 "save the recipe as UTF-8") from None  # fmt: skip
        except OSError as exc:
            raise UserInputError("--config", f"{p} cannot be read ({exc.strerror})", "check its permissions") from None
        loaded = parse_yaml(text, "--config", str(p))
        if loaded is not None and not isinstance(loaded, dict):
            raise UserInputError("--config", f"{p} must hold a mapping at the top", "write key: value pairs")
        data = loaded or {}
    for item in overrides or []:
        if "=" not in item:
            raise UserInputError("--set", f"{item!r} has no '='", "write --set section.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        set_dotted(data, key, parse_yaml(raw, f"--set {key}", f"the value {short_repr(raw)}"))
    return as_recipe(kind, data)


R = TypeVar("R", bound=StrictModel)


def as_recipe(kind: type[R], value: R | dict[str, Any]) -> R:
    """`value` validated as a `kind` recipe, a mistake as one line (`_one_line`). A flow's recipe parameter goes
    through here, not through Prefect's parameter validation (its flows say validate_parameters=False): a run
    started from a deployment passes the form's JSON, and a cross-field error the server's schema cannot see
    (n_exemplars below min_exemplars) then fails the run with the line the CLI prints, not Prefect's report."""
    if isinstance(value, kind):
        return value
    try:
        return kind.model_validate(value)
    except ValidationError as err:
        raise _one_line(err, value if isinstance(value, dict) else {}) from None
