"""What the two outcome tasks (activation patching, input ablation) share in their recipes: the explainers and
the evaluation settings."""

from typing import Literal

from pydantic import Field

from tasks.common.config import MAX_LENGTH, SEED, ModelConfig, StrictModel, count_cap
from tasks.explainer.config import ROTATED_BASIS_ROLES, ExplainerConfig, other_explainer, self_explainer


def outcome_explainers() -> dict[str, "ExplainerConfig"]:
    # Answers run to ~18 tokens and the untrained baseline may ramble: decode 32.
    return {"self": self_explainer(max_new_tokens=32), "other": other_explainer(max_new_tokens=32)}


class OutcomeEvalConfig(StrictModel):
    """What the patching and ablation flows train and measure (paper §4.5-4.7, §5.3)."""

    n_train: int | None = count_cap("Cap on training rows (a seeded sample of the train split)")
    n_test: int | None = count_cap("Cap on test rows (a seeded sample of the test split)")
    max_prompt_tokens: int = Field(
        500,
        gt=0,
        le=MAX_LENGTH,
        description="Training rows whose explainer prompt is longer are skipped (the paper's 500).",
    )
    prompt_omissions: list[Literal["no_activation", "no_layer", "no_token"]] = Field(
        ["no_activation"],
        json_schema_extra={"hashed_as": "prompt_ablations"},  # renamed: results keep their keys
        description="Patching only: explainers retrained with one part of every template removed (the paper's "
        "'- activation', '- layer', '- token'), each evaluated as its own method.",
    )
    omission_roles: list[str] = Field(
        ["self"],
        description="Roles that get the prompt-omission explainers.",
        json_schema_extra={"hashed_as": "ablation_roles"},  # renamed: results keep their keys
    )
    rotated_basis_roles: list[str] = Field([], description="Patching only. " + ROTATED_BASIS_ROLES)
    vector_controls: bool = Field(
        True,
        description="Patching only: also decode each trained explainer with v = 0 (method zero_vector) and with "
        "the vector of another test row of the same chunk (shuffled_vector): does it read v at all?",
    )
    zero_shot: bool = Field(True, description="Also score each explainer's untrained model with the paper's prompt.")
    seed: int = Field(0, **SEED, description="Seed of the train/test samples and of template choice at evaluation.")


class OutcomeRecipeBase(StrictModel):
    """What the patching and ablation recipes share: store, target, explainers."""

    home: str | None = Field(None, description="Store root; null uses $SELFEXPLAIN_HOME or ./.selfexplain.")
    target: ModelConfig = Field(default_factory=ModelConfig, description="The frozen target model.")
    explainers: dict[str, ExplainerConfig] = Field(
        default_factory=outcome_explainers,
        description="Trained explainers by role; 'self' should start from the target's weights.",
    )
