"""Config of the experiment: the grid of tasks x n_train x seeds, where its cells run, and each task's recipe."""

from typing import Annotated, Literal

from pydantic import Field, field_validator

from tasks.ablation.config import AblationRecipe
from tasks.common.config import MAX_ITEMS, RESOURCE_ONLY, SEED, ModelConfig, StrictModel
from tasks.features.config import FeaturesRecipe
from tasks.patching.config import PatchingRecipe


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
        description="Cells that run the n_train-dependent controls (the v = 0 decode and the prompt-omission "
        "explainers of eval.prompt_omissions): 'largest' only the largest n_train of each seed (the paper "
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
