"""Task B ground truth: activation patching over counterfactual pairs (paper §4). Table `patching_gt`.

A pair (x, x') shares the relation and differs in subject and object; both prompts offer the same five
options plus "unknown". The target's layers are cut into contiguous chunks. For every chunk and every
aligned position t <-> t' (subject-final, and everything outside the subject), v = mean over the chunk's
layers of h_l(x')[t'] replaces the residual at t in *every* layer of the chunk while the target reads x;
the greedy next token of the patched run is compared, by id, with the clean one.

The sweep is batched: one forward of x' gives every layer's residual; the patched copies of x (one per
position x chunk) run in batches from the clean run of x (tasks/patching/sweep.py), and only the last
position's logits are computed. Facts are split into train/test by subject before pairing, so no prompt
crosses splits (METHOD §5.3). The sweep and the act_patch importer write the same declared columns (COLUMNS),
and the explainer reads either alike; they live beside the table they fill.
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from storage.errors import UserInputError
from storage.store import Dataset
from tasks.common import models
from tasks.common.importers import ground_truth_key, ground_truth_task, read_rows, require_columns, table_row
from tasks.common.models import LoadedModel
from tasks.common.orchestration import progress_reporter
from tasks.outcomes.facts import Fact, load_facts
from tasks.patching.config import PatchingConfig, PatchingRecipe
from tasks.patching.sweep import all_layers, clean_run, next_tokens

STAGE = "patching_gt"
STAGE_VERSION = 4  # 2: the sweep shares the clean prefix (bf16 rounding of labels may differ from 1); 3: the
# last chunk's v is the mean of block outputs (2 took the last block's after the final norm); 4: a patched
# batch starts at its chunk's first block from the clean residual (rounding of labels may differ from 3)
SYSTEM_PROMPT = "You are a helpful assistant. Answer with one of the offered options."
WORKED_EXAMPLE = ("The chemical symbol of gold is", ["Ag", "Au", "Fe", "Pb", "Cu"], "Au")


@dataclass(frozen=True)
class Pair:
    x: Fact
    x_prime: Fact
    options: tuple[str, ...]  # five objects, then "unknown"
    split: str


# `patching_gt` (and `patching_sweep`), in table order. The sweep and the act_patch importer both build their rows
# with gt_row, so the two cannot drift apart.
COLUMNS = ("pair_id", "split", "relation", "chunk", "layer", "input_text", "input_tokens", "original_continuation",
           "ablated_continuation", "original_token_id", "ablated_token_id", "is_different", "orig_pos",
           "orig_text_token", "counterfact_pos", "counterfact_text_token", "intervention_vector",
           "counterfactual_text", "gt_original_target", "gt_counterfactual_target", "options", "token_type",
           "token_string")  # fmt: skip


def gt_row(**values: Any) -> dict[str, Any]:
    """One `patching_gt` row, every column and only those, in table order."""
    return table_row("patching_gt", COLUMNS, values)


def layer_chunks(n_layers: int, n_chunks: int) -> list[list[int]]:
    """Contiguous, near-equal chunks (e.g. 30 layers / 4 -> 8, 8, 7, 7)."""
    if not 1 <= n_chunks <= n_layers:
        raise UserInputError("patching.n_chunks", f"{n_chunks} chunks for {n_layers} layers", f"use 1..{n_layers}")
    sizes = [n_layers // n_chunks + (1 if i < n_layers % n_chunks else 0) for i in range(n_chunks)]
    starts = np.cumsum([0, *sizes[:-1]])
    return [list(range(s, s + n)) for s, n in zip(starts, sizes, strict=True)]


def make_pairs(facts: list[Fact], cfg: PatchingConfig) -> list[Pair]:
    """Pairs within each split: same relation, different subject and object; 3 distractors of that relation."""
    rng = random.Random(cfg.seed)
    subjects = sorted({f.subject for f in facts})
    rng.shuffle(subjects)
    test_subjects = set(subjects[: int(round(cfg.test_fraction * len(subjects)))])
    pairs = []
    for split in ("train", "test"):
        pool = [f for f in facts if (f.subject in test_subjects) == (split == "test")]
        by_relation: dict[str, list[Fact]] = {}
        for f in pool:
            by_relation.setdefault(f.relation, []).append(f)
        for rel in sorted(by_relation):
            group = by_relation[rel]
            objects = sorted({f.object for f in group})
            if len(objects) < 5:
                continue
            for x in group:
                others = [f for f in group if f.subject != x.subject and f.object != x.object]
                if not others:
                    continue
                xp = rng.choice(others)
                distractors = rng.sample([o for o in objects if o not in (x.object, xp.object)], 3)
                options = [x.object, xp.object, *distractors]
                rng.shuffle(options)
                pairs.append(Pair(x, xp, (*options, "unknown"), split))
    rng.shuffle(pairs)
    n_test = int(round(cfg.n_pairs * cfg.test_fraction))
    test = [p for p in pairs if p.split == "test"][:n_test]
    train = [p for p in pairs if p.split == "train"][: cfg.n_pairs - len(test)]
    return train + test


def render(lm: LoadedModel, prompt: str, options: tuple[str, ...], fmt: str) -> tuple[str, tuple[int, int]]:
    """The full target text and the character span of the query block (where token types are assigned)."""
    ask = f"{prompt}\nRespond with one of {' or '.join(options)} and nothing else."
    if fmt == "fewshot":
        ex_prompt, ex_opts, ex_ans = WORKED_EXAMPLE
        example = f"{ex_prompt}\nRespond with one of {' or '.join([*ex_opts, 'unknown'])} and nothing else.\nAnswer: {ex_ans}\n\n"
        user, suffix = example + ask + "\nAnswer:", ""
    else:
        user, suffix = ask, ""
    if lm.tokenizer.chat_template is not None:
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
        text = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        text += "Answer:" if fmt == "fewshot" else ""
    else:
        text = user + suffix
    start = text.rindex(ask)
    return text, (start, start + len(ask))


@dataclass
class Tokenised:
    ids: list[int]
    offsets: list[tuple[int, int]]
    subject: list[int]  # token indices overlapping the subject


def tokenise(lm: LoadedModel, text: str, subject_span: tuple[int, int]) -> Tokenised:
    enc = lm.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    subj = [i for i, (a, b) in enumerate(offsets) if a < subject_span[1] and b > subject_span[0]]
    return Tokenised(enc["input_ids"], offsets, subj)


def token_types(text: str, tok: Tokenised, query: tuple[int, int], fact: Fact, pair: Pair) -> list[str]:
    """Per token: subject_final, subject (not swept), relation, orig/new/other_answer_option, other."""
    types = ["other"] * len(tok.ids)
    prompt_start = query[0]
    prompt_end = prompt_start + len(fact.prompt)
    options_line = text.index("Respond with one of ", prompt_end) + len("Respond with one of ")
    spans = {}
    pos = options_line
    for opt in pair.options:
        pos = text.index(opt, pos)
        spans[opt] = (pos, pos + len(opt))
        pos += len(opt)
    for i, (a, b) in enumerate(tok.offsets):
        if i in tok.subject:
            types[i] = "subject_final" if i == tok.subject[-1] else "subject"
        elif prompt_start <= a and b <= prompt_end:
            types[i] = "relation"
        else:
            for opt, (s, e) in spans.items():
                if a < e and b > s:
                    if opt == pair.x.object:
                        types[i] = "orig_answer_option"
                    elif opt == pair.x_prime.object:
                        types[i] = "new_answer_option"
                    else:
                        types[i] = "other_answer_option"
    return types


def sweep_pair(
    lm: LoadedModel, pair: Pair, chunks: list[list[int]], cfg: PatchingConfig, pair_id: int
) -> tuple[list[dict], bool]:
    """All (chunk x aligned position) patches of one pair; returns (rows, clean answer is an option)."""
    text_x, query_x = render(lm, pair.x.prompt, pair.options, cfg.prompt_format)
    text_p, query_p = render(lm, pair.x_prime.prompt, pair.options, cfg.prompt_format)
    subj_x = query_x[0] + pair.x.template.index("{}")
    subj_p = query_p[0] + pair.x_prime.template.index("{}")
    tx = tokenise(lm, text_x, (subj_x, subj_x + len(pair.x.subject)))
    tp = tokenise(lm, text_p, (subj_p, subj_p + len(pair.x_prime.subject)))
    if not tx.subject or not tp.subject:
        return [], False
    first_x, last_x, first_p, last_p = tx.subject[0], tx.subject[-1], tp.subject[0], tp.subject[-1]
    if tx.ids[:first_x] != tp.ids[:first_p] or tx.ids[last_x + 1 :] != tp.ids[last_p + 1 :]:
        return [], False  # the subjects changed tokenisation outside themselves: no clean alignment
    types = token_types(text_x, tx, query_x, pair.x, pair)
    shift = len(tp.ids) - len(tx.ids)
    aligned = [
        (t, t if t < first_x else last_p if t == last_x else t + shift)
        for t in range(len(tx.ids))
        if types[t] != "subject"
    ]
    rng = random.Random(cfg.seed * 100003 + pair_id)
    if cfg.positions_per_pair is not None and len(aligned) > cfg.positions_per_pair:
        must = [a for a in aligned if types[a[0]] != "other"]  # keep every typed position, sample the rest
        rest = [a for a in aligned if types[a[0]] == "other"]
        aligned = sorted(must + rng.sample(rest, max(0, cfg.positions_per_pair - len(must))))
    h_prime = all_layers(lm, tp.ids)  # [n_layers, T', d]
    clean_x = clean_run(lm, tx.ids)  # x's greedy next token, and what every patched copy starts from
    clean = clean_x.token
    sweep = [(chunk, t, tprime) for chunk in chunks for t, tprime in aligned]
    patches = [(chunk, t, h_prime[chunk, tprime].mean(0)) for chunk, t, tprime in sweep]
    patched = next_tokens(lm, tx.ids, patches, cfg.batch_size, clean=clean_x)
    tok = lm.tokenizer
    strings = tok.convert_ids_to_tokens(tx.ids)
    decode = lambda i: tok.decode([i])  # noqa: E731
    option_first = {tok(" " + o, add_special_tokens=False)["input_ids"][0] for o in pair.options}
    option_first |= {tok(o, add_special_tokens=False)["input_ids"][0] for o in pair.options}
    rows = []
    for (chunk, t, tprime), (_, _, v), new in zip(sweep, patches, patched, strict=True):
        rows.append(gt_row(
            pair_id=pair_id, split=pair.split, relation=pair.x.relation, chunk=chunks.index(chunk),
            layer=chunk, input_text=text_x, input_tokens=[tok.decode([i]) for i in tx.ids],
            original_continuation=[decode(clean)], ablated_continuation=[decode(new)],
            original_token_id=clean, ablated_token_id=new, is_different=bool(new != clean),
            orig_pos=t, orig_text_token=tok.decode([tx.ids[t]]), counterfact_pos=tprime,
            counterfact_text_token=tok.decode([tp.ids[tprime]]), intervention_vector=v.float().cpu().numpy(),
            counterfactual_text=text_p, gt_original_target=pair.x.object,
            gt_counterfactual_target=pair.x_prime.object, options=list(pair.options),
            token_type=types[t], token_string=strings[t],
        ))  # fmt: skip
    return rows, clean in option_first


def balance(rows: list[dict], cap: int, seed: int) -> list[dict]:
    """Cap each (token type, chunk, changed) cell, then downsample the majority class to the minority's size."""
    rng = random.Random(seed)
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["token_type"], r["chunk"], r["is_different"]), []).append(r)
    kept = []
    for key in sorted(cells, key=str):
        group = cells[key]
        kept += rng.sample(group, min(cap, len(group)))
    changed = [r for r in kept if r["is_different"]]
    same = [r for r in kept if not r["is_different"]]
    n = min(len(changed), len(same))
    return rng.sample(changed, n) + rng.sample(same, n) if n else kept


def write_patching_gt(lm: LoadedModel, cfg: PatchingConfig, out: Dataset, progress=None) -> dict[str, Any]:
    """Sweep every pair (one shard per `pairs_per_shard` pairs, resumable), balance per split, mark complete."""
    facts = load_facts(cfg.facts)
    pairs = make_pairs(facts, cfg)
    if not pairs:
        raise UserInputError("patching.facts", "no relation offers 5 distinct objects", "add facts")
    chunks = layer_chunks(lm.n_layers, cfg.n_chunks)
    out.create({"stage": STAGE, "version": STAGE_VERSION, "config": cfg.model_dump(), "chunks": chunks})
    raw = Dataset(out.root, "patching_sweep", out.key)
    raw.create({"stage": STAGE, "version": STAGE_VERSION, "config": cfg.model_dump(), "chunks": chunks})
    per_shard = cfg.pairs_per_shard
    n_shards = -(-len(pairs) // per_shard)
    for shard in range(n_shards):
        if raw.shard_done(shard):
            continue
        rows, on_option = [], []
        for i in range(shard * per_shard, min(len(pairs), (shard + 1) * per_shard)):
            pair_rows, ok = sweep_pair(lm, pairs[i], chunks, cfg, i)
            rows += pair_rows
            on_option.append({"pair_id": i, "clean_is_option": ok, "swept": bool(pair_rows)})
        raw.write_shard(shard, _to_table(rows, lm.d_model))
        (raw.path / f"pairs-{shard:05d}.json").write_text(json.dumps(on_option))
        if progress:
            progress((shard + 1) / n_shards, f"{len(rows)} patches")
    raw.mark_complete({"pairs": len(pairs)})
    every = [r for t in raw.iter_shards() for r in t.to_pylist()]
    pair_meta = [m for p in sorted(raw.path.glob("pairs-*.json")) for m in json.loads(p.read_text())]
    swept = [m for m in pair_meta if m["swept"]]
    option_rate = sum(m["clean_is_option"] for m in swept) / max(1, len(swept))
    kept = []
    for split in ("train", "test"):
        kept += balance([r for r in every if r["split"] == split], cfg.cell_cap, cfg.seed)
    for r in kept:
        r["intervention_vector"] = np.asarray(r["intervention_vector"], dtype=np.float32)
    out.write_shard(0, _to_table(kept, lm.d_model))
    summary = {
        "pairs": len(pairs), "pairs_swept": len(swept), "clean_answer_is_option_rate": option_rate,
        "patches": len(every), "changed_rate_before_balancing": float(np.mean([r["is_different"] for r in every]) if every else 0),
        "rows": len(kept), "chunks": chunks, "prompt_format": cfg.prompt_format,
    }  # fmt: skip
    out.mark_complete(summary)
    return summary


def _to_table(rows: list[dict], d: int) -> pa.Table:
    if not rows:
        return pa.table({"pair_id": pa.array([], pa.int64())})
    vectors = np.stack([np.asarray(r["intervention_vector"], dtype=np.float32) for r in rows])
    cols = {k: [r[k] for r in rows] for k in rows[0] if k != "intervention_vector"}
    table = pa.table(cols)
    return table.append_column(
        "intervention_vector", pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), d)
    )


def patching_key(recipe: PatchingRecipe) -> str:
    return ground_truth_key(STAGE, STAGE_VERSION, recipe.target, recipe.patching, "patching")


ACT_PATCH_REQUIRED = ("layer", "input_tokens", "original_continuation", "ablated_continuation", "is_different")


def import_act_patch(path: str | Path, split: str = "train") -> list[dict[str, Any]]:
    """Public activation-patching rows (Transluce/act_patch_*, paper §4.4: layer, input_tokens,
    original_continuation, ablated_continuation, is_different, patch_position{orig_pos, orig_text_token,
    counterfact_pos, counterfact_text_token, intervention_vector}, counterfactual_text, gt_original_target,
    gt_counterfactual_target, token_type) as `patching_gt` rows, the input text detokenised from input_tokens."""
    rows = read_rows(path, "import.act_patch")
    require_columns(rows, ACT_PATCH_REQUIRED, "import.act_patch", path)
    out = []
    for i, r in enumerate(rows):
        pp = r.get("patch_position") or {}
        vector = pp.get("intervention_vector")
        if vector is None:
            raise UserInputError("import.act_patch", f"row {i} has no patch_position.intervention_vector", "keep it")
        out.append(gt_row(
            pair_id=i, split=split, relation=r.get("relation", ""), chunk=-1,
            layer=[int(x) for x in r["layer"]], input_text="".join(r["input_tokens"]),
            input_tokens=list(r["input_tokens"]), original_continuation=list(r["original_continuation"]),
            ablated_continuation=list(r["ablated_continuation"]), original_token_id=-1, ablated_token_id=-1,
            is_different=bool(r["is_different"]), orig_pos=int(pp.get("orig_pos", -1)),
            orig_text_token=pp.get("orig_text_token", ""), counterfact_pos=int(pp.get("counterfact_pos", -1)),
            counterfact_text_token=pp.get("counterfact_text_token", ""),
            intervention_vector=np.asarray(vector, dtype=np.float32),
            counterfactual_text=r.get("counterfactual_text", ""), gt_original_target=r.get("gt_original_target", ""),
            gt_counterfactual_target=r.get("gt_counterfactual_target", ""), options=[],
            token_type=r.get("token_type", "other"), token_string=pp.get("orig_text_token", ""),
        ))  # fmt: skip
    return out


@ground_truth_task(STAGE, patching_key, "patching", import_act_patch)
def patching_ground_truth(recipe: PatchingRecipe, out: Dataset) -> dict[str, Any]:
    """Sweep the counterfactual pairs and write the balanced `patching_gt` table."""
    progress = progress_reporter("patching-sweep", "activation-patching sweep")
    return write_patching_gt(models.load(recipe.target, frozen=True), recipe.patching, out, progress)
