"""Corpora and deterministic tokenisation into fixed-length contexts (stage `tokens`).

The default corpus, `builtin:python-docs`, is English documentation prose that every install of this project
already holds: Python's reference topics (`pydoc_data`), then the docstrings of the standard library, numpy and
torch (pinned versions, so the text is fixed): about 2.3M SmolLM2 tokens with no download. Real runs point
`source` at local FineWeb-style shards (.parquet / .jsonl), plain .txt, or a `datasets` save_to_disk folder.

Why one module of ~470 lines: the readers of every source kind and the tokenisation share the checks run
before a run (check_source, check_size, check_tokens), which must read exactly what the stage will read; kept
together, a check cannot drift from the reader it guards.
"""

import ast
import functools
import importlib.metadata
import importlib.util
import json
import platform
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from transformers import PreTrainedTokenizerBase

from storage.errors import UserInputError, first_line
from storage.hashing import config_hash
from storage.store import Dataset
from tasks.common.config import CorpusConfig, ModelConfig
from tasks.common.orchestration import stage_task

STAGE = "tokens"
STAGE_VERSION = 1
SUFFIXES = (".txt", ".jsonl", ".parquet")


BUILTIN = "builtin:python-docs"
DOCSTRING_PACKAGES = ("numpy", "torch")  # after the standard library, in this order
MIN_DOCSTRING_CHARS = 40  # shorter ones are mostly "Return self." boilerplate


def _docstring_files(root: Path, skip: tuple[str, ...] = ()) -> Iterator[Path]:
    """The .py files under `root` whose docstrings the built-in corpus holds, in sorted order (no tests)."""
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if not (parts[0] in skip or "test" in parts or "tests" in parts):
            yield path


def _docstring_roots() -> list[tuple[Path, tuple[str, ...]]]:
    """(folder, top-level names skipped) of the standard library, then of each of DOCSTRING_PACKAGES."""
    roots = [(Path(sysconfig.get_paths()["stdlib"]), ("site-packages", "idlelib", "turtledemo"))]
    for pkg in DOCSTRING_PACKAGES:
        spec = importlib.util.find_spec(pkg)
        if spec is not None and spec.submodule_search_locations:
            roots.append((Path(next(iter(spec.submodule_search_locations))), ()))
    return roots


def _docstrings(root: Path, skip: tuple[str, ...] = ()) -> Iterator[str]:
    """Module, class and function docstrings of every .py file under `root`, files in sorted order."""
    for path in _docstring_files(root, skip):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib/test fixtures are deliberately broken; they are not prose
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= MIN_DOCSTRING_CHARS:
                    yield doc


def _python_docs() -> Iterator[str]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]
    for root, skip in _docstring_roots():
        yield from _docstrings(root, skip)


@functools.cache
def _python_docs_ceiling() -> tuple[int, int]:
    """(bytes, stream bound) of the built-in corpus without parsing a file: the topics' UTF-8 bytes (+ the slack
    per document), then each source file's bytes, 7 more per tab or `\\t` escape. A docstring's text is no
    longer than its literal, but for tabs (expanded to at most 8 spaces), and its quotes cover the slack."""
    from pydoc_data.topics import topics

    n_bytes = sum(len(t.encode("utf-8")) for t in topics.values())
    bound = n_bytes + DOC_TOKEN_SLACK * len(topics)
    for root, skip in _docstring_roots():
        for path in _docstring_files(root, skip):
            data = path.read_bytes()
            n_bytes += len(data)
            bound += len(data) + 7 * (data.count(b"\t") + data.count(b"\\t"))
    return n_bytes, bound


def corpus_identity(cfg: CorpusConfig) -> str:
    """What the built-in corpus's text depends on (part of the tokens cache key); the path for files."""
    if cfg.source != BUILTIN:
        return str(Path(cfg.source).expanduser().resolve())
    versions = [f"{p}-{importlib.metadata.version(p)}" for p in DOCSTRING_PACKAGES]
    return ",".join([f"python-{platform.python_version()}", *versions])


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserInputError(
            "corpus.source", f"{path} is not UTF-8 text (byte {exc.start})", "re-encode the file as UTF-8"
        ) from None


def _kind(value: object) -> str:
    """What a JSON (or Arrow) value is, in words."""
    if value is None:
        return "null"
    kinds = {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
    }
    return kinds.get(type(value), f"a {type(value).__name__}")


def _text(value: object, where: str, text_field: str) -> str:
    """A record's text: a string; null or any other type is refused, naming the record."""
    if isinstance(value, str):
        return value
    kind = _kind(value)
    raise UserInputError("corpus.source", f"{where}: {text_field!r} is {kind}, not text",
                         f"make every {text_field!r} value a string, or set corpus.text_field to the text column")  # fmt: skip


def _parquet(path: Path, text_field: str) -> pq.ParquetFile:
    """A Parquet file whose `text_field` column holds strings (read from the footer: no rows are read)."""
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise UserInputError("corpus.source", f"{path} is not a Parquet file ({first_line(exc)})",
                             "point corpus.source at Parquet files, or give the file its real suffix") from None  # fmt: skip
    schema = pf.schema_arrow
    if text_field not in schema.names:
        raise UserInputError(
            "corpus.text_field",
            f"{path} has no column {text_field!r} (columns: {', '.join(schema.names)})",
            "set corpus.text_field to the text column",
        )
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise UserInputError("corpus.source", f"{path}: column {text_field!r} holds {kind}, not text",
                             "set corpus.text_field to a string column")  # fmt: skip
    return pf


def _jsonl_record(path: Path, lineno: int, line: str, text_field: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        raise UserInputError("corpus.source", f"{path}:{lineno} is not JSON", "fix that line") from None
    if not isinstance(row, dict):
        raise UserInputError("corpus.source", f"{path}:{lineno} is {_kind(row)}, not a JSON object",
                             'write one JSON object per line, e.g. {"text": "..."}')  # fmt: skip
    if text_field not in row:
        raise UserInputError("corpus.text_field", f"{path}:{lineno} has no key {text_field!r}", "set corpus.text_field")
    return _text(row[text_field], f"{path}:{lineno}", text_field)


def _file_documents(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix == ".txt":
        yield _read_text(path)
    elif path.suffix == ".jsonl":
        for lineno, line in enumerate(_read_text(path).splitlines(), 1):
            if line.strip():
                yield _jsonl_record(path, lineno, line, text_field)
    elif path.suffix == ".parquet":
        pf = _parquet(path, text_field)
        row = 0
        for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
            for t in batch.column(0).to_pylist():
                row += 1
                if t:  # an empty document adds nothing
                    yield t
                elif t is None:
                    _text(t, f"{path} row {row}", text_field)


def _check_file(path: Path, text_field: str) -> None:
    """What can be checked of one corpus file without reading it all: a Parquet footer and text column, the
    first record of a JSONL file."""
    if path.suffix == ".parquet":
        _parquet(path, text_field)
    elif path.suffix == ".jsonl":
        try:
            with open(path, encoding="utf-8") as fh:
                first = next(((n, line) for n, line in enumerate(fh, 1) if line.strip()), None)
        except UnicodeDecodeError as exc:
            raise UserInputError(
                "corpus.source", f"{path} is not UTF-8 text (byte {exc.start})", "re-encode the file as UTF-8"
            ) from None
        if first is not None:
            _jsonl_record(path, *first, text_field)


def _saved_dataset_documents(path: Path, text_field: str) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (OSError, ValueError, KeyError, TypeError) as exc:  # a folder that only looks like save_to_disk
        raise UserInputError("corpus.source", f"{path} is not a readable datasets save_to_disk folder "
                             f"({type(exc).__name__}: {first_line(exc)})",
                             "point corpus.source at a folder written by Dataset.save_to_disk, or at .txt/.jsonl/"
                             ".parquet files") from None  # fmt: skip
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[sorted(ds)[0]]
    if text_field not in ds.column_names:
        raise UserInputError(
            "corpus.text_field", f"{path} has no column {text_field!r}", "set corpus.text_field to the text column"
        )
    for i, row in enumerate(ds.select_columns([text_field])):
        text = _text(row[text_field], f"{path} row {i + 1}", text_field)
        if text:
            yield text


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists())


def _files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES)


def check_source(cfg: CorpusConfig) -> None:
    """Fail fast, before anything is written, on a source that cannot be read."""
    if cfg.source == BUILTIN:
        return
    if cfg.source.startswith("builtin:"):
        raise UserInputError("corpus.source", f"unknown built-in corpus {cfg.source!r}", f"use {BUILTIN} or a path")
    path = Path(cfg.source).expanduser()
    if not path.exists():
        raise UserInputError("corpus.source", f"{path} does not exist", "point corpus.source at a file or folder")
    if path.is_file() and path.suffix not in SUFFIXES:
        raise UserInputError("corpus.source", f"{path} has an unsupported suffix", f"use one of {', '.join(SUFFIXES)}")
    if not _is_saved_dataset(path):
        for f in _files(path):  # every Parquet footer and the first record of every JSONL file
            _check_file(f, cfg.text_field)
    # A look at the first document: encoding, the text field and emptiness fail here, before anything runs.
    if next((d for d in _documents(cfg) if d.strip()), None) is None:
        raise UserInputError("corpus.source", f"{path} holds no text", "point corpus.source at a non-empty corpus")


DOC_TOKEN_SLACK = 2  # tokens a document may add to the stream beyond its UTF-8 bytes: a dummy prefix, its EOS


def _byte_counts(cfg: CorpusConfig) -> Iterator[int]:
    """UTF-8 bytes of the corpus's documents in stream order, or of whole .txt / .jsonl files (their size, read
    from the file system: a .txt file is one document, and a JSON line holds its text's bytes, or more when
    escaped, plus at least 8 bytes of syntax, which covers the slack)."""
    if cfg.source == BUILTIN or _is_saved_dataset(Path(cfg.source).expanduser()):
        for doc in _documents(cfg):
            if doc:
                yield len(doc.encode("utf-8"))
        return
    for f in _files(Path(cfg.source).expanduser()):
        if f.suffix in (".txt", ".jsonl"):
            yield f.stat().st_size
        else:
            for doc in _file_documents(f, cfg.text_field):
                yield len(doc.encode("utf-8"))


def check_size(cfg: CorpusConfig) -> None:
    """Refuse a `corpus.n_tokens` the corpus cannot hold, before anything runs and without a tokenizer.

    The contexts need ceil(n_tokens / context_length) x (context_length - 1) tokens of the document stream
    (documents joined by EOS). No tokenizer this project loads makes more tokens of a text than its UTF-8 bytes
    (byte-level BPE: every token is at least one byte; SentencePiece with byte fallback: at least one character
    or one byte), plus a dummy-prefix token, and the stream adds one EOS per document: so a document's UTF-8
    bytes + DOC_TOKEN_SLACK bound what it adds. The bound of .txt and .jsonl files is their size (nothing is
    read); Parquet, save_to_disk and the built-in corpus are read document by document only until the bound
    covers the need (about n_tokens bytes; the whole corpus only when it is too small). The built-in corpus
    (about 9.3M bytes of text, 2.3M SmolLM2 tokens) is first held to the ceiling its source files give without
    parsing them (about 62M: a second, once per process), so an n_tokens beyond that is refused at once; one
    between the text's bytes and that ceiling reads the whole corpus first (about a minute on two cores). The
    bound is the cheap first check; `check_tokens` then counts exactly, with the tokenizer."""
    need = -(-cfg.n_tokens // cfg.context_length) * (cfg.context_length - 1)
    if cfg.source == BUILTIN and _python_docs_ceiling()[1] < need:  # far too many: refused without parsing
        _refuse_size(cfg, *_python_docs_ceiling())
    bound = n_bytes = 0
    for size in _byte_counts(cfg):
        n_bytes += size
        bound += size + DOC_TOKEN_SLACK
        if bound >= need:
            return
    _refuse_size(cfg, n_bytes, bound)


def _refuse_size(cfg: CorpusConfig, n_bytes: int, bound: int) -> None:
    most = bound // (cfg.context_length - 1) * cfg.context_length  # the largest n_tokens the bound allows
    fix = (f"lower corpus.n_tokens to at most {most} (a bound: text has fewer tokens than bytes), or add text" if most
           else "add text, or shorten the contexts")  # fmt: skip
    raise UserInputError("corpus.n_tokens", f"{cfg.n_tokens} tokens asked but the corpus {cfg.source} holds at most "
                         f"{most} (at most a token per byte of its {n_bytes} bytes)", fix)  # fmt: skip


def iter_documents(cfg: CorpusConfig) -> Iterator[str]:
    """Documents of the corpus, lazily and in a fixed order (files sorted by path)."""
    check_source(cfg)
    yield from _documents(cfg)


def _documents(cfg: CorpusConfig) -> Iterator[str]:
    if cfg.source == BUILTIN:
        yield from _python_docs()
        return
    path = Path(cfg.source).expanduser()
    if _is_saved_dataset(path):
        yield from _saved_dataset_documents(path, cfg.text_field)
        return
    for f in _files(path):
        yield from _file_documents(f, cfg.text_field)


def context_start_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token every context starts with: BOS, or EOS for tokenizers without one."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def check_tokens(tokenizer: PreTrainedTokenizerBase, cfg: CorpusConfig) -> None:
    """Refuse, with the exact count, a `corpus.n_tokens` the corpus holds too few tokens of, before anything is
    written. It tokenises as far as the contexts need, once: the run's `tokenize_contexts` then reuses it."""
    tokenize_contexts(tokenizer, cfg)


# The last tokenisation of this process: (tokenizer, corpus) -> ids [n_contexts, context_length]. One entry
# (tens of MB at most), so the pre-run check and the run that follows it tokenise once between them.
_TOKENIZED: dict[tuple, np.ndarray] = {}


def tokenize_contexts(tokenizer: PreTrainedTokenizerBase, cfg: CorpusConfig) -> np.ndarray:
    """Token ids [n_contexts, context_length]: BOS then context_length-1 tokens of the document stream.

    Documents are joined with EOS in between, so a context may span a document boundary (as in SAE training
    corpora). n_contexts = ceil(n_tokens / context_length). Deterministic for a given tokenizer and corpus.
    """
    key = (tokenizer.name_or_path, type(tokenizer).__name__, len(tokenizer), cfg.model_dump_json(),
           corpus_identity(cfg))  # fmt: skip
    if key not in _TOKENIZED:
        _TOKENIZED.clear()
        _TOKENIZED[key] = _tokenize_contexts(tokenizer, cfg)
        _TOKENIZED[key].flags.writeable = False  # shared by every caller
    return _TOKENIZED[key]


def _tokenize_contexts(tokenizer: PreTrainedTokenizerBase, cfg: CorpusConfig) -> np.ndarray:
    n_contexts = -(-cfg.n_tokens // cfg.context_length)
    body = cfg.context_length - 1
    need = n_contexts * body
    bos = context_start_id(tokenizer)
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for doc in iter_documents(cfg):
        doc_ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        if doc_ids:  # an empty document adds nothing, not even its separator
            stream.extend(doc_ids)
            stream.append(eos)
        if len(stream) >= need:
            break
    if len(stream) < need:
        most = len(stream) // body * cfg.context_length  # the largest n_tokens whose contexts the stream fills
        fix = f"lower corpus.n_tokens to at most {most}, or add text" if most else "add text, or shorten the contexts"
        raise UserInputError(
            "corpus.n_tokens", f"{cfg.n_tokens} tokens asked but the corpus {cfg.source} holds only {len(stream)}", fix
        )
    ids = np.asarray(stream[:need], dtype=np.int32).reshape(n_contexts, body)
    return np.concatenate([np.full((n_contexts, 1), bos, dtype=np.int32), ids], axis=1)


def token_strings(tokenizer: PreTrainedTokenizerBase, ids: np.ndarray) -> dict[int, str]:
    """Readable text of each distinct id in `ids` (decoded one by one, so byte-level BPE reads naturally)."""
    return {int(i): tokenizer.decode([int(i)]) for i in np.unique(ids)}


def write_tokens(tokenizer: PreTrainedTokenizerBase, cfg: CorpusConfig, out: Dataset, contexts_per_shard: int) -> dict:
    """Tokenise the corpus and write table `tokens` (context_id, position, token_id, token) in shards.

    Shard i holds contexts [i*contexts_per_shard, (i+1)*contexts_per_shard); the activation cache aligns its
    own shards with these, so both resume at the same boundaries.
    """
    if out.complete_or_invalidate():
        return out.summary()
    ids = tokenize_contexts(tokenizer, cfg)  # [n_contexts, L]; raises before anything is written
    n_ctx, length = ids.shape
    text = token_strings(tokenizer, ids)
    out.create({"stage": STAGE, "version": STAGE_VERSION, "config": cfg.model_dump()})
    n_shards = -(-n_ctx // contexts_per_shard)
    for shard in range(n_shards):
        if out.shard_done(shard):
            continue
        block = ids[shard * contexts_per_shard : (shard + 1) * contexts_per_shard]  # [c, L]
        c = block.shape[0]
        context_id = np.repeat(np.arange(shard * contexts_per_shard, shard * contexts_per_shard + c), length)
        flat = block.reshape(-1)
        table = pa.table(
            {
                "context_id": pa.array(context_id, pa.int64()),
                "position": pa.array(np.tile(np.arange(length, dtype=np.int32), c)),
                "token_id": pa.array(flat),
                "token": pa.array([text[int(t)] for t in flat], pa.string()),
            }
        )
        out.write_shard(shard, table)
    summary = {"contexts": int(n_ctx), "context_length": int(length), "tokens": int(n_ctx * length), "shards": n_shards}
    out.mark_complete(summary)
    return summary


def read_token_shard(path: Path, context_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(context_ids [c], token_ids [c, L]) of one `tokens` shard."""
    t = pq.read_table(path, columns=["context_id", "token_id"])
    ids = t.column("token_id").to_numpy().reshape(-1, context_length)
    return t.column("context_id").to_numpy()[::context_length], ids


def tokens_key(cfg: CorpusConfig, model_identity: str, contexts_per_shard: int) -> str:
    """Dataset key of a tokenised corpus: tokenizer (via the model identity), corpus text, shard size."""
    return config_hash(
        STAGE,
        STAGE_VERSION,
        {
            "model": model_identity,
            "corpus": cfg.model_dump(),
            "text": corpus_identity(cfg),
            "contexts_per_shard": contexts_per_shard,
        },
    )


def tokens_dataset(home: str, key: str) -> Dataset:
    return Dataset(Path(home), STAGE, key)


class ContextTexts:
    """Token strings of cached contexts (table `tokens`), decoded once per distinct id."""

    def __init__(self, root: Path, tokens_key: str) -> None:
        files = [str(p) for p in Dataset(root, STAGE, tokens_key).shard_files()]
        t = (
            duckdb.connect()
            .execute(f"select context_id, list(token order by position) from read_parquet({files}) group by all")
            .fetchall()
        )
        self._by_context = dict(t)

    def tokens(self, context_id: int) -> list[str]:
        return self._by_context[int(context_id)]


@stage_task("tokenize-corpus", output=lambda p: tokens_dataset(p["home"], p["key"]))
def tokenize_corpus(home: str, key: str, model: ModelConfig, corpus: CorpusConfig, contexts_per_shard: int) -> dict:
    """Tokenise the corpus with the model's tokenizer into table `tokens`."""
    from tasks.common.models import load_tokenizer

    tokenizer = load_tokenizer(model)
    summary = write_tokens(tokenizer, corpus, tokens_dataset(home, key), contexts_per_shard)
    return {"path": str(tokens_dataset(home, key).path), **summary}
