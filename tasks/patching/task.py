"""Task B as an outcome task (tasks/outcomes/protocol.py): `patching_gt` rows become questions that carry the
chunk-mean vector v of x' and ask whether patching it into x changes the next token, and to what."""

import random
from collections.abc import Sequence

import numpy as np
import torch

from storage.errors import UserInputError
from storage.store import Dataset
from tasks.common import models
from tasks.common.models import LoadedModel
from tasks.explainer.model import SPAN, Explainer, Query
from tasks.explainer.projection import LayerStats, ProjectionFit, fit_projection, residual_stats
from tasks.outcomes.facts import load_facts
from tasks.outcomes.protocol import OutcomeTask, Row
from tasks.patching.config import PatchingRecipe
from tasks.patching.ground_truth import import_act_patch, layer_chunks, make_pairs, patching_key
from tasks.patching.prompts import DROP, PATCHING_TEMPLATES, ZERO_SHOT_PATCHING
from tasks.patching.sweep import all_layers


class Patching(OutcomeTask, name="patching", table="patching_gt", carries_vector=True, key=patching_key,
               importer=import_act_patch):  # fmt: skip
    def check_source(self, recipe: PatchingRecipe) -> None:
        """The layer chunks of the target, and the fact file: parsed, and paired."""
        layer_chunks(models.load_config(recipe.target).num_hidden_layers, recipe.patching.n_chunks)
        if not make_pairs(load_facts(recipe.patching.facts), recipe.patching):
            raise UserInputError("patching.facts", "no relation offers 5 distinct objects in both splits",
                                 "add facts: 5 or more objects per relation")  # fmt: skip

    def vector_sites(self, recipe: PatchingRecipe, imported: list[Row]) -> tuple[list[int], int, int]:
        """Off the imported rows, or off the target's config and the layer chunks (a vector is indexed by its
        chunk's first layer)."""
        if imported:
            firsts = sorted({r["layer"][0] for r in imported})
            n_layers = max(max(r["layer"]) for r in imported) + 1
            return firsts, n_layers, len(imported[0]["intervention_vector"])
        target = models.load_config(recipe.target)
        chunks = layer_chunks(target.num_hidden_layers, recipe.patching.n_chunks)
        return [chunk[0] for chunk in chunks], target.num_hidden_layers, target.hidden_size

    def dims(self, gt: Dataset) -> tuple[int, int]:
        """Read off the ground truth, so imported ground truth of any target works. The layer count comes from
        every row of both splits: a small training sample need not reach the deepest layer a test row names,
        and Π_ℓ must exist for every ℓ the explainer will be asked about."""
        first = next(gt.iter_shards(columns=["intervention_vector"]))  # one shard's vectors give the width
        top = max(max(layers) for t in gt.iter_shards(columns=["layer"]) for layers in t.column("layer").to_pylist())
        return len(first.column("intervention_vector")[0].as_py()), top + 1

    def vector_stats(self, gt: Dataset) -> LayerStats:
        """μ, σ of the train split's chunk-mean vectors per chunk (indexed, as Π is, by the chunk's first
        layer), and c = μ, so what is injected is a vector's own part (pairwise cosine ≈ 0.55 raw, ≈ 0.04
        centred). No label is read. Vectors taken at position 0, the attention sink whose norm is many times
        the rest, are left out, as the activation cache leaves them out."""
        by_layer: dict[int, list[np.ndarray]] = {}
        for t in gt.iter_shards(columns=["split", "layer", "counterfact_pos", "intervention_vector"]):
            for split, layers, pos, v in zip(*(t.column(c).to_pylist() for c in t.column_names), strict=True):
                by_layer.setdefault(layers[0], [])
                if split == "train" and pos != 0:
                    by_layer[layers[0]].append(np.asarray(v, dtype=np.float32))
        if empty := [layer for layer, vs in sorted(by_layer.items()) if not vs]:
            raise UserInputError("explainers.vector_norm", f"'layer_mean' has no training vector off position 0 "
                                 f"for the chunk at layer {empty[0]}", "use 'match', or ground truth that trains "
                                 "every chunk")  # fmt: skip
        return residual_stats({layer: {"activation": np.stack(vs)} for layer, vs in by_layer.items()}, True)

    def projection_fit(self, recipe: PatchingRecipe, gt: Dataset, explainer: Explainer) -> ProjectionFit:
        """Π of `projection: fitted`, without labels: the target's chunk-mean states at the tokens of the train
        split's prompts (x and x'; no continuation is read), paired with the explainer's tokens that end at the
        same character, fitted as the features flow fits its activation cache (tasks/explainer/projection.py).
        The vectors the explainer is asked about are such states, so Π is fitted on their own distribution,
        and centred by its mean (c = μ, as vector_stats centres them)."""
        columns = ["split", "layer", "input_text", "counterfactual_text"]
        train = [r for t in gt.iter_shards(columns=columns) for r in t.to_pylist() if r["split"] == "train"]
        chunks = sorted({tuple(r["layer"]) for r in train})
        texts = sorted({r[c] for r in train for c in ("input_text", "counterfactual_text")})
        cfg = explainer.cfg
        states, pieces = prompt_states(models.load(recipe.target, frozen=True), texts, chunks, cfg.fit_rows, cfg.seed)
        return fit_projection(explainer, states, pieces, cfg.fit_ridge, cfg.fit_rows, residual_inputs=True,
                              seed=cfg.seed)  # fmt: skip

    def gold(self, row: Row) -> tuple[bool, str]:
        """(changed, the patched run's next token)."""
        return bool(row["is_different"]), row["ablated_continuation"][0]

    def question(self, row: Row, mode: str, rng: random.Random) -> Query:
        """v = the chunk-mean vector; Π (if any) is indexed by the chunk's first layer."""
        template = rng.choice(PATCHING_TEMPLATES)
        fields = {"layer": ", ".join(str(x) for x in row["layer"]), "tokens": f"<{row['orig_text_token']}>",
                  "input": row["input_text"]}  # fmt: skip
        if mode == "zero_shot":
            template = ZERO_SHOT_PATCHING
        if mode in DROP:
            template = DROP[mode].sub("", template)
        vector = np.asarray(row["intervention_vector"], dtype=np.float32)
        if mode == "zero_vector":
            vector = np.zeros_like(vector)
        if mode == "no_activation":
            text, vector = template.format(feature="", **fields).replace("feature  at", "feature at"), None
        else:
            text = template.format(feature=SPAN, **fields)
        return Query(vector, int(row["layer"][0]), text, None, self.example_id(row))

    def example_id(self, row: Row) -> str:
        return f"pair{row['pair_id']}/c{row['chunk']}/t{row['orig_pos']}"


class PromptPieces:
    """The target's token strings of each prompt, behind an empty start piece, as `fit_projection` reads a
    context (`ContextTexts.tokens`): position p is the prompt's token p − 1."""

    def __init__(self, pieces: list[list[str]]) -> None:
        self._pieces = pieces

    def tokens(self, context_id: int) -> list[str]:
        return ["", *self._pieces[int(context_id)]]


@torch.inference_mode()
def prompt_states(
    lm: LoadedModel, texts: Sequence[str], chunks: Sequence[Sequence[int]], max_rows: int, seed: int
) -> tuple[dict[int, dict[str, np.ndarray]], PromptPieces]:
    """({chunk's first layer: `sae.layer_activations`-shaped arrays of the chunk-mean block outputs}, the
    prompts' token strings) at `max_rows` seeded token positions of `texts`, tokenised as the sweep tokenises
    them. The first token (the attention sink) and special tokens are left out: neither is text a token of
    another tokenizer ends on, and the sink's norm is many times the rest."""
    special = set(lm.tokenizer.all_special_ids)
    encoded = [lm.tokenizer(t, add_special_tokens=False, return_offsets_mapping=True) for t in texts]
    sites = [(c, i) for c, enc in enumerate(encoded) for i, tid in enumerate(enc["input_ids"])
             if i > 0 and tid not in special]  # fmt: skip
    keep = sorted(sites[j] for j in np.random.default_rng(seed).permutation(len(sites))[:max_rows])
    pieces = []
    for enc, text in zip(encoded, texts, strict=True):  # contiguous pieces: their ends are the offsets' ends
        ends = [b for _, b in enc["offset_mapping"]]
        pieces.append([text[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)])
    arrays: dict[int, dict[str, list]] = {c[0]: {"activation": [], "token_id": [], "context_id": [], "position": []}
                                          for c in chunks}  # fmt: skip
    for c in sorted({c for c, _ in keep}):
        at = [i for cc, i in keep if cc == c]
        h = all_layers(lm, encoded[c]["input_ids"])[:, at]  # [n_layers, P, d]
        for chunk in chunks:
            a = arrays[chunk[0]]
            a["activation"].append(h[list(chunk)].mean(0).cpu().numpy())  # [P, d]: v as the sweep computes it
            a["token_id"] += [encoded[c]["input_ids"][i] for i in at]
            a["context_id"] += [c] * len(at)
            a["position"] += [i + 1 for i in at]
    out = {layer: {"activation": np.concatenate(a["activation"]), **{k: np.asarray(a[k], dtype=np.int64)
           for k in ("token_id", "context_id", "position")}} for layer, a in arrays.items()}  # fmt: skip
    return out, PromptPieces(pieces)


PATCHING = Patching()
