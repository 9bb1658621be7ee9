"""Fact base and question bank: the project's own data (tasks/data/), plus loaders for CounterFact JSON and
MMLU-format files.

facts.jsonl: {"subject", "relation", "object"}; relations.json: {relation: {"template": "The capital of {} is"}}.
questions.jsonl: {"question", "choices" (4), "answer" (0-3), "subject"}.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from storage.errors import UserInputError

DATA = Path(__file__).parent / "data"


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    object: str
    template: str  # sentence prefix with {} for the subject; the object comes next

    @property
    def prompt(self) -> str:
        return self.template.format(self.subject)


@dataclass(frozen=True)
class Question:
    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str


def _jsonl(path: Path, field: str) -> list[dict]:
    if not path.is_file():
        raise UserInputError(field, f"{path} does not exist", "point it at a JSON-lines file")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise UserInputError(field, f"{path}:{lineno} is not JSON", "fix that line") from None
    return rows


def load_facts(path: str | None = None) -> list[Fact]:
    """The built-in fact base (path None), a facts.jsonl of our format, or a CounterFact JSON file."""
    if path is not None and str(path).endswith(".json"):
        return load_counterfact(Path(path))
    relations = json.loads((DATA / "relations.json").read_text())
    facts = []
    for row in _jsonl(Path(path) if path else DATA / "facts.jsonl", "patching.facts"):
        missing = {"subject", "relation", "object"} - set(row)
        if missing:
            raise UserInputError("patching.facts", f"a fact lacks {sorted(missing)}", "give subject, relation, object")
        template = row.get("template") or relations.get(row["relation"], {}).get("template")
        if not template:
            raise UserInputError("patching.facts", f"relation {row['relation']!r} has no template", "add one")
        facts.append(Fact(row["subject"], row["relation"], row["object"], template))
    return facts


def load_counterfact(path: Path) -> list[Fact]:
    """CounterFact records: requested_rewrite.{prompt, subject, target_true.str, relation_id}."""
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
        return [
            Fact(
                r["requested_rewrite"]["subject"],
                r["requested_rewrite"]["relation_id"],
                r["requested_rewrite"]["target_true"]["str"],
                r["requested_rewrite"]["prompt"],
            )
            for r in records
        ]
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise UserInputError(
            "patching.facts",
            f"{path} is not CounterFact JSON ({exc!r})",
            "give requested_rewrite.{prompt, subject, target_true.str, relation_id} per record",
        ) from None


def load_questions(path: str | None = None) -> list[Question]:
    """The built-in question bank, or an MMLU-format .jsonl / .parquet (question, choices, answer, subject)."""
    p = Path(path) if path else DATA / "questions.jsonl"
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(p).to_pylist()
    else:
        rows = _jsonl(p, "ablation.questions")
    out = []
    for i, r in enumerate(rows):
        missing = {"question", "choices", "answer"} - set(r)
        if missing:
            raise UserInputError("ablation.questions", f"row {i} lacks {sorted(missing)}", "use the MMLU columns")
        if len(r["choices"]) != 4 or not 0 <= int(r["answer"]) < 4:
            raise UserInputError("ablation.questions", f"row {i} needs 4 choices and answer 0-3", "fix that row")
        out.append(Question(r["question"], tuple(r["choices"]), int(r["answer"]), r.get("subject", "")))
    return out
