"""Stage `feature_labels`: ground-truth descriptions of SAE features (auto-interp), stored with their labeler.

`tokens` (deterministic): the token strings that most *specifically* activate the feature. For each token
string s we take its activation mass m(s) (sum of the feature's activations on s over the cache) and its
specificity p(s) = (occurrences of s where the feature fires) / (occurrences of s in the cache); the label
names the strings with the largest m(s)·p(s), at most `max_tokens`, dropping any below a fifth of the best:
`the tokens "def" and "class"`.

`llm`: a prompted LM reads the top exemplars (the feature's strongest token marked with « ») and writes a
short description; a local model (registry name or HF folder) or an OpenAI-compatible endpoint.
"""

import json
from collections.abc import Sequence
from pathlib import Path

import duckdb
import pyarrow as pa

from storage.errors import UserInputError
from storage.store import Dataset
from tasks.common.llm import complete
from tasks.features.config import LabelConfig

STAGE = "feature_labels"
STAGE_VERSION = 1
LLM_PROMPT = (
    "Below are text excerpts where one internal feature of a language model fires; the token where it fires "
    "most is marked like «this». In a few words, what does the feature detect?\n\n{examples}\n\nThe feature detects"
)


def token_texts(tokenizer, ids: Sequence[int]) -> dict[int, str]:
    return {int(i): tokenizer.decode([int(i)]) for i in set(int(i) for i in ids)}


def format_tokens_label(strings: Sequence[str]) -> str:
    quoted = [json.dumps(s.strip()) for s in strings]
    if len(quoted) == 1:
        return f"the token {quoted[0]}"
    return "the tokens " + ", ".join(quoted[:-1]) + " and " + quoted[-1]


def tokens_labels(
    root: Path, sae_key: str, activations_files: list[str], tokenizer, cfg: LabelConfig, eligible: pa.Table
) -> pa.Table:
    """Labels of the `eligible` (layer, feature_id) pairs by the deterministic tokens labeler."""
    fa = [str(p) for p in Dataset(root, "feature_activations", sae_key).shard_files()]
    con = duckdb.connect()
    con.register("eligible", eligible)
    rows = con.execute(
        f"""
        with corpus as (
            select layer, token_id, count(*) as n from read_parquet({activations_files}) group by all
        ), fired as (
            select f.layer, f.feature_id, f.token_id, sum(f.value) as mass, count(*) as n_fired
            from read_parquet({fa}) f join eligible e using (layer, feature_id) group by all
        )
        select fired.layer, feature_id, token_id, mass * n_fired / corpus.n as score
        from fired join corpus using (layer, token_id)
        qualify row_number() over (partition by fired.layer, feature_id order by score desc, token_id) <= {cfg.max_tokens}
        order by fired.layer, feature_id, score desc
        """
    ).fetchall()
    texts = token_texts(tokenizer, [r[2] for r in rows])
    by_feature: dict[tuple[int, int], list[tuple[str, float]]] = {}
    for layer, feature, token, score in rows:
        by_feature.setdefault((layer, feature), []).append((texts[token], score))
    layers, features, labels = [], [], []
    for (layer, feature), scored in sorted(by_feature.items()):
        best = scored[0][1]
        strings = []
        for s, sc in scored:
            if sc >= 0.2 * best and s.strip() and s.strip() not in strings:
                strings.append(s.strip())
        if strings:
            layers.append(layer)
            features.append(feature)
            labels.append(format_tokens_label(strings))
    return label_table(layers, features, labels, "tokens")


def exemplar_snippets(rows: Sequence[tuple[list[str], int]], width: int = 12) -> str:
    """Exemplar lines: a window of tokens around the maximum, the maximum marked with « »."""
    lines = []
    for tokens, pos in rows:
        lo, hi = max(0, pos - width), min(len(tokens), pos + 3)
        parts = tokens[lo:pos] + [f"«{tokens[pos]}»"] + tokens[pos + 1 : hi]
        lines.append("- " + "".join(parts).replace("\n", " "))
    return "\n".join(lines)


def llm_label(prompts: Sequence[str], cfg: LabelConfig, max_new_tokens: int = 16) -> list[str]:
    """Descriptions from a prompted LM (local, or `openai:<model>` via an OpenAI-compatible endpoint)."""
    if not cfg.llm_model:
        raise UserInputError("labels.llm_model", "the llm labeler needs a model", "set labels.llm_model")
    replies = complete(prompts, cfg.llm_model, "labels.llm_model", cfg.llm_base_url, max_new_tokens)
    return [r.strip(" .:") for r in replies]


def label_table(
    layers: Sequence[int],
    feature_ids: Sequence[int],
    labels: Sequence[str],
    labeler: str,
    splits: Sequence[str] | None = None,
) -> pa.Table:
    """Rows of `feature_labels`, whose columns are declared here once for every writer (the tokens and LM
    labelers, the archive importer, the bootstrapping loop): layer, feature_id, label, labeler, and split once
    it is drawn."""
    columns = {"layer": pa.array(layers, pa.int16()), "feature_id": pa.array(feature_ids, pa.int32()),
               "label": pa.array(labels, pa.string()), "labeler": pa.array([labeler] * len(labels), pa.string())}  # fmt: skip
    if splits is not None:
        columns["split"] = pa.array(splits, pa.string())
    return pa.table(columns)
