"""Explain on demand: ask a trained explainer about something new.

Three things can be asked about, each at a target layer the explainer was trained on:
- a text: the target runs on it exactly as the activation cache did (the context-start token, then the text's
  tokens; the residual is the output of decoder block ℓ) and the residual at one position, or at every
  position (an "explanation lens" over the sentence), is handed to the explainer as the evaluation hands it
  an ACT vector: minus the layer's mean μ_ℓ when the explainer reads centred vectors;
- an SAE feature of the explainer's own ground truth (its decoder direction, as in training);
- any vector of the target's width (as given: a direction, like an SAE feature).

And a trained patching explainer: what replacing x's residual at a position, over a chunk of layers, by the
chunk-mean residual of x' would do to the next token (with `check`, beside the real outcome on the target).

A checkpoint is named by its key (the `dataset` column of the `explainers` table), by its folder, or as
"latest": the newest complete explainer of the task and role in the store.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import torch
from prefect import task

from storage.errors import UserInputError
from storage.store import Dataset, check_store, store_root
from tasks.common import models
from tasks.common.activations import residual_stream
from tasks.common.config import ModelConfig
from tasks.common.corpus import context_start_id
from tasks.common.orchestration import gpu_slot
from tasks.explainer import model as ex
from tasks.explainer.config import ExplainRecipe
from tasks.features.prompts import feature_queries

LATEST = "latest"


@dataclass(frozen=True)
class Checkpoint:
    """A trained explainer's checkpoint folder and what it records (explainer.json)."""

    key: str  # its dataset key under tables/explainers ('' for a folder given by path)
    path: Path  # the folder `Explainer.load` reads
    meta: dict[str, Any]

    @property
    def task(self) -> str:
        # Outcome checkpoints always recorded their task; features ones from before it was recorded did not.
        role = str(self.meta.get("role", ""))
        return self.meta.get("task") or ("calibration" if role.startswith("calibration/") else "features")

    @property
    def layers(self) -> list[int] | None:
        """The target layers it was trained on (None for checkpoints that predate the record)."""
        return self.meta.get("layers")

    def target(self, override: str | None = None) -> ModelConfig:
        """The target it explains: `override` (a model name) or the one its checkpoint records."""
        if override:
            return ModelConfig(name=override)
        if "target" not in self.meta:
            raise UserInputError("target", f"checkpoint {self.path} records no target model (trained before it "
                                 "was recorded)", "name the target (--target)")  # fmt: skip
        return ModelConfig.model_validate(self.meta["target"])


def find_checkpoint(
    home: str | Path | None, ref: str = LATEST, role: str = "self", task: str = "features"
) -> Checkpoint:
    """The `task` explainer `ref` names: a key of the `explainers` table, a checkpoint folder (or the dataset
    folder above it), or 'latest' (the newest complete `task` explainer of `role` in the store)."""
    root = check_store(home, "point --home (or $SELFEXPLAIN_HOME) at the store the explainer was trained in")
    if ref == LATEST:
        found = []
        for marker in (root / "tables" / "explainers").glob("*/_COMPLETE.json"):
            ck = _checkpoint(root, marker.parent.name, marker.parent / "checkpoint")
            if ck is not None and ck.task == task and ck.meta.get("role") == role and _plain(ck):
                found.append((json.loads(marker.read_text()).get("completed_at", 0.0), ck.key, ck))
        if not found:
            raise UserInputError("explainer", f"the store {root} holds no trained {task} explainer of role "
                                 f"{role!r}", f"run the {task} flow (or `make demo`) first, or pick another role")  # fmt: skip
        return max(found, key=lambda f: (f[0], f[1]))[2]
    path = Path(ref).expanduser()
    if path.is_dir():
        folder = path / "checkpoint" if (path / "checkpoint" / "explainer.json").is_file() else path
        ck = _checkpoint(root, "", folder)
    else:
        ck = _checkpoint(root, ref, root / "tables" / "explainers" / ref / "checkpoint") if ref.isalnum() else None
    if ck is None:
        raise UserInputError("explainer", f"{ref!r} is neither a checkpoint key of the store {root} nor a "
                             "checkpoint folder", "pick a key from `selfexplain sql \"select distinct dataset, "
                             "role from explainers\"`, or pass 'latest'")  # fmt: skip
    if ck.task != task:
        raise UserInputError("explainer", f"{ref!r} is a {ck.task} explainer", f"name a {task} explainer")
    return ck


def _plain(ck: Checkpoint) -> bool:
    """Not a control's or a prompt omission's twin: 'latest' picks the explainer a user means."""
    role = str(ck.meta.get("role", ""))
    return "/" not in role and ck.meta.get("variant", "trained") == "trained"


def _checkpoint(root: Path, key: str, folder: Path) -> Checkpoint | None:
    """The checkpoint in `folder`, if any. One that predates the record of its layers takes them from its
    ground truth's `features` dataset in the store (the layers its SAEs, hence its training features, span)."""
    if not (folder / "explainer.json").is_file():
        return None
    meta = json.loads((folder / "explainer.json").read_text())
    gt = Dataset(root, "features", str(meta.get("gt", "")))
    if "layers" not in meta and meta.get("gt") and gt.marked_complete():
        meta["layers"] = gt.summary().get("layers")
    return Checkpoint(key, folder, meta)


def _check_layer(ck: Checkpoint, layer: int) -> None:
    trained = ck.layers
    if trained is None:  # older checkpoints: any layer of the target it was built for
        trained = list(range(int(ck.meta["n_target_layers"])))
    if layer not in trained:
        raise UserInputError("layer", f"{layer} is not a layer this explainer was trained on ({trained})",
                             f"use one of {trained}")  # fmt: skip


def describe(explainer: ex.Explainer, vectors: np.ndarray, layers: list[int], seed: int | None = None) -> list[str]:
    """One description per vector (vectors [N, d_target], as the explainer reads them), greedy, with the
    explainer's own templates drawn by a seeded RNG (its training seed: the same question for the same input)."""
    cfg = explainer.cfg
    ids = [f"ask{i}" for i in range(len(layers))]
    queries = feature_queries(vectors, layers, [None] * len(layers), ids, explainer.chat,
                                 cfg.seed if seed is None else seed)  # fmt: skip
    return explainer.generate(queries, cfg.max_new_tokens, cfg.eval_batch_size)


def _positions(ck: Checkpoint, text: str, position: int | str, target: str | None) -> list[int]:
    """The token indices of `text` asked for (checked with the target's tokenizer alone, before any model
    loads), after checking the layer and the target's width against the checkpoint."""
    target_cfg = ck.target(target)
    width = models.load_config(target_cfg).hidden_size
    if width != int(ck.meta["d_target"]):
        raise UserInputError("target", f"{target_cfg.name} has width {width}, the explainer reads "
                             f"{ck.meta['d_target']}", "name the target the explainer was trained on")  # fmt: skip
    n = len(models.load_tokenizer(target_cfg)(text, add_special_tokens=False)["input_ids"])
    if n == 0:
        raise UserInputError("text", "the text has no tokens", "give some text")
    if position == "all":
        return list(range(n))
    if not -n <= int(position) < n:
        raise UserInputError("position", f"{position} is outside the text's {n} tokens",
                             f"use -{n} to {n - 1}, or 'all'")  # fmt: skip
    return [int(position) % n]


def text_residuals(target: models.LoadedModel, text: str, layer: int) -> tuple[list[str], np.ndarray]:
    """(tokens [T], residuals [T, d] float32) of `text` at the output of block `layer`, run as the activation
    cache runs a context: the context-start token first (not returned), then the text's tokens."""
    tok = target.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    input_ids = torch.tensor([[context_start_id(tok), *ids]])  # [1, 1 + T]
    h = residual_stream(target, input_ids, [layer])[layer][0, 1:].float().cpu().numpy()  # [T, d]
    return [tok.decode([i]) for i in ids], h


def _centre(explainer: ex.Explainer, layer: int, h: np.ndarray) -> np.ndarray:
    """A whole residual as the explainer reads it: minus μ_ℓ when its vector form reads centred residuals
    (vector_norm 'layer_mean' keeps μ_ℓ in its checkpoint); as it is for a plain ('match') explainer."""
    if explainer.on_manifold:
        return h - explainer.layer_mean[layer].cpu().numpy()
    if explainer.fitted:
        raise UserInputError("text", "this explainer (projection 'fitted', vector_norm 'match') reads residuals "
                             "centred by the layer mean of its cache, which its checkpoint does not keep",
                             "ask about a feature or a vector, or use a vector_norm 'layer_mean' explainer")  # fmt: skip
    return h


def explain_text(ck: Checkpoint, text: str, layer: int, position: int | str = -1,
                 target: str | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Rows (layer, position, token, explanation): the residual of `text` at `layer` and `position` (an index
    into the text's tokens, negative from the end, or 'all' for every token) explained."""
    _check_layer(ck, layer)
    picked = _positions(ck, text, position, target)
    explainer = ex.Explainer.load(ck.path)
    lm = models.load(ck.target(target), frozen=True)
    tokens, h = text_residuals(lm, text, layer)
    del lm
    vectors = _centre(explainer, layer, h[picked])
    said = describe(explainer, vectors, [layer] * len(picked))
    return [{"layer": layer, "position": p, "token": tokens[p], "explanation": s}
            for p, s in zip(picked, said, strict=True)]  # fmt: skip


def explain_feature(ck: Checkpoint, home: str | Path | None, layer: int, feature_id: int) -> list[dict[str, Any]]:
    """One row (layer, feature_id, label, explanation): an SAE feature of the explainer's ground truth, with
    its auto-interp label where it has one."""
    direction, label = _feature(ck, home, layer, feature_id)
    said = describe(ex.Explainer.load(ck.path), direction[None], [layer])
    return [{"layer": layer, "feature_id": feature_id, "label": label, "explanation": said[0]}]


def _feature(ck: Checkpoint, home: str | Path | None, layer: int, feature_id: int) -> tuple[np.ndarray, str | None]:
    """(decoder direction [d], auto-interp label or None) of an SAE feature of the explainer's ground truth."""
    _check_layer(ck, layer)
    root = store_root(home)
    gt = str(ck.meta.get("gt", ""))
    feats = Dataset(root, "features", gt)
    if not gt or not feats.intact():
        raise UserInputError("feature", f"the features ground truth of this explainer ({gt or 'none recorded'}) "
                             f"is not in the store {root}", "point --home at the store it was trained in")  # fmt: skip
    labels = Dataset(root, "feature_labels", gt).shard_files()
    con = duckdb.connect()
    row = con.execute(f"select direction from read_parquet({[str(p) for p in feats.shard_files()]}) "
                      "where layer = ? and feature_id = ?", [layer, feature_id]).fetchone()  # fmt: skip
    if row is None:
        n = con.execute(f"select count(*) from read_parquet({[str(p) for p in feats.shard_files()]}) where layer = ?",
                        [layer]).fetchone()[0]  # fmt: skip
        raise UserInputError("feature", f"layer {layer} has no SAE feature {feature_id} ({n} features)",
                             f"use an id from 0 to {n - 1}")  # fmt: skip
    label = con.execute(f"select label from read_parquet({[str(p) for p in labels]}) where layer = ? and "
                        "feature_id = ?", [layer, feature_id]).fetchone() if labels else None  # fmt: skip
    return np.asarray(row[0], dtype=np.float32), label[0] if label else None


def read_vector(path: str | Path) -> np.ndarray:
    """The vector of a .npy file (no pickles: a .npy of objects is refused)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserInputError("vector", f"{p} is not a file", "save the vector with numpy.save")
    try:
        v = np.load(p, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise UserInputError("vector", f"{p} is not a .npy array of numbers ({str(exc).splitlines()[0]})",
                             "save the vector with numpy.save") from None  # fmt: skip
    if not isinstance(v, np.ndarray) or not np.issubdtype(v.dtype, np.number):
        raise UserInputError("vector", f"{p} holds no array of numbers", "save a numeric 1-d array")
    return v


def explain_vector(ck: Checkpoint, vector: np.ndarray, layer: int) -> list[dict[str, Any]]:
    """One row (layer, explanation): any vector of the target's width, read as a direction."""
    v = _checked_vector(ck, vector, layer)
    return [{"layer": layer, "explanation": describe(ex.Explainer.load(ck.path), v[None], [layer])[0]}]


def _checked_vector(ck: Checkpoint, vector: np.ndarray, layer: int) -> np.ndarray:
    _check_layer(ck, layer)
    v = np.asarray(vector, dtype=np.float32)
    d = int(ck.meta["d_target"])
    if v.shape != (d,):
        raise UserInputError("vector", f"has shape {list(v.shape)}, the explainer reads vectors of width {d}",
                             f"save a 1-d array of {d} numbers")  # fmt: skip
    if not np.isfinite(v).all():
        raise UserInputError("vector", "holds a NaN or an infinity", "save finite numbers")
    return v


# -- patching: what would replacing x's residual at a position, over a chunk of layers, do? --------------


def chunks_of(ck: Checkpoint, root: Path) -> list[list[int]]:
    """The layer chunks of a patching explainer's ground truth, in order (read from its rows)."""
    gt = Dataset(root, "patching_gt", str(ck.meta.get("gt", "")))
    if not gt.marked_complete():
        raise UserInputError("explainer", f"its patching ground truth ({gt.key}) is not in the store {root}",
                             "point --home at the store it was trained in")  # fmt: skip
    rows = duckdb.connect().execute(f"select distinct layer from read_parquet({[str(p) for p in gt.shard_files()]})")
    return sorted((list(r[0]) for r in rows.fetchall()), key=lambda c: c[0])


def _patch_site(ck: Checkpoint, root: Path, recipe: ExplainRecipe) -> tuple[list[int], list[int], list[int], int, int]:
    """(chunk layers, ids of x, ids of x', t, t'), every index checked against the texts' tokens."""
    chunks = chunks_of(ck, root)
    if recipe.chunk >= len(chunks):
        raise UserInputError("chunk", f"{recipe.chunk} is not a chunk of this explainer ({len(chunks)}: "
                             f"{chunks})", f"use 0 to {len(chunks) - 1}")  # fmt: skip
    tok = models.load_tokenizer(ck.target(recipe.target))
    ids = {name: tok(getattr(recipe, name), add_special_tokens=False)["input_ids"]
           for name in ("text", "counterfactual_text")}  # fmt: skip
    t_p = recipe.position if recipe.counterfactual_position is None else recipe.counterfactual_position
    at = {}
    for name, index, field in (("text", recipe.position, "position"), ("counterfactual_text", t_p,
                                                                          "counterfactual_position")):  # fmt: skip
        n = len(ids[name])
        if not -n <= int(index) < n:
            raise UserInputError(field, f"{index} is outside the {n} tokens of {name}", f"use -{n} to {n - 1}")
        at[name] = int(index) % n
    return chunks[recipe.chunk], ids["text"], ids["counterfactual_text"], at["text"], at["counterfactual_text"]


def explain_patch(ck: Checkpoint, recipe: ExplainRecipe) -> list[dict[str, Any]]:
    """One row: the patching explainer's predicted outcome of patching x (`text`) at `position` with the
    chunk-mean residual of x' at `counterfactual_position` (v exactly as the sweep computes it), and with
    `check` the real outcome of that patch on the target beside it."""
    from tasks.outcomes.answers import target
    from tasks.patching.sweep import all_layers, clean_run, next_tokens
    from tasks.patching.task import PATCHING

    root = store_root(recipe.home)
    layers, ids, ids_p, t, t_p = _patch_site(ck, root, recipe)
    lm = models.load(ck.target(recipe.target), frozen=True)
    v = all_layers(lm, ids_p)[layers, t_p].mean(0)  # [d]: mean over the chunk of h_l(x')[t']
    tok = lm.tokenizer
    decode = lambda i: tok.decode([i])  # noqa: E731
    row = {"pair_id": "asked", "chunk": recipe.chunk, "orig_pos": t, "layer": layers, "input_text": recipe.text,
           "orig_text_token": decode(ids[t]), "intervention_vector": v.cpu().numpy()}  # fmt: skip
    out = {"chunk": recipe.chunk, "layers": f"{layers[0]}-{layers[-1]}", "position": t, "token": decode(ids[t]),
           "counterfactual_token": decode(ids_p[t_p])}  # fmt: skip
    if recipe.check:
        clean = clean_run(lm, ids)
        patched = next_tokens(lm, ids, [(layers, t, v)], 1, clean=clean)[0]
        out["real_outcome"] = target(patched != clean.token, decode(patched))
    del lm
    explainer = ex.Explainer.load(ck.path)
    (query,) = PATCHING.queries([row], "trained", explainer.cfg.seed, with_answer=False)
    out["explanation"] = explainer.generate([query], explainer.cfg.max_new_tokens, 1)[0]
    return [out]


def check_recipe(recipe: ExplainRecipe) -> Checkpoint:
    """Everything a question can get wrong, before a model loads: the checkpoint, the layer, the text's
    position (with the target's tokenizer), the feature, the vector file and its width."""
    if recipe.counterfactual_text is not None:
        ck = find_checkpoint(recipe.home, recipe.explainer, recipe.role, task="patching")
        _patch_site(ck, store_root(recipe.home), recipe)
        return ck
    ck = find_checkpoint(recipe.home, recipe.explainer, recipe.role)
    if recipe.text is not None:
        _check_layer(ck, recipe.layer)
        _positions(ck, recipe.text, recipe.position, recipe.target)
    elif recipe.feature is not None:
        _feature(ck, recipe.home, *map(int, recipe.feature.split("/")))
    else:
        _checked_vector(ck, read_vector(recipe.vector), recipe.layer)
    return ck


def run(recipe: ExplainRecipe) -> list[dict[str, Any]]:
    """The explanation rows `recipe` asks for (see the module docstring)."""
    ck = check_recipe(recipe)
    if recipe.counterfactual_text is not None:
        return explain_patch(ck, recipe)
    if recipe.text is not None:
        return explain_text(ck, recipe.text, recipe.layer, recipe.position, recipe.target)
    if recipe.feature is not None:
        return explain_feature(ck, recipe.home, *map(int, recipe.feature.split("/")))
    return explain_vector(ck, read_vector(recipe.vector), recipe.layer)


@task(name="explain", retries=0)
def explain_task(recipe: ExplainRecipe) -> list[dict[str, Any]]:
    """`run` holding the accelerator slot (it loads the explainer, and the target for a text)."""
    with gpu_slot():
        return run(recipe)
