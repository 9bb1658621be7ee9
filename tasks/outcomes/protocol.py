"""The outcome-task protocol: what activation patching (task B, tasks/patching/task.py) and input ablation (task C,
tasks/ablation/task.py) each supply, so that one training (tasks/outcomes/train.py) and one evaluation
(tasks/outcomes/evaluate.py) serve both without asking which task they hold.

A task names its ground-truth table and the recipe section that builds or imports it; it checks what its
ground-truth stage will read; it turns a row into the explainer's question (in any mode of
tasks.outcomes.answers.MODES), its gold (changed, content) pair and its example id; and it says whether its
questions carry a vector. Where they do (patching), the vector controls, the prompt omissions, the rotated basis,
vector_norm 'layer_mean' and projection 'fitted' apply, and the task says where its vectors enter, how they are
distributed and how Π is fitted to them.
"""

import random
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, ClassVar

import numpy as np

from storage.errors import UserInputError
from storage.store import Dataset, store_root
from tasks.explainer.model import ROTATED, Explainer, Query, shuffled_donors
from tasks.explainer.projection import LayerStats, ProjectionFit
from tasks.outcomes.answers import MODES, target

Row = dict[str, Any]  # a row of the task's ground-truth table


class OutcomeTask(ABC):
    """One outcome task. Implementations hold no state: one instance per task (PATCHING, ABLATION)."""

    name: ClassVar[str]  # metrics.task, a checkpoint's meta 'task', the evaluation's stage name
    table: ClassVar[str]  # the ground-truth table
    carries_vector: ClassVar[bool]  # its questions hold a vector v

    key: ClassVar[Callable[[Any], str]]  # a recipe's ground-truth key (its builder's module computes it)
    importer: ClassVar[Callable[[str, str], list[Row]]]  # (path, split) -> the paper's public rows, as `table`'s

    def __init_subclass__(cls, name: str, table: str, carries_vector: bool, key: Callable[[Any], str],
                          importer: Callable[[str, str], list[Row]], **kwargs: Any) -> None:  # fmt: skip
        """A task declares what it is in its class line (name, table, whether questions carry a vector, its
        ground-truth key and importer); the methods below say what it does."""
        super().__init_subclass__(**kwargs)
        cls.name, cls.table, cls.carries_vector = name, table, carries_vector
        cls.key, cls.importer = staticmethod(key), staticmethod(importer)

    def ground_truth(self, recipe: Any) -> Dataset:
        """The ground-truth dataset, built or imported by the flow's first stage."""
        return Dataset(store_root(recipe.home), self.table, self.key(recipe))

    def settings(self, recipe: Any) -> Any:
        """The recipe's section named after the task, which builds or imports its ground truth (it holds
        import_train / import_test)."""
        return getattr(recipe, self.name)

    def import_rows(self, path: str, split: str) -> list[Row]:
        """The paper's public rows of this task, as rows of `table`."""
        return self.importer(path, split)

    @abstractmethod
    def check_source(self, recipe: Any) -> None:
        """What the ground-truth stage will read, read now (it refuses in one line)."""

    @abstractmethod
    def vector_sites(self, recipe: Any, imported: list[Row]) -> tuple[list[int], int, int] | None:
        """(target layers vectors are asked about, the target's layer count, its width), as
        `check_injection` takes them; None when questions carry no vector."""

    @abstractmethod
    def dims(self, gt: Dataset) -> tuple[int | None, int]:
        """(d_target, target layers) of the explainer, read off the ground truth (None: no vector)."""

    @abstractmethod
    def vector_stats(self, gt: Dataset) -> LayerStats | None:
        """Where the vectors lie, for vector_norm 'layer_mean' (None: no vector)."""

    def projection_fit(self, recipe: Any, gt: Dataset, explainer: Explainer) -> ProjectionFit:
        """Π of `projection: fitted` for `explainer`, fitted without labels on the train split (only tasks whose
        questions carry a vector override it; `registry.check_recipe` refuses 'fitted' for the others)."""
        raise ValueError(f"{self.name} questions carry no vector: there is no Π to fit")

    @abstractmethod
    def gold(self, row: Row) -> tuple[bool, str]:
        """(changed, content) of a row: what the explainer should answer."""

    @abstractmethod
    def question(self, row: Row, mode: str, rng: random.Random) -> Query:
        """The explainer's question about `row` in `mode`, its template drawn from `rng`."""

    @abstractmethod
    def example_id(self, row: Row) -> str:
        """A row's id in `predictions`, stable across runs."""

    def baselines(self, train: list[Row], test: list[Row]) -> dict[str, list[str]]:
        """Answers that ignore what the explainer is asked about: the most frequent train target."""
        golds = [self.gold(r) for r in train]
        return {"majority": [target(*Counter(golds).most_common(1)[0][0])] * len(test)}

    def variants(self, recipe: Any) -> list[tuple[str, str]]:
        """(role, variant) of every explainer the flow trains: each role; where questions carry a vector, also
        each prompt omission of `omission_roles` and the rotated basis of `rotated_basis_roles`."""
        out = [(role, "trained") for role in recipe.explainers]
        if self.carries_vector:
            out += [(role, v) for role in recipe.eval.omission_roles for v in recipe.eval.prompt_omissions]
            out += [(role, ROTATED) for role in recipe.eval.rotated_basis_roles]
        return out

    def queries(self, rows: Sequence[Row], mode: str, seed: int, with_answer: bool) -> list[Query]:
        """Explainer questions for `rows`; one template drawn per row with a seeded RNG, so every mode asks about
        the same row in the same words."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        rng = random.Random(seed)
        out = []
        for r in rows:
            q = self.question(r, mode, rng)
            answer = target(*self.gold(r)) if with_answer else None
            out.append(Query(q.vector, q.layer, q.text, answer, q.example_id, system=q.system))
        if mode == "shuffled_vector":  # the same questions, each about another row's vector of its chunk
            donor = shuffled_donors([q.layer for q in out], seed)
            out = [replace(q, vector=out[d].vector) for q, d in zip(out, donor, strict=True)]
        return out


def load_rows(gt: Dataset, split: str, cap: int | None, seed: int) -> list[Row]:
    """Rows of one split, in table order; a seeded sample of `cap` of them when there are more (the samples of
    one seed are nested: a smaller cap takes a prefix of the same permutation). Asking to train on more rows
    than the ground truth holds is an error, not a silent cap."""
    rows = [r for t in gt.iter_shards() for r in t.to_pylist() if r["split"] == split]
    if split == "train" and cap is not None and cap > len(rows):
        raise UserInputError("eval.n_train", f"{cap} exceeds the {len(rows)} training rows of {gt.table}",
                             f"use at most {len(rows)}, or build more ground truth")  # fmt: skip
    if cap is not None and cap < len(rows):
        keep = np.random.default_rng(seed).permutation(len(rows))[:cap]
        rows = [rows[i] for i in keep]
    return rows
