"""Configs of task B, activation patching: the sweep over counterfactual pairs, and the patching recipe."""

from typing import Literal

from pydantic import Field

from tasks.common.config import MAX_BATCH, MAX_ITEMS, MAX_LAYERS, MAX_LENGTH, SEED, StrictModel
from tasks.outcomes.config import OutcomeEvalConfig, OutcomeRecipeBase


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
    batch_size: int = Field(
        8,
        gt=0,
        le=MAX_BATCH,
        description="Patched copies of x per forward pass, all of one chunk; a batch's suffix starts at its first "
        "position, so smaller batches share more of the prefix (8 is the fastest on a 2-core CPU, bench/sweep.py); "
        "raise it on a GPU.",
    )
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


class PatchingRecipe(OutcomeRecipeBase):
    """Recipe of the patching flow: activation-patching ground truth, explainers, baselines, evaluation."""

    patching: PatchingConfig = Field(default_factory=PatchingConfig, description="Pairs, chunks, sweep, balance.")
    eval: OutcomeEvalConfig = Field(default_factory=OutcomeEvalConfig, description="Training caps and baselines.")
