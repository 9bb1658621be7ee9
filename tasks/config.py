"""Typed configs for every stage. Each field's description is the CLI help and the Prefect UI form label.

Recipes (YAML under recipes/) are validated against these models; an unknown key is an error, never ignored.
"""

import functools
import types
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

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
        "about 2.3M SmolLM2 tokens, on every install), or a path: a .txt/.jsonl/.parquet file, a folder of them, or a datasets save_to_disk folder.",
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


class CacheRecipe(StrictModel):
    """Recipe of the cache-activations flow: run `model` over `corpus` and store the residual stream."""

    home: str | None = Field(None, description="Store root; null uses $SELFEXPLAIN_HOME or ./.selfexplain.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The target model.")
    corpus: CorpusConfig = Field(default_factory=CorpusConfig, description="The text it reads.")
    cache: CacheConfig = Field(default_factory=CacheConfig, description="What is recorded.")

    @model_validator(mode="after")
    def _positions_fit(self) -> "CacheRecipe":
        check_positions(self.corpus, self.cache)
        return self


class SAETrainConfig(StrictModel):
    """How the SAE ground truth is obtained: trained here with sae-lens on the cache, or loaded."""

    load_from: str | None = Field(
        None,
        description="Folder of pretrained sae-lens SAEs, one sub-folder per layer named 'layer_<l>' "
        "(cfg.json + sae_weights.safetensors); null trains them here.",
    )
    import_archive: str | None = Field(
        None,
        description="Instead of SAEs and labels made here: the paper's released features archive (a folder with "
        "features/layer_<l>.pkl, a [d x n_features] matrix per cached layer, and explanations/{train,test}_"
        "explanations.pkl with {train,test}_layer_feature_idxs.pkl), read by a restricted unpickler; exemplars "
        "are mined from this cache by each direction.",
    )
    expansion: int = Field(8, gt=0, le=4096, description="d_sae = expansion x d_model.")
    k: int = Field(32, gt=0, le=MAX_BATCH, description="Active features per token (TopK SAE).")
    lr: float = Field(4e-4, gt=0, description="Adam learning rate.")
    batch_tokens: int = Field(4096, gt=0, le=16 * MAX_BATCH, description="Activation vectors per SAE training step.")
    epochs: int = Field(3, gt=0, le=10_000, description="Passes over the cached activations of each layer.")
    seed: int = Field(0, **SEED, description="Seed of initialisation and shuffling.")
    n_exemplars: int = Field(
        20, gt=0, le=MAX_BATCH, description="Top-activating contexts kept per feature (the paper's top-20)."
    )
    min_exemplars: int = Field(
        10, gt=0, le=MAX_BATCH, description="Features with fewer distinct activating contexts are not labelled or used."
    )

    @model_validator(mode="after")
    def _enough_exemplars_kept(self) -> "SAETrainConfig":
        if self.n_exemplars < self.min_exemplars:  # no feature could reach min_exemplars: nothing to label
            raise UserInputError("n_exemplars", f"{self.n_exemplars} is fewer than min_exemplars "
                                 f"({self.min_exemplars}), so no feature would be kept",
                                 f"keep at least {self.min_exemplars} exemplars, or lower min_exemplars")  # fmt: skip
        if self.load_from and self.import_archive:
            raise UserInputError("import_archive", "given with load_from", "give one source of features, or neither")
        return self


class LabelConfig(StrictModel):
    """Who writes the ground-truth descriptions of features."""

    labeler: Literal["tokens", "llm"] = Field(
        "tokens",
        description="'tokens': deterministic, the token strings that most specifically activate the feature; "
        "'llm': a prompted LM over the top exemplars.",
    )
    max_tokens: int = Field(3, gt=0, le=1000, description="tokens labeler: at most this many token strings per label.")
    llm_model: str | None = Field(
        None, description="llm labeler: a registry name or HF folder, or 'openai:<model>' for an endpoint."
    )
    llm_base_url: str | None = Field(
        None, description="llm labeler: OpenAI-compatible base URL (key from $OPENAI_API_KEY)."
    )


Injection = Literal["embedding", "residual", "early_add"]  # where the vector enters the explainer


class ExplainerConfig(StrictModel):
    """The continuous-token explainer and how it is trained."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="Explainer initialisation.")
    format: Literal["auto", "chat", "base"] = Field(
        "auto",
        description="Prompt format: chat template or the paper's raw base templates; auto picks chat "
        "when the tokenizer has a chat template.",
    )
    projection: Literal["auto", "always", "fitted"] = Field(
        "auto",
        description="Per-target-layer projection Π_ℓ: 'auto' a random one only when widths differ, 'always' a "
        "random one whatever the widths, 'fitted' one fitted without labels by ridge regression from the "
        "target's cached residuals to the explainer's embeddings of the same tokens, then trained on "
        "(tasks/projection.py; injection 'embedding', tasks with an activation cache: features, calibrate).",
    )
    fit_ridge: float = Field(
        0.01, gt=0, description="projection 'fitted': ridge penalty, relative to the mean variance of a coordinate."
    )
    fit_rows: int = Field(
        20_000, gt=1, le=MAX_ITEMS, description="projection 'fitted': cached positions fitted on, per layer."
    )
    injection: Injection = Field(
        "embedding",
        description="Where u = Π_ℓ v enters the explainer. 'embedding': replaces the placeholder's input "
        "embedding (the paper). 'residual': replaces the residual stream at the placeholder after block ℓ (for "
        "an explainer of another depth, the block at the same relative depth), where the target's own upper "
        "layers read a layer-ℓ state. 'early_add': adds unit(u) x |h| x inject_scale to the residual h at the "
        "placeholder after block inject_layer (Activation Oracles), so u arrives at the norm the stream has.",
    )
    inject_layer: int = Field(
        1, ge=0, le=MAX_LAYERS, description="early_add only: the explainer block after which u is added."
    )
    inject_scale: float = Field(
        1.0,
        gt=0,
        description="early_add: the added vector's norm relative to |h|; vector_norm 'layer_mean': the norm of "
        "the vector's part in units of σ_ℓ, the median |h − μ_ℓ| of the target's layer-ℓ residuals.",
    )
    vector_norm: Literal["match", "raw", "layer_mean"] = Field(
        "match",
        description="'match': rescale u to the norm the explainer carries where it enters (the mean token-"
        "embedding norm under 'embedding', the median residual norm of the prompt at that block under "
        "'residual'), so vectors of any source (unit SAE directions, raw activations) arrive at its scale; "
        "'raw': inject as given (a target residual written raw under 'residual' is the target's own state); "
        "'layer_mean' (injection 'residual', an explainer of the target's width; not ablation, which has no "
        "vector): write μ_ℓ + inject_scale x σ_ℓ x unit(v − c_ℓ), a state on the layer's own manifold whose "
        "centred part is v (μ_ℓ, σ_ℓ from the activation cache, or for patching from the train split's "
        "chunk-mean vectors; c_ℓ = μ_ℓ for residual inputs, 0 for directions), where a bare direction lacks "
        "the mean every real residual carries. 'early_add' always matches |h|.",
    )
    finetune: Literal["lora", "full"] = Field("lora", description="LoRA via peft, or full fine-tuning.")
    lora_r: int = Field(16, gt=0, le=MAX_BATCH, description="LoRA rank.")
    lora_alpha: int = Field(32, gt=0, le=MAX_BATCH, description="LoRA alpha.")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    lr: float = Field(2e-4, gt=0, description="AdamW learning rate (constant, no warm-up).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    batch_size: int = Field(16, gt=0, le=MAX_BATCH, description="Examples per step.")
    epochs: int = Field(
        3, gt=0, le=10_000, description="Passes over the training set: the step budget before min_steps and max_steps."
    )
    min_steps: int = Field(
        0,
        ge=0,
        le=MAX_ITEMS,
        description="Floor on optimizer steps: a small training set gets more epochs, and early stopping waits "
        "for it (a data-efficiency point that is under-trained measures the step count, not the data).",
    )
    max_steps: int | None = Field(None, gt=0, le=MAX_ITEMS, description="Cap on optimizer steps; null: no cap.")
    eval_every: int | None = Field(
        None, gt=0, le=MAX_ITEMS, description="Steps between validations (and resume points); null: once per epoch."
    )
    patience: int = Field(
        0,
        ge=0,
        le=MAX_ITEMS,
        description="Validations in a row without a new best that stop training (after min_steps).",
    )
    proj_lr: float | None = Field(
        None, gt=0, description="Learning rate of the projections Π_ℓ; null: lr. New, so often worth more than lr."
    )
    val_fraction: float = Field(0.1, ge=0, lt=1, description="Training examples held out for early stopping.")
    max_new_tokens: int = Field(
        20, gt=0, le=MAX_BATCH, description="Greedy decoding length (the paper's 20 for features)."
    )
    seed: int = Field(0, **SEED, description="Seed of shuffling, template sampling and initialisation.")
    eval_batch_size: int = Field(32, gt=0, le=MAX_BATCH, description="Prompts per batched greedy decode.")

    @model_validator(mode="after")
    def _floor_under_cap(self) -> "ExplainerConfig":
        if self.max_steps is not None and self.max_steps < self.min_steps:  # the cap would undercut the floor
            raise UserInputError("max_steps", f"{self.max_steps} is below min_steps ({self.min_steps}), so the "
                                 "step floor would not hold", f"raise max_steps to {self.min_steps} or more, or "
                                 "lower min_steps")  # fmt: skip
        return self


class PatchingConfig(StrictModel):
    """Activation-patching ground truth (task B)."""

    facts: str | None = Field(
        None, description="Fact file: null for the built-in fact base, a facts .jsonl, or CounterFact .json."
    )
    n_pairs: int = Field(120, gt=0, le=MAX_ITEMS, description="Counterfactual pairs (x, x') to sweep.")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="Share of subjects (hence pairs) held out as test.")
    n_chunks: int = Field(4, gt=0, le=MAX_LAYERS, description="Contiguous layer chunks patched together.")
    prompt_format: Literal["fewshot", "zeroshot"] = Field(
        "fewshot",
        description="'zeroshot': the paper's prompt; 'fewshot': one worked example from another relation and "
        "'Answer:' pre-filled, so that small targets answer with an offered option.",
    )
    positions_per_pair: int | None = Field(
        24,
        gt=0,
        le=MAX_LENGTH,
        description="Positions swept per pair: every typed position plus sampled others; null = all.",
    )
    batch_size: int = Field(32, gt=0, le=MAX_BATCH, description="Patched copies of x per forward pass.")
    pairs_per_shard: int = Field(10, gt=0, le=MAX_BATCH, description="Pairs per sweep shard (the unit of resume).")
    cell_cap: int = Field(
        60, gt=0, le=MAX_ITEMS, description="Balancing: at most this many rows per (token type, chunk, changed)."
    )
    seed: int = Field(0, **SEED, description="Seed of pairing, options, positions and balancing.")
    import_train: str | None = Field(
        None,
        description="Instead of sweeping: a public act_patch dataset (.parquet/.json/.jsonl or save_to_disk "
        "folder) imported as the train split; needs import_test too.",
    )
    import_test: str | None = Field(None, description="The public act_patch test split to import with import_train.")


AnswerFormat = Literal["letter", "calibrated_letter", "option_text"]


class AblationConfig(StrictModel):
    """Input-ablation ground truth (task C): does removing a hint change the answer?"""

    questions: str | None = Field(
        None, description="Question file: null for the built-in bank, or an MMLU-format .jsonl/.parquet."
    )
    n_questions: int | None = Field(
        None, gt=0, le=MAX_ITEMS, description="Use at most this many questions; null uses all."
    )
    answer_format: AnswerFormat = Field(
        "calibrated_letter",
        description="How the target's answer is read: 'letter' (argmax over the four letter tokens after "
        "'Answer:', the paper's; SmolLM2-135M says C to 99.5% of questions), 'calibrated_letter' (the same minus "
        "the target's letter prior, estimated on the train questions without a hint) or 'option_text' (the "
        "option whose text is likeliest after 'Answer:'); measured in bench/ablation_formats.py.",
    )
    hint: str = Field("Hint: The answer is {letter}", description="Hint wording; {letter} is drawn from A-D.")
    hints_per_question: int = Field(
        1, ge=1, le=4, description="Rows per question, each with a different random hint letter (same split)."
    )
    test_fraction: float = Field(0.2, gt=0, lt=1, description="Share of questions held out as test.")
    batch_size: int = Field(16, gt=0, le=MAX_BATCH, description="Prompts per forward pass.")
    seed: int = Field(0, **SEED, description="Seed of hint letters and the split.")
    import_train: str | None = Field(
        None,
        description="Instead of asking the target: a public input_ablation dataset (.parquet/.json/.jsonl or "
        "save_to_disk folder) imported as the train split; needs import_test too.",
    )
    import_test: str | None = Field(
        None, description="The public input_ablation test split to import with import_train."
    )


ROTATED_BASIS_ROLES = (
    "Roles that also get a rotated-basis explainer (method rotated_basis): trained and evaluated as usual on Qv "
    "for a fixed random orthogonal Q (seeded by the explainer's seed). Under native-layer or early-add injection "
    "the explainer's own basis becomes foreign, which separates privileged access from basis compatibility."
)


class FeatureEvalConfig(StrictModel):
    """What the features flow measures."""

    test_per_layer: int = Field(50, gt=0, le=MAX_ITEMS, description="Held-out features per layer (split by feature).")
    n_train: int | None = Field(
        None, gt=0, le=MAX_ITEMS, description="Cap on training features (all layers); null uses all."
    )
    ood_act_per_layer: int = Field(
        25,
        ge=0,
        le=MAX_ITEMS,
        description="ACT out-of-distribution vectors per layer (residual vectors at sampled tokens).",
    )
    selfie_scales: list[float] = Field(
        [1, 5, 10, 25, 50],
        min_length=1,
        description="SelfIE: scales of the unit vector. Method selfie uses the one scale that scores best on "
        "selfie_select training features; selfie_best_of_scales takes each test item's best (an upper bound).",
    )
    selfie_select: int = Field(
        40,
        gt=0,
        le=MAX_ITEMS,
        description="SelfIE: training features (a seeded sample) on which its one scale is chosen.",
    )
    selfie_max_new_tokens: int = Field(25, gt=0, le=MAX_BATCH, description="SelfIE decoding length (the paper's 25).")
    embedding_similarity: bool = Field(
        True, description="Also score cosine similarity of sentence embeddings against the gold label."
    )
    simulator: str = Field(
        "lexical",
        description="'lexical' (deterministic, fits the tokens labeler) or a model (registry name or HF folder) "
        "used as a prompted LM simulator with expected value over 0-10 bins (slow on CPU).",
    )
    judge: str | None = Field(
        None,
        description="LM judge of predicted vs gold label with the paper's 1-5 rubric mapped to (r-1)/4: a "
        "registry name or HF folder, or 'openai:<model>'; null skips it.",
    )
    judge_base_url: str | None = Field(None, description="OpenAI-compatible base URL of the judge.")
    delta_act_per_layer: int = Field(
        10,
        ge=0,
        le=MAX_ITEMS,
        description="ΔACT vectors per layer: h(x) - h(x') at the last token of counterfactual prompt pairs.",
    )
    selfie: bool = Field(
        True, description="Score the untrained SelfIE baseline (independent of n_train: experiments run it once)."
    )
    prompt_ablations: list[Literal["no_activation", "no_layer"]] = Field(
        [],
        description="Explainers retrained with one part of every template removed, each evaluated as its own "
        "method (paper §3.8): no_activation drops the placeholder (no vector reaches the explainer), no_layer "
        "drops the layer number.",
    )
    ablation_roles: list[str] = Field(["self"], description="Roles that get the prompt-ablation explainers.")
    rotated_basis_roles: list[str] = Field([], description=ROTATED_BASIS_ROLES)
    vector_controls: bool = Field(
        True,
        description="Also decode each trained explainer with v = 0 (method zero_vector) and with the vector of "
        "another held-out item of the same layer and split (shuffled_vector): does it read v at all?",
    )
    alignment_contexts: int = Field(
        32,
        ge=0,
        le=MAX_ITEMS,
        description="Privileged-access diagnostics (paper §3.8, Table 4): compare each trained explainer's "
        "hidden states with the target's on this many exemplar contexts of held-out features (0 skips them).",
    )


def _self_explainer(**kw: Any) -> "ExplainerConfig":
    return ExplainerConfig(**kw)


def _other_explainer(**kw: Any) -> "ExplainerConfig":
    return ExplainerConfig(model=ModelConfig(name="gemma3-270m"), format="base", **kw)


def _outcome_explainers() -> dict[str, "ExplainerConfig"]:
    # Answers run to ~18 tokens and the untrained baseline may ramble: decode 32.
    return {"self": _self_explainer(max_new_tokens=32), "other": _other_explainer(max_new_tokens=32)}


class OutcomeEvalConfig(StrictModel):
    """What the patching and ablation flows train and measure (paper §4.5-4.7, §5.3)."""

    n_train: int | None = Field(
        None,
        gt=0,
        le=MAX_ITEMS,
        description="Cap on training rows (a seeded sample of the train split); null uses all.",
    )
    n_test: int | None = Field(
        None, gt=0, le=MAX_ITEMS, description="Cap on test rows (a seeded sample of the test split); null uses all."
    )
    max_prompt_tokens: int = Field(
        500,
        gt=0,
        le=MAX_LENGTH,
        description="Training rows whose explainer prompt is longer are skipped (the paper's 500).",
    )
    prompt_ablations: list[Literal["no_activation", "no_layer", "no_token"]] = Field(
        ["no_activation"],
        description="Patching only: explainers retrained with one part of every template removed (the paper's "
        "'- activation', '- layer', '- token'), each evaluated as its own method.",
    )
    ablation_roles: list[str] = Field(["self"], description="Roles that get the prompt-ablation explainers.")
    rotated_basis_roles: list[str] = Field([], description="Patching only. " + ROTATED_BASIS_ROLES)
    vector_controls: bool = Field(
        True,
        description="Patching only: also decode each trained explainer with v = 0 (method zero_vector) and with "
        "the vector of another test row of the same chunk (shuffled_vector): does it read v at all?",
    )
    zero_shot: bool = Field(True, description="Also score each explainer's untrained model with the paper's prompt.")
    seed: int = Field(0, **SEED, description="Seed of the train/test samples and of template choice at evaluation.")


class _CachedRecipe(StrictModel):
    """What the recipes that start from the target's activation cache share: store, target, corpus, cache."""

    home: str | None = Field(None, description="Store root; null uses $SELFEXPLAIN_HOME or ./.selfexplain.")
    target: ModelConfig = Field(default_factory=ModelConfig, description="The frozen target model.")
    corpus: CorpusConfig = Field(default_factory=CorpusConfig, description="Text whose activations are cached.")
    cache: CacheConfig = Field(default_factory=CacheConfig, description="Layers and positions cached.")

    @model_validator(mode="after")
    def _positions_fit(self) -> "_CachedRecipe":
        check_positions(self.corpus, self.cache)
        return self

    def cache_recipe(self) -> CacheRecipe:
        """The cache-activations recipe the flow runs first (same store, model, corpus, cache)."""
        return CacheRecipe(home=self.home, model=self.target, corpus=self.corpus, cache=self.cache)


class FeaturesRecipe(_CachedRecipe):
    """Recipe of the features flow: SAE ground truth, labels, explainers, baselines, evaluation."""

    sae: SAETrainConfig = Field(default_factory=SAETrainConfig, description="SAE training or loading.")
    labels: LabelConfig = Field(default_factory=LabelConfig, description="Ground-truth labeler.")
    explainers: dict[str, ExplainerConfig] = Field(
        default_factory=lambda: {"self": _self_explainer(), "other": _other_explainer()},
        description="Trained explainers by role; 'self' should start from the target's weights.",
    )
    eval: FeatureEvalConfig = Field(default_factory=FeatureEvalConfig, description="Evaluation settings.")


class _OutcomeRecipe(StrictModel):
    """What the patching and ablation recipes share: store, target, explainers."""

    home: str | None = Field(None, description="Store root; null uses $SELFEXPLAIN_HOME or ./.selfexplain.")
    target: ModelConfig = Field(default_factory=ModelConfig, description="The frozen target model.")
    explainers: dict[str, ExplainerConfig] = Field(
        default_factory=_outcome_explainers,
        description="Trained explainers by role; 'self' should start from the target's weights.",
    )


class PatchingRecipe(_OutcomeRecipe):
    """Recipe of the patching flow: activation-patching ground truth, explainers, baselines, evaluation."""

    patching: PatchingConfig = Field(default_factory=PatchingConfig, description="Pairs, chunks, sweep, balance.")
    eval: OutcomeEvalConfig = Field(default_factory=OutcomeEvalConfig, description="Training caps and baselines.")


class AblationEvalConfig(OutcomeEvalConfig):
    """The ablation flow's evaluation: its questions carry no vector, so no prompt ablation by default (a
    recipe that sets any other eval key must not inherit patching's)."""

    prompt_ablations: list[Literal["no_activation", "no_layer", "no_token"]] = Field(
        [], description="Must stay []: ablation questions carry no vector, layer or token string."
    )


class AblationRecipe(_OutcomeRecipe):
    """Recipe of the ablation flow: hint-removal ground truth, explainers, baselines, evaluation."""

    ablation: AblationConfig = Field(default_factory=AblationConfig, description="Questions and hint.")
    eval: AblationEvalConfig = Field(default_factory=AblationEvalConfig, description="Training caps and baselines.")


class GridConfig(StrictModel):
    """The experiment grid: every task x n_train x seed cell trains and scores every explainer."""

    n_train: list[Annotated[int, Field(le=MAX_ITEMS)]] = Field(
        [64, 128, 256, 512, 1024], min_length=1, description="Training-set sizes (a log grid; nested subsets)."
    )
    seeds: list[Annotated[int, Field(**SEED)]] = Field(
        [0], min_length=1, description="Explainer seeds (initialisation, shuffling, templates) per size."
    )
    controls: Literal["largest", "every"] = Field(
        "largest",
        description="Cells that run the n_train-dependent controls (the v = 0 decode and the prompt-ablation "
        "explainers of eval.prompt_ablations): 'largest' only the largest n_train of each seed (the paper "
        "reports them at full size; they are the costliest part of a grid), 'every' every cell.",
    )

    @field_validator("n_train")
    @classmethod
    def _positive_sizes(cls, v: list[int]) -> list[int]:
        if any(n <= 0 for n in v):
            raise ValueError("every n_train must be positive")
        return sorted(v)  # repeats are refused by StrictModel


class RunnerConfig(StrictModel):
    """Where the experiment's grid cells run. Cells are independent (each reads the cached ground truth and
    writes its own datasets), so they can fan out. Not part of any cache key: results do not depend on it."""

    kind: Literal["local", "dask"] = Field(
        "local",
        description="local: cells run one after another in the flow's process. dask: each cell is a task on a "
        "Dask cluster (prefect-dask), so cells run on several workers at once.",
    )
    address: str | None = Field(
        None,
        description="With kind dask: the scheduler of an existing Dask cluster (e.g. tcp://head:8786, one worker "
        "per GPU machine, started with `dask worker --nthreads 1`). Null starts a local cluster.",
    )
    n_workers: int = Field(
        2,
        ge=1,
        le=4096,
        description="With kind dask and no address: worker processes of the local cluster (one thread each). "
        "Model-holding tasks on one machine still take its single `gpu` slot one at a time.",
    )


class ExperimentRecipe(StrictModel):
    """Recipe of the experiment flow: the self-vs-other matrix and data-efficiency curves over the three tasks.
    Each task section is that task's own recipe; its `home` and `target` are replaced by the experiment's."""

    home: str | None = Field(None, description="Store root; null uses $SELFEXPLAIN_HOME or ./.selfexplain.")
    target: ModelConfig = Field(default_factory=ModelConfig, description="The frozen target model of every task.")
    tasks: list[Literal["features", "patching", "ablation"]] = Field(
        ["features", "patching", "ablation"], min_length=1, description="Tasks in the grid."
    )
    grid: GridConfig = Field(default_factory=GridConfig, description="Training sizes and seeds.")
    runner: RunnerConfig = Field(
        default_factory=RunnerConfig,
        description="Where the grid cells run (in process, or fanned out on Dask).",
        json_schema_extra=RESOURCE_ONLY,
    )
    features: FeaturesRecipe = Field(default_factory=FeaturesRecipe, description="Task A settings.")
    patching: PatchingRecipe = Field(default_factory=PatchingRecipe, description="Task B settings.")
    ablation: AblationRecipe = Field(default_factory=AblationRecipe, description="Task C settings.")

    def task_recipe(self, task: str) -> "FeaturesRecipe | PatchingRecipe | AblationRecipe":
        """The task's recipe with the experiment's store and target."""
        return getattr(self, task).model_copy(update={"home": self.home, "target": self.target})


class CalibrationConfig(StrictModel):
    """The readout calibration: the target's residual of a token t at layer ℓ -> `the token "t"`."""

    injections: list[Injection | Literal["embedding_fitted"]] = Field(
        ["embedding", "embedding_fitted", "residual", "early_add"],
        min_length=1,
        description="Injection modes measured, each a trained explainer of its own (explainer.injection is "
        "replaced by each in turn); 'embedding_fitted' is injection 'embedding' with projection 'fitted' (a "
        "ridge Π into the embedding space, fitted on cached residuals of training token types only).",
    )
    n_train: int = Field(
        2400, gt=0, le=MAX_ITEMS, description="Training examples, spread evenly over the cached layers."
    )
    n_test: int = Field(150, gt=0, le=MAX_ITEMS, description="Held-out test tokens per layer (distinct token types).")
    split: Literal["types", "occurrences"] = Field(
        "types",
        description="'types': held-out token types, never trained on (naming a token it never learned to name "
        "is what reading v means); 'occurrences': held-out occurrences of trained types (reading v to tell "
        "known tokens apart, for models too small to generalise).",
    )
    test_fraction: float = Field(
        0.2, gt=0, lt=1, description="split 'types': share of token types held out, none ever trained on."
    )
    max_token_chars: int = Field(
        24, gt=0, le=MAX_LENGTH, description="Longest token text that is named (longer ones are skipped)."
    )
    seed: int = Field(0, **SEED, description="Seed of the type split, the sampling and the shuffled-v control.")


class CalibrateRecipe(_CachedRecipe):
    """Recipe of the calibrate flow: can the explainer read a residual at all, under each injection mode?"""

    corpus: CorpusConfig = Field(
        default_factory=lambda: CorpusConfig(n_tokens=50_000), description="Text whose residuals are named."
    )
    cache: CacheConfig = Field(
        default_factory=lambda: CacheConfig(layers=[3, 15]), description="Layers (and positions) read."
    )
    explainer: ExplainerConfig = Field(
        default_factory=lambda: _self_explainer(min_steps=150, max_steps=150, lr=1e-3, max_new_tokens=12),
        description="The explainer (the target's own weights for self-explanation) and its training.",
    )
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig, description="Items and modes.")


class ExplainRecipe(StrictModel):
    """Recipe of the explain flow (and `selfexplain explain`): ask a trained features explainer about a text's
    residual, an SAE feature of its ground truth, or any vector (exactly one of text, feature, vector); or,
    with `counterfactual_text` and `chunk`, ask a trained patching explainer what a patch would do."""

    home: str | None = Field(None, description="Store root; null uses $SELFEXPLAIN_HOME or ./.selfexplain.")
    explainer: str = Field("latest", min_length=1, description="Checkpoint: a key of the `explainers` table (its "
                           "`dataset` column), a checkpoint folder, or 'latest' (the newest features explainer of "
                           "`role` in the store).")  # fmt: skip
    role: str = Field("self", min_length=1, description="With explainer 'latest': the role to pick (self, other).")
    text: str | None = Field(None, max_length=100_000, description="A text the target runs on (as the "
                             "activation cache runs a context); its residual at `layer` and `position` is explained.")  # fmt: skip
    position: Annotated[int, Field(ge=-MAX_LENGTH, lt=MAX_LENGTH)] | Literal["all"] = Field(
        -1, description="Token of `text`: an index (negative counts from the end) or 'all' (one row per token)."
    )
    layer: int | None = Field(None, ge=0, lt=MAX_LAYERS, description="Target layer of the residual (text) or of "
                              "the vector; a layer the explainer was trained on.")  # fmt: skip
    feature: str | None = Field(None, pattern=r"^\d+/\d+$", description="An SAE feature of the explainer's "
                                "ground truth, as LAYER/ID (e.g. 3/117).")  # fmt: skip
    vector: str | None = Field(None, description="A .npy file holding one vector of the target's width (read "
                               "as a direction, like an SAE feature), at `layer`.")  # fmt: skip
    target: str | None = Field(None, description="Target model for `text` (null: the one the checkpoint records).")
    counterfactual_text: str | None = Field(None, max_length=100_000, description="Patching: the text x' whose "
                                            "residual at `counterfactual_position`, averaged over the chunk's "
                                            "layers, replaces x's (`text`) at `position` in every chunk layer.")  # fmt: skip
    counterfactual_position: Annotated[int, Field(ge=-MAX_LENGTH, lt=MAX_LENGTH)] | None = Field(
        None,
        description="Patching: the token of x' (null: the same index as `position`; a negative index "
        "aligns the two texts' ends).",
    )
    chunk: int | None = Field(None, ge=0, lt=MAX_LAYERS, description="Patching: the index of the layer chunk "
                              "patched (the chunks of the explainer's ground truth).")  # fmt: skip
    check: bool = Field(False, description="Patching: also run the patch on the target and show its real outcome.")

    @model_validator(mode="after")
    def _one_question(self) -> "ExplainRecipe":
        asked = [name for name in ("text", "feature", "vector") if getattr(self, name) is not None]
        if len(asked) != 1:
            raise UserInputError("text", f"{' and '.join(asked) or 'nothing'} to explain",
                                 "give exactly one of text, feature or vector")  # fmt: skip
        patching = self.counterfactual_text is not None
        if patching and self.text is None:
            raise UserInputError("counterfactual_text", "given without text", "give the text x it patches")
        if patching != (self.chunk is not None):
            raise UserInputError("chunk" if patching else "counterfactual_text", "missing",
                                 "a patching question names both counterfactual_text and chunk")  # fmt: skip
        if not patching and (self.check or self.counterfactual_position is not None):
            raise UserInputError("check" if self.check else "counterfactual_position", "only a patching question "
                                 "takes it", "give counterfactual_text and chunk too")  # fmt: skip
        if patching and (self.layer is not None or self.position == "all"):
            raise UserInputError("layer" if self.layer is not None else "position", "a patching question "
                                 "names a chunk and one position", "drop layer; give one position")  # fmt: skip
        if self.layer is None and self.feature is None and not patching:
            raise UserInputError("layer", "missing", "name the target layer of the residual or the vector")
        return self


class BootstrapRecipe(StrictModel):
    """Recipe of the bootstrap flow: a trained features explainer describes the SAE features that have no label
    (auto-interp keeps only those with enough exemplars), and a seeded sample of them is scored, beside the
    auto-interp route run on the same sample, with its cost measured in the same run."""

    home: str | None = Field(None, description="Store root; null uses $SELFEXPLAIN_HOME or ./.selfexplain.")
    explainer: str = Field("latest", min_length=1, description="Checkpoint: a key of the `explainers` table, a "
                           "checkpoint folder, or 'latest' (the newest features explainer of `role`).")  # fmt: skip
    role: str = Field("self", min_length=1, description="With explainer 'latest': the role to pick.")
    held_out: bool = Field(False, description="Also describe the held-out (test) features, whose auto-interp "
                           "labels then sit beside the explainer's in `feature_labels`.")  # fmt: skip
    n_sample: int = Field(50, gt=1, le=100_000, description="Described features scored with the simulator (a "
                          "seeded random sample of those with at least `min_contexts` exemplar contexts).")  # fmt: skip
    min_contexts: int = Field(3, gt=0, le=10_000, description="Exemplar contexts a sampled feature needs (its "
                              "simulator score is a correlation over them).")  # fmt: skip
    shard_size: int = Field(256, gt=0, le=MAX_BATCH, description="Features described per shard: the unit of resume.")
    simulator: str = Field("lexical", description="'lexical' or a model used as a prompted LM simulator, as in "
                           "the features evaluation.")  # fmt: skip
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of the scored sample.")


RECIPES: dict[str, type[StrictModel]] = {
    "calibrate": CalibrateRecipe,
    "cache-activations": CacheRecipe,
    "features": FeaturesRecipe,
    "patching": PatchingRecipe,
    "ablation": AblationRecipe,
    "experiment": ExperimentRecipe,
    "explain": ExplainRecipe,
    "bootstrap": BootstrapRecipe,
}


def check_roles(ev: "FeatureEvalConfig | OutcomeEvalConfig", explainers: dict[str, Any]) -> None:
    """Every role that `eval.ablation_roles` (with prompt ablations asked for) or `eval.rotated_basis_roles`
    names must be a role of `explainers`."""
    for field, roles, used in (("ablation_roles", ev.ablation_roles, bool(ev.prompt_ablations)),
                               ("rotated_basis_roles", ev.rotated_basis_roles, True)):  # fmt: skip
        unknown = [r for r in roles if r not in explainers]
        if unknown and used:
            raise UserInputError(f"eval.{field}", f"{unknown} are not explainer roles",
                                 f"use roles of `explainers`: {sorted(explainers)}")  # fmt: skip


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
