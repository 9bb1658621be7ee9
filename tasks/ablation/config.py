"""Configs of task C, input ablation: the questions and hint, and the ablation recipe."""

from typing import Literal

from pydantic import Field

from tasks.common.config import MAX_BATCH, SEED, StrictModel, count_cap
from tasks.outcomes.config import OutcomeEvalConfig, OutcomeRecipeBase

AnswerFormat = Literal["letter", "calibrated_letter", "option_text"]


class AblationConfig(StrictModel):
    """Input-ablation ground truth (task C): does removing a hint change the answer?"""

    questions: str | None = Field(
        None, description="Question file: null for the built-in bank, or an MMLU-format .jsonl/.parquet."
    )
    n_questions: int | None = count_cap("Use at most this many questions")
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


class AblationEvalConfig(OutcomeEvalConfig):
    """The ablation flow's evaluation: its questions carry no vector, so no prompt omission by default (a
    recipe that sets any other eval key must not inherit patching's)."""

    prompt_omissions: list[Literal["no_activation", "no_layer", "no_token"]] = Field(
        [],
        description="Must stay []: ablation questions carry no vector, layer or token string.",
        json_schema_extra={"hashed_as": "prompt_ablations"},  # renamed: results keep their keys
    )


class AblationRecipe(OutcomeRecipeBase):
    """Recipe of the ablation flow: hint-removal ground truth, explainers, baselines, evaluation."""

    ablation: AblationConfig = Field(default_factory=AblationConfig, description="Questions and hint.")
    eval: AblationEvalConfig = Field(default_factory=AblationEvalConfig, description="Training caps and baselines.")
