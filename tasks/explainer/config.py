"""Configs of the continuous-token explainer (how it reads v and how it is trained), of the readout calibration
(flow `calibrate`) and of explain on demand (flow `explain`)."""

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from storage.errors import UserInputError
from tasks.common.config import (
    MAX_BATCH,
    MAX_ITEMS,
    MAX_LAYERS,
    MAX_LENGTH,
    SEED,
    CacheConfig,
    CachedRecipe,
    CorpusConfig,
    ModelConfig,
    StrictModel,
)

Injection = Literal["embedding", "residual", "early_add"]  # where the vector enters the explainer


class ExplainerConfig(StrictModel):
    """The continuous-token explainer and how it is trained."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="Explainer initialisation.")
    format: Literal["auto", "chat", "base"] = Field(
        "auto", description="Prompt format: 'chat' template, 'base' (the paper's raw), 'auto' chat if there is one."
    )
    projection: Literal["auto", "always", "fitted"] = Field(
        "auto",
        description="Per-target-layer projection Π_ℓ: 'auto' a random one only when widths differ, 'always' a "
        "random one whatever the widths, 'fitted' one fitted without labels by ridge regression from the "
        "target's cached residuals to the explainer's embeddings of the same tokens, then trained on "
        "(tasks/explainer/projection.py; injection 'embedding'; features and calibrate fit it on the activation "
        "cache, patching on the chunk-mean states of its train prompts).",
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
    readout_steps: int = Field(
        0,
        ge=0,
        le=MAX_ITEMS,
        description="Features only: optimizer steps of a label-free warm-up before training, in which the "
        "explainer names the token under a cached residual of the target (the token t, as calibrate's "
        "readout, asked in the features prompts; token types drawn uniformly, batch_size new items a step), so "
        "it learns to read v before it learns to describe; 0: none. Labelled features (n_train) are unchanged.",
        json_schema_extra={"hashed_unless_default": True},
    )
    proj_lr: float | None = Field(
        None, gt=0, description="Learning rate of the projections Π_ℓ; null: lr. New, so often worth more than lr."
    )
    train_attention: Literal["auto", "sdpa", "eager"] = Field(
        "auto",
        description="Attention kernel of the training steps and validations (decoding keeps the model's own): "
        "'auto' is eager on CPU, where SDPA's backward costs more than eager's batched matmuls on short "
        "sequences (BENCHMARKS.md, training throughput), and the model's own on CUDA.",
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


ROTATED_BASIS_ROLES = (
    "Roles that also get a rotated-basis explainer (method rotated_basis): trained and evaluated as usual on Qv "
    "for a fixed random orthogonal Q (seeded by the explainer's seed). Under native-layer or early-add injection "
    "the explainer's own basis becomes foreign, which separates privileged access from basis compatibility."
)


def self_explainer(**kw: Any) -> "ExplainerConfig":
    return ExplainerConfig(**kw)


def other_explainer(**kw: Any) -> "ExplainerConfig":
    return ExplainerConfig(model=ModelConfig(name="gemma3-270m"), format="base", **kw)


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


class CalibrateRecipe(CachedRecipe):
    """Recipe of the calibrate flow: can the explainer read a residual at all, under each injection mode?"""

    corpus: CorpusConfig = Field(
        default_factory=lambda: CorpusConfig(n_tokens=50_000), description="Text whose residuals are named."
    )
    cache: CacheConfig = Field(
        default_factory=lambda: CacheConfig(layers=[3, 15]), description="Layers (and positions) read."
    )
    explainer: ExplainerConfig = Field(
        default_factory=lambda: self_explainer(min_steps=150, max_steps=150, lr=1e-3, max_new_tokens=12),
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


def check_roles(ev: StrictModel, explainers: dict[str, Any]) -> None:
    """Every role that an evaluation config's (features' or an outcome task's) `eval.omission_roles` (with prompt omissions asked for) or `eval.rotated_basis_roles`
    names must be a role of `explainers`."""
    for field, roles, used in (("omission_roles", ev.omission_roles, bool(ev.prompt_omissions)),
                               ("rotated_basis_roles", ev.rotated_basis_roles, True)):  # fmt: skip
        unknown = [r for r in roles if r not in explainers]
        if unknown and used:
            raise UserInputError(f"eval.{field}", f"{unknown} are not explainer roles",
                                 f"use roles of `explainers`: {sorted(explainers)}")  # fmt: skip
