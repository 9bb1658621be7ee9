"""Fact base and question bank: the project's own data (tasks/data/), plus loaders for CounterFact JSON and
MMLU-format files.

facts.jsonl: {"subject", "relation", "object"}; relations.json: {relation: {"template": "The capital of {} is"}}.
questions.jsonl: {"question", "choices" (4), "answer" (0-3), "subject"}.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from storage.errors import UserInputError, first_line, short_repr

DATA = Path(__file__).parent / "data"
FACTS = "a facts .jsonl (subject, relation, object per line) or a CounterFact .json file"
QUESTIONS = "an MMLU-format .jsonl or .parquet file (question, choices, answer)"


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


def _read_text(path: Path, field: str, what: str) -> str:
    """The UTF-8 text of the file `field` names; a missing path, a folder or unreadable bytes is one line."""
    if not path.exists():
        raise UserInputError(field, f"{path} does not exist", f"point it at {what}")
    if not path.is_file():
        raise UserInputError(field, f"{path} is a folder, not a file", f"point it at {what}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserInputError(field, f"{path} is not UTF-8 text (byte {exc.start})", "save it as UTF-8") from None
    except OSError as exc:
        raise UserInputError(field, f"{path} cannot be read ({exc.strerror})", "check its permissions") from None


def _jsonl(path: Path, field: str, what: str) -> list[tuple[str, dict]]:
    """(where, record) of every non-blank line of a JSON-lines file; each line must be a JSON object."""
    rows = []
    for lineno, line in enumerate(_read_text(path, field, what).splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise UserInputError(field, f"{path}:{lineno} is not JSON", "fix that line") from None
            if not isinstance(row, dict):
                raise UserInputError(field, f"{path}:{lineno} is not a JSON object", "write one object per line")
            rows.append((f"{path}:{lineno}", row))
    return rows


def _strings(row: dict, keys: tuple[str, ...], where: str, field: str) -> None:
    """Every key of `keys` in `row` holds a non-empty string."""
    missing = [k for k in keys if k not in row]
    if missing:
        raise UserInputError(field, f"{where} lacks {missing}", f"give {', '.join(keys)}")
    for k in keys:
        if not isinstance(row[k], str) or not row[k].strip():
            raise UserInputError(field, f"{where}: {k!r} is {short_repr(row[k])}, not a non-empty string",
                                 "fix that record")  # fmt: skip


def _template(template: object, where: str, field: str) -> str:
    """A prompt template: a string with one `{}` where the subject goes."""
    try:
        ok = isinstance(template, str) and template.count("{}") == 1 and bool(template.format("x"))
    except (IndexError, KeyError, ValueError):
        ok = False
    if not ok:
        raise UserInputError(field, f"{where}: template {short_repr(template)} has no single '{{}}' for the subject",
                             "write it like 'The capital of {} is'")  # fmt: skip
    return template


def load_facts(path: str | None = None) -> list[Fact]:
    """The built-in fact base (path None), a facts.jsonl of our format, or a CounterFact JSON file."""
    if path is not None and str(path).endswith(".json"):
        return load_counterfact(Path(path))
    relations = json.loads((DATA / "relations.json").read_text())
    facts = []
    for where, row in _jsonl(Path(path) if path else DATA / "facts.jsonl", "patching.facts", FACTS):
        _strings(row, ("subject", "relation", "object"), where, "patching.facts")
        template = row.get("template") or relations.get(row["relation"], {}).get("template")
        if not template:
            raise UserInputError("patching.facts", f"{where}: relation {row['relation']!r} has no template",
                                 "give the fact a 'template', e.g. 'The capital of {} is'")  # fmt: skip
        facts.append(Fact(row["subject"], row["relation"], row["object"], _template(template, where, "patching.facts")))
    return facts


def load_counterfact(path: Path) -> list[Fact]:
    """CounterFact records: requested_rewrite.{prompt, subject, target_true.str, relation_id}."""
    text = _read_text(path, "patching.facts", FACTS)
    try:
        records = json.loads(text)
        facts = [
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
    for i, f in enumerate(facts):
        _strings({"subject": f.subject, "relation": f.relation, "object": f.object}, ("subject", "relation", "object"),
                 f"{path} record {i}", "patching.facts")  # fmt: skip
        _template(f.template, f"{path} record {i}", "patching.facts")
    return facts


def _parquet_rows(path: Path, field: str) -> list[tuple[str, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        _read_text(path, field, QUESTIONS)  # names a missing path or a folder
    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise UserInputError(field, f"{path} is not a Parquet file ({first_line(exc)})",
                             "give an MMLU-format .parquet, or the file its real suffix") from None  # fmt: skip
    return [(f"{path} row {i + 1}", r) for i, r in enumerate(rows)]


def load_questions(path: str | None = None) -> list[Question]:
    """The built-in question bank, or an MMLU-format .jsonl / .parquet (question, choices, answer, subject)."""
    field = "ablation.questions"
    p = Path(path) if path else DATA / "questions.jsonl"
    rows = _parquet_rows(p, field) if p.suffix == ".parquet" else _jsonl(p, field, QUESTIONS)
    out = []
    for where, r in rows:
        missing = [k for k in ("question", "choices", "answer") if k not in r]
        if missing:
            raise UserInputError(field, f"{where} lacks {missing}", "use the MMLU columns question, choices, answer")
        _strings(r, ("question",), where, field)
        choices, answer = r["choices"], r["answer"]
        if isinstance(answer, str) and answer.strip() in ("0", "1", "2", "3"):
            answer = int(answer)  # an index written as text
        if not (isinstance(choices, list) and len(choices) == 4 and all(isinstance(c, str) for c in choices)):
            raise UserInputError(field, f"{where}: choices {short_repr(choices)} are not 4 strings", "fix that row")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < 4:
            raise UserInputError(field, f"{where}: answer {short_repr(answer)} is not 0, 1, 2 or 3",
                                 "give the index of the correct choice")  # fmt: skip
        subject = r.get("subject") or ""
        out.append(Question(r["question"], tuple(choices), answer, subject if isinstance(subject, str) else ""))
    return out
