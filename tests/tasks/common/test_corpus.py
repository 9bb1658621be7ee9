import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.errors import UserInputError
from storage.store import Dataset
from tasks.common import corpus, models
from tasks.common.config import CorpusConfig, ModelConfig


def _parquet_bytes(texts: list[str | None]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), sink)
    return sink.getvalue().to_pybytes()


@pytest.fixture(scope="module")
def tokenizer():
    return models.byte_tokenizer()


def test_contexts_start_with_bos_and_are_deterministic(tokenizer, text_file):
    cfg = CorpusConfig(source=str(text_file), n_tokens=100, context_length=16)
    ids = corpus.tokenize_contexts(tokenizer, cfg)
    assert ids.shape == (7, 16)  # ceil(100 / 16)
    assert (ids[:, 0] == tokenizer.bos_token_id).all()
    text = tokenizer.decode(ids[:2, 1:].reshape(-1))
    assert text_file.read_text().startswith(text)  # contexts continue the text without gaps
    np.testing.assert_array_equal(ids, corpus.tokenize_contexts(tokenizer, cfg))


def test_jsonl_parquet_and_saved_dataset_give_the_same_contexts(tokenizer, tmp_path):
    docs = ["First document about layers.", "Second one, about features and circuits."] * 10
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in docs))
    pq.write_table(pa.table({"body": docs}), tmp_path / "c.parquet")
    import datasets

    datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(tmp_path / "saved"))
    results = [
        corpus.tokenize_contexts(tokenizer, CorpusConfig(source=str(tmp_path / name), text_field="body", n_tokens=300))
        for name in ("c.jsonl", "c.parquet", "saved")
    ]
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], results[2])
    # documents are separated by EOS
    assert tokenizer.eos_token_id in results[0]


def test_folder_of_txt_files_reads_in_sorted_order(tokenizer, tmp_path):
    (tmp_path / "b.txt").write_text("BBBB")
    (tmp_path / "a.txt").write_text("AAAA")
    ids = corpus.tokenize_contexts(tokenizer, CorpusConfig(source=str(tmp_path), n_tokens=9, context_length=9))
    assert tokenizer.decode(ids[0, 1:]).replace(tokenizer.eos_token, "|") == "AAAA|BBB"


@pytest.mark.parametrize(
    "name, content, field, problem",
    [
        ("none.txt", None, "corpus.source", "does not exist"),
        ("x.csv", b"a,b", "corpus.source", "unsupported suffix"),
        ("x.txt", b"ok \xff\xfe", "corpus.source", "not UTF-8"),
        ("x.txt", b"tiny", "corpus.n_tokens", "holds only"),
        ("e.txt", b"", "corpus.source", "holds no text"),
        ("x.jsonl", b'{"content": "a"}\n', "corpus.text_field", "has no key 'text'"),
        ("x.jsonl", b"{broken\n", "corpus.source", "is not JSON"),
        # records past the first, which check_source does not read: refused when read, by line or row
        ("late.jsonl", b'{"text": "ok"}\n{"text": "fine"}\n{"text": null}\n', "corpus.source", "late.jsonl:3: 'text' is null"),
        ("late.jsonl", b'{"text": "ok"}\n[1]\n', "corpus.source", "late.jsonl:2 is an array, not a JSON object"),
        ("late.jsonl", b'{"text": "ok"}\n{"text": ["a"]}\n', "corpus.source", "late.jsonl:2: 'text' is an array, not text"),
        ("late.parquet", _parquet_bytes(["ok", "fine", None]), "corpus.source", "late.parquet row 3: 'text' is null"),
    ],
)  # fmt: skip
def test_bad_corpora_name_field_and_fix(tokenizer, tmp_path, name, content, field, problem):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(UserInputError) as err:
        corpus.tokenize_contexts(tokenizer, CorpusConfig(source=str(tmp_path / name), n_tokens=1000))
    assert str(err.value).startswith(field) and problem in str(err.value)


def test_write_tokens_shards_and_resumes(tokenizer, text_file, home):
    cfg = CorpusConfig(source=str(text_file), n_tokens=640, context_length=32)
    out = Dataset(home, "tokens", "k")
    summary = corpus.write_tokens(tokenizer, cfg, out, contexts_per_shard=8)
    assert summary == {"contexts": 20, "context_length": 32, "tokens": 640, "shards": 3}
    table = pq.read_table(out.shard_path(2))
    assert table.num_rows == 4 * 32 and table.column("context_id").to_pylist()[0] == 16
    assert "".join(table.column("token").to_pylist()[1:32]) == tokenizer.decode(
        table.column("token_id").to_pylist()[1:32]
    )
    ctx, ids = corpus.read_token_shard(out.shard_path(1), 32)
    assert ctx.tolist() == list(range(8, 16)) and ids.shape == (8, 32)


def test_tokens_key_tracks_tokenizer_and_corpus():
    cfg = CorpusConfig()
    assert corpus.tokens_key(cfg, "m@1", 64) != corpus.tokens_key(cfg, "m@2", 64)
    assert corpus.tokens_key(cfg, "m@1", 64) != corpus.tokens_key(cfg.model_copy(update={"n_tokens": 5}), "m@1", 64)
    assert "python-" in corpus.corpus_identity(cfg) and "torch-" in corpus.corpus_identity(cfg)


@pytest.mark.integration
def test_builtin_corpus_holds_a_million_smollm2_tokens():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models.resolve(ModelConfig()).source)
    ids = corpus.tokenize_contexts(tok, CorpusConfig(n_tokens=1_000_000, context_length=1024))
    assert ids.size >= 1_000_000
    text = tok.decode(ids[500, 1:200])
    assert sum(c.isalpha() for c in text) > 0.5 * len(text)  # prose, not binary junk


def _corpus_files(tmp_path) -> dict[str, str]:
    """Small corpora by name: plain and multi-byte text, JSON lines (one empty), Parquet, a folder of shards."""
    (tmp_path / "prose.txt").write_text("Hello world. " * 10)  # 130 bytes, one document
    (tmp_path / "accents.txt").write_text("café crème brûlée — ☕ " * 5)  # multi-byte characters
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n"
                                                 for i, t in enumerate(["alpha beta", "", "gamma\tdelta " * 4])))  # fmt: skip
    (tmp_path / "docs.parquet").write_bytes(_parquet_bytes(["one two three", "", "four five six seven"] * 3))
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "a.txt").write_text("first shard ")
    (tmp_path / "shards" / "b.jsonl").write_text(json.dumps({"text": "second shard"}) + "\n")
    return {p.name: str(p) for p in tmp_path.iterdir()}


@pytest.mark.parametrize("name", ["prose.txt", "accents.txt", "docs.jsonl", "docs.parquet", "shards"])
@pytest.mark.parametrize("context_length", [8, 33])
def test_check_size_refuses_only_what_the_corpus_cannot_hold(tokenizer, tmp_path, name, context_length):
    source = _corpus_files(tmp_path)[name]
    with pytest.raises(UserInputError) as err:
        corpus.check_size(CorpusConfig(source=source, n_tokens=10**9, context_length=context_length))
    message = str(err.value)
    assert message.startswith(f"corpus.n_tokens: 1000000000 tokens asked but the corpus {source} holds at most "), (
        message
    )
    most = int(message.split("holds at most ")[1].split()[0])
    assert "; fix: lower corpus.n_tokens to at most " in message
    # the largest n_tokens the bound lets through passes it; one context more is refused by the bound and by
    # tokenisation alike: the bound never turns away a corpus that holds the tokens
    if most:
        corpus.check_size(CorpusConfig(source=source, n_tokens=most, context_length=context_length))
    beyond = CorpusConfig(source=source, n_tokens=most + context_length, context_length=context_length)
    with pytest.raises(UserInputError, match="corpus.n_tokens: .* holds (only|at most)"):
        corpus.check_size(beyond)
    with pytest.raises(UserInputError, match="corpus.n_tokens: .* holds only"):
        corpus.tokenize_contexts(tokenizer, beyond)


def test_check_tokens_refuses_with_the_exact_count_and_the_run_tokenises_once(tokenizer, tmp_path, monkeypatch):
    # 30 documents "ab": 15 bytes of JSON each, so the byte bound lets 450 through; the byte tokenizer makes
    # 2 tokens + EOS of each: a stream of 90, which fills 90 // 7 = 12 contexts of 8 (n_tokens <= 96)
    path = tmp_path / "short.jsonl"
    path.write_text((json.dumps({"text": "ab"}) + "\n") * 30)
    too_many = CorpusConfig(source=str(path), n_tokens=256, context_length=8)  # 32 contexts: 224 stream tokens
    corpus.check_size(too_many)  # within the bound
    with pytest.raises(UserInputError) as err:
        corpus.check_tokens(tokenizer, too_many)
    assert str(err.value) == (f"corpus.n_tokens: 256 tokens asked but the corpus {path} holds only 90; "
                              "fix: lower corpus.n_tokens to at most 96, or add text")  # fmt: skip
    calls = []
    real = corpus._tokenize_contexts
    monkeypatch.setattr(corpus, "_tokenize_contexts", lambda tok, cfg: calls.append(cfg) or real(tok, cfg))
    most = too_many.model_copy(update={"n_tokens": 96})
    corpus.check_tokens(tokenizer, most)
    ids = corpus.tokenize_contexts(tokenizer, most)  # the run after the check: no second pass over the corpus
    assert len(calls) == 1 and ids.shape == (12, 8) and not ids.flags.writeable
    a, b = tokenizer("ab")["input_ids"]
    assert ids[0].tolist() == [tokenizer.bos_token_id, a, b, tokenizer.eos_token_id, a, b, tokenizer.eos_token_id, a]
    corpus.tokenize_contexts(tokenizer, most.model_copy(update={"context_length": 4}))  # another corpus view
    assert len(calls) == 2


def test_check_size_reads_a_large_corpus_only_as_far_as_it_needs(tmp_path, monkeypatch):
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"text": ["some words of text " * 10] * 5000}), path, row_group_size=100)
    read = []
    real = corpus._file_documents

    def counting(f, text_field):
        for doc in real(f, text_field):
            read.append(doc)
            yield doc

    monkeypatch.setattr(corpus, "_file_documents", counting)
    corpus.check_size(CorpusConfig(source=str(path), n_tokens=2000, context_length=32))
    # need: ceil(2000 / 32) x 31 = 1953 stream tokens; a document bounds 190 bytes + 2 (dummy prefix, EOS):
    # 10 give 1920, 11 give 2112, so it stops after the 11th of 5000
    assert len(read) == 11


@pytest.mark.parametrize(
    "n_tokens, context_length, message",
    [
        (10**12, 128, "corpus.n_tokens: 1000000000000 tokens asked but the corpus builtin:python-docs holds at most "),
        (10**9, 2, "corpus.n_tokens: 1000000000 tokens asked but the corpus builtin:python-docs holds at most "),
    ],
)
def test_check_size_refuses_a_builtin_corpus_far_too_small_without_parsing_it(monkeypatch, n_tokens, context_length,
                                                                              message):  # fmt: skip
    corpus._python_docs_ceiling()  # once per process (about a second)
    monkeypatch.setattr(corpus, "_docstrings", lambda *a: pytest.fail("parsed the standard library"))
    with pytest.raises(UserInputError) as err:
        corpus.check_size(CorpusConfig(n_tokens=n_tokens, context_length=context_length))
    assert str(err.value).startswith(message), str(err.value)
    corpus.check_size(CorpusConfig(n_tokens=100_000))  # the pydoc topics alone hold that many bytes
