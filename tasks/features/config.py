"""Configs of task A, feature descriptions: SAE ground truth, its labels, the evaluation, the features recipe,
and the bootstrapping loop's recipe."""

from typing import Literal

from pydantic import Field, model_validator

from storage.errors import UserInputError
from tasks.common.config import MAX_BATCH, MAX_ITEMS, MAX_SEED, SEED, CachedRecipe, StrictModel, count_cap
from tasks.explainer.config import ROTATED_BASIS_ROLES, ExplainerConfig, other_explainer, self_explainer


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


class FeatureEvalConfig(StrictModel):
    """What the features flow measures."""

    n_train: int | None = count_cap("Cap on training features (all layers)")
    test_per_layer: int = Field(50, gt=0, le=MAX_ITEMS, description="Held-out features per layer (split by feature).")
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
    prompt_omissions: list[Literal["no_activation", "no_layer"]] = Field(
        [],
        json_schema_extra={"hashed_as": "prompt_ablations"},  # renamed: results keep their keys
        description="Explainers retrained with one part of every template removed, each evaluated as its own "
        "method (paper §3.8): no_activation drops the placeholder (no vector reaches the explainer), no_layer "
        "drops the layer number.",
    )
    omission_roles: list[str] = Field(
        ["self"],
        description="Roles that get the prompt-omission explainers.",
        json_schema_extra={"hashed_as": "ablation_roles"},  # renamed: results keep their keys
    )
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


class FeaturesRecipe(CachedRecipe):
    """Recipe of the features flow: SAE ground truth, labels, explainers, baselines, evaluation."""

    sae: SAETrainConfig = Field(default_factory=SAETrainConfig, description="SAE training or loading.")
    labels: LabelConfig = Field(default_factory=LabelConfig, description="Ground-truth labeler.")
    explainers: dict[str, ExplainerConfig] = Field(
        default_factory=lambda: {"self": self_explainer(), "other": other_explainer()},
        description="Trained explainers by role; 'self' should start from the target's weights.",
    )
    eval: FeatureEvalConfig = Field(default_factory=FeatureEvalConfig, description="Evaluation settings.")


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
