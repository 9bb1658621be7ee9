"""Task C as an outcome task (tasks/outcomes/protocol.py): `ablation_gt` rows become questions without a vector,
the hinted prompt under the target's own system prompt, asking whether removing the hint changes the answer."""

import random
from collections import Counter

from storage.errors import UserInputError
from storage.store import Dataset
from tasks.ablation.config import AblationRecipe
from tasks.ablation.ground_truth import ablation_key, import_input_ablation
from tasks.ablation.prompts import ABLATION_QUESTION, ZERO_SHOT_ABLATION
from tasks.explainer.model import Query
from tasks.outcomes.answers import target
from tasks.outcomes.facts import load_questions
from tasks.outcomes.protocol import OutcomeTask, Row


class Ablation(OutcomeTask, name="ablation", table="ablation_gt", carries_vector=False, key=ablation_key,
               importer=import_input_ablation):  # fmt: skip
    def check_source(self, recipe: AblationRecipe) -> None:
        """The question file."""
        if not load_questions(recipe.ablation.questions):
            raise UserInputError("ablation.questions", f"{recipe.ablation.questions} holds no questions",
                                 "give a file with one question per line (or row)")  # fmt: skip

    def vector_sites(self, recipe: AblationRecipe, imported: list[Row]) -> None:
        return None

    def dims(self, gt: Dataset) -> tuple[None, int]:
        """No vector: the explainer's own width, no projection."""
        return None, 1

    def vector_stats(self, gt: Dataset) -> None:
        return None

    def gold(self, row: Row) -> tuple[bool, str]:
        """(changed, 'Answer: <the no-hint letter>')."""
        return bool(row["changed_pred_bc_hint"]), f"Answer: {row['zeroshot_prediction']}"

    def question(self, row: Row, mode: str, rng: random.Random) -> Query:
        """The hinted prompt under the target's own system prompt; no vector (§5.3)."""
        if mode not in ("trained", "zero_shot"):
            raise ValueError(f"mode {mode!r} needs a vector; ablation questions carry none")
        text = row["hint_user_prompt"] + ABLATION_QUESTION + (ZERO_SHOT_ABLATION if mode == "zero_shot" else "")
        return Query(None, 0, text, None, self.example_id(row), system=row["system_prompt"])

    def example_id(self, row: Row) -> str:
        return f"q{row['question_id']}/{row['index']}"

    def baselines(self, train: list[Row], test: list[Row]) -> dict[str, list[str]]:
        """Besides the majority target: the position bias (the majority flag and the target's most frequent
        no-hint letter in train) and the question's correct answer with the majority flag (what a model that
        ignores the hint and knows the answer would say)."""
        out = super().baselines(train, test)
        flag = Counter(self.gold(r)[0] for r in train).most_common(1)[0][0]
        letter = Counter(r["zeroshot_prediction"] for r in train).most_common(1)[0][0]
        out["position_bias"] = [target(flag, f"Answer: {letter}")] * len(test)
        out["correct_answer"] = [target(flag, f"Answer: {r['correct_answer']}") for r in test]
        return out


ABLATION = Ablation()
