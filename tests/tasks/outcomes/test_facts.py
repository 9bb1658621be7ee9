"""Fact and question files: every way one can be unreadable is one line naming the field, the place and the fix."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.errors import UserInputError
from tasks.outcomes.facts import load_facts, load_questions

FACT = {"subject": "France", "relation": "capital", "object": "Paris"}
QUESTION = {"question": "2 + 2?", "choices": ["1", "2", "3", "4"], "answer": 3, "subject": "maths"}
COUNTERFACT = {"requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                                     "target_true": {"str": "French"}, "relation_id": "P103"}}  # fmt: skip


def _lines(*rows: object) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _write(tmp_path: Path, name: str, content: bytes | None) -> str:
    path = tmp_path / name
    if content is None:
        path.mkdir()
    elif content != b"<missing>":
        path.write_bytes(content)
    return str(path)


# (file name, its bytes: None makes a folder, b"<missing>" nothing; the start of the one line, {p} the path)
BAD_FACT_FILES = [
    ("none.jsonl", b"<missing>", "patching.facts: {p} does not exist; fix: point it at a facts .jsonl"),
    ("facts.d", None, "patching.facts: {p} is a folder, not a file"),
    ("latin1.jsonl", '{"subject": "caf\xe9"}\n'.encode("latin-1"), "patching.facts: {p} is not UTF-8 text (byte 16)"),
    ("broken.jsonl", _lines(FACT) + b"{broken\n", "patching.facts: {p}:2 is not JSON; fix: fix that line"),
    ("list.jsonl", _lines(FACT, ["France", "capital", "Paris"]), "patching.facts: {p}:2 is not a JSON object"),
    ("lacks.jsonl", _lines({"subject": "France", "relation": "capital"}), "patching.facts: {p}:1 lacks ['object']"),
    ("number.jsonl", _lines({**FACT, "object": 7}), "patching.facts: {p}:1: 'object' is 7, not a non-empty string"),
    ("blank.jsonl", _lines({**FACT, "subject": " "}), "patching.facts: {p}:1: 'subject' is ' ', not a non-empty"),
    ("norel.jsonl", _lines({**FACT, "relation": "mayor"}), "patching.facts: {p}:1: relation 'mayor' has no template"),
    ("tmpl.jsonl", _lines({**FACT, "relation": "mayor", "template": "The mayor of {x} is"}),
     "patching.facts: {p}:1: template 'The mayor of {{x}} is' has no single '{{}}' for the subject"),
    ("none.json", b"<missing>", "patching.facts: {p} does not exist; fix: point it at a facts .jsonl"),
    ("cf.json", b"{not json", "patching.facts: {p} is not CounterFact JSON"),
    ("cf_keys.json", json.dumps([{"requested_rewrite": {"subject": "x"}}]).encode(), "patching.facts: {p} is not "
                                                                                      "CounterFact JSON (KeyError"),
    ("cf_tmpl.json", json.dumps([{"requested_rewrite": {**COUNTERFACT["requested_rewrite"], "prompt": "no slot"}}])
     .encode(), "patching.facts: {p} record 0: template 'no slot' has no single '{{}}'"),
]  # fmt: skip
BAD_QUESTION_FILES = [
    ("none.jsonl", b"<missing>", "ablation.questions: {p} does not exist; fix: point it at an MMLU-format .jsonl"),
    ("none.parquet", b"<missing>", "ablation.questions: {p} does not exist"),
    ("q.d", None, "ablation.questions: {p} is a folder, not a file"),
    ("q.jsonl", b"\xff\xfe", "ablation.questions: {p} is not UTF-8 text (byte 0)"),
    ("q.jsonl", b'"a question"\n', "ablation.questions: {p}:1 is not a JSON object"),
    ("q.jsonl", _lines({"question": "?", "answer": 1}), "ablation.questions: {p}:1 lacks ['choices']"),
    ("q.jsonl", _lines({**QUESTION, "choices": ["a", "b"]}), "ablation.questions: {p}:1: choices ['a', 'b'] are "
                                                             "not 4 strings"),
    ("q.jsonl", _lines({**QUESTION, "answer": 4}), "ablation.questions: {p}:1: answer 4 is not 0, 1, 2 or 3"),
    ("q.jsonl", _lines(QUESTION, {**QUESTION, "answer": "B"}), "ablation.questions: {p}:2: answer 'B' is not 0"),
    ("q.jsonl", _lines({**QUESTION, "answer": True}), "ablation.questions: {p}:1: answer True is not 0, 1, 2 or 3"),
    ("q.jsonl", _lines({**QUESTION, "question": None}), "ablation.questions: {p}:1: 'question' is None"),
    ("q.parquet", b"PAR1 not really", "ablation.questions: {p} is not a Parquet file"),
]  # fmt: skip


@pytest.mark.parametrize(
    "load, name, content, message",
    [(load_facts, *case) for case in BAD_FACT_FILES] + [(load_questions, *case) for case in BAD_QUESTION_FILES],
)
def test_bad_fact_and_question_files_are_one_line(tmp_path, load, name, content, message):
    path = _write(tmp_path, name, content)
    with pytest.raises(UserInputError) as err:
        load(path)
    assert str(err.value).startswith(message.format(p=path)) and "\n" not in str(err.value), str(err.value)


def test_good_files_load(tmp_path):
    facts = tmp_path / "facts.jsonl"
    facts.write_bytes(_lines(FACT, {**FACT, "subject": "Peru", "relation": "mayor", "template": "Mayor of {}:"}))
    assert [f.prompt for f in load_facts(str(facts))] == ["The capital of France is", "Mayor of Peru:"]
    questions = tmp_path / "q.parquet"
    pq.write_table(pa.Table.from_pylist([QUESTION, {**QUESTION, "answer": 0, "subject": None}]), questions)
    assert [(q.answer, q.subject) for q in load_questions(str(questions))] == [(3, "maths"), (0, "")]
    as_text = tmp_path / "q.jsonl"  # an index written as text, as int() read it before
    as_text.write_bytes(_lines({**QUESTION, "answer": "2"}))
    assert load_questions(str(as_text))[0].answer == 2
