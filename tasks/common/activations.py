"""Stage `activations`: the residual stream of a model at chosen layers, streamed into Parquet shards.

Rows are (layer, context_id, position, token_id, activation[d]); each shard holds the contexts of one `tokens`
shard, layer-major, so DuckDB can skip row groups by layer. Memory holds one shard at a time whatever the
token count. The forward pass stops after the deepest requested block: no later block and no LM head runs.
"""

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, Field

from storage.errors import UserInputError
from storage.hashing import config_hash
from storage.store import Dataset, check_store
from tasks.common import corpus, models
from tasks.common.config import CacheConfig, CacheRecipe
from tasks.common.corpus import read_token_shard
from tasks.common.models import LoadedModel, decoder_layers
from tasks.common.orchestration import complete_or, stage_task

STAGE = "activations"
STAGE_VERSION = 1
STORAGE_DTYPES = {"float16": (torch.float16, pa.float16()), "float32": (torch.float32, pa.float32())}


def check_layers(layers: list[int], n_layers: int, model_name: str) -> None:
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise UserInputError(
            "cache.layers",
            f"layer {bad[0]} is out of range for {model_name} ({n_layers} layers)",
            f"use layers between 0 and {n_layers - 1}",
        )


class _StopForward(Exception):
    """Raised by the hook on the deepest requested block: nothing after it needs computing."""


@torch.inference_mode()
def residual_stream(lm: LoadedModel, input_ids: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """{layer: hidden [B, L, d]}: the output of decoder block `layer` (HF hidden_states[layer + 1])."""
    blocks = decoder_layers(lm.model)
    deepest = max(layers)
    captured: dict[int, torch.Tensor] = {}

    def make_hook(layer: int):
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            captured[layer] = output[0] if isinstance(output, tuple) else output
            if layer == deepest:
                raise _StopForward

        return hook

    handles = [blocks[layer].register_forward_hook(make_hook(layer)) for layer in layers]
    try:
        with lm.runtime.autocast_context():
            lm.model.get_decoder()(input_ids=input_ids.to(lm.runtime.device), use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return captured


def select_positions(cfg: CacheConfig, context_ids: np.ndarray, length: int) -> np.ndarray:
    """Positions stored per context, [c, P]: all of skip_first..L-1, or P of them sampled per context.

    Sampling is seeded by (seed, context_id), so a context gets the same positions whatever shard or batch
    it falls in.
    """
    candidates = np.arange(cfg.skip_first, length)
    if len(candidates) == 0:
        raise UserInputError("cache.skip_first", f"skips all {length} positions", "lower it below context_length")
    if cfg.positions_per_context is None:
        return np.tile(candidates, (len(context_ids), 1))
    if cfg.positions_per_context > len(candidates):
        raise UserInputError(
            "cache.positions_per_context",
            f"{cfg.positions_per_context} asked but contexts have {len(candidates)} storable positions",
            f"use at most {len(candidates)}",
        )
    rows = [
        np.sort(np.random.default_rng([cfg.seed, int(c)]).choice(candidates, cfg.positions_per_context, replace=False))
        for c in context_ids
    ]
    return np.stack(rows)


def activation_shard(lm: LoadedModel, cfg: CacheConfig, context_ids: np.ndarray, ids: np.ndarray) -> pa.Table:
    """The Arrow table of one shard: contexts `context_ids` with token ids `ids` [c, L]."""
    torch_dtype, arrow_dtype = STORAGE_DTYPES[cfg.dtype]
    c, length = ids.shape
    positions = select_positions(cfg, context_ids, length)  # [c, P]
    n_pos = positions.shape[1]
    per_layer: dict[int, list[np.ndarray]] = {layer: [] for layer in cfg.layers}
    for start in range(0, c, cfg.batch_size):
        batch = torch.tensor(ids[start : start + cfg.batch_size], dtype=torch.long)  # [B, L]
        pos = torch.tensor(
            positions[start : start + cfg.batch_size], dtype=torch.long, device=lm.runtime.device
        )  # [B, P]
        hidden = residual_stream(lm, batch, cfg.layers)
        for layer in cfg.layers:
            h = hidden[layer]  # [B, L, d]
            picked = torch.gather(h, 1, pos.unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # [B, P, d]
            per_layer[layer].append(picked.to(torch_dtype).cpu().numpy())
    d = lm.d_model
    token_ids = np.take_along_axis(ids, positions, axis=1).reshape(-1)  # [c*P]
    ctx = np.repeat(context_ids, n_pos)
    columns: dict[str, list[pa.Array]] = {k: [] for k in ("layer", "context_id", "position", "token_id", "activation")}
    for layer in cfg.layers:
        acts = np.concatenate(per_layer[layer]).reshape(-1)  # [c*P*d]
        columns["layer"].append(pa.array(np.full(c * n_pos, layer, dtype=np.int16)))
        columns["context_id"].append(pa.array(ctx.astype(np.int64)))
        columns["position"].append(pa.array(positions.reshape(-1).astype(np.int32)))
        columns["token_id"].append(pa.array(token_ids.astype(np.int32)))
        columns["activation"].append(pa.FixedSizeListArray.from_arrays(pa.array(acts, arrow_dtype), d))
    return pa.table({k: pa.concat_arrays(v) for k, v in columns.items()})


def write_activations(lm: LoadedModel, cfg: CacheConfig, tokens: Dataset, out: Dataset) -> dict[str, Any]:
    """Cache the residual stream for every `tokens` shard not yet in `out`'s manifest; mark `out` complete."""
    check_layers(cfg.layers, lm.n_layers, lm.resolved.name)
    if out.complete_or_invalidate():
        return {**out.summary(), "shards_written": 0, "shards_skipped": out.summary()["shards"]}
    length = tokens.summary()["context_length"]
    out.create(
        {
            "stage": STAGE,
            "version": STAGE_VERSION,
            "model": lm.resolved.identity,
            "precision": lm.runtime.precision,
            "tokens": tokens.key,
            "config": cfg.model_dump(),
        }
    )
    written = skipped = 0
    token_files = tokens.shard_files()
    for shard, path in enumerate(token_files):
        if out.shard_done(shard):
            skipped += 1
            continue
        context_ids, ids = read_token_shard(Path(path), length)
        out.write_shard(shard, activation_shard(lm, cfg, context_ids, ids))
        written += 1
    rows = sum(r["rows"] for r in out.manifest())
    summary = {
        "shards": len(token_files),
        "rows": rows,
        "layers": cfg.layers,
        "d_model": lm.d_model,
        "tokens": rows // len(cfg.layers),
    }
    out.mark_complete(summary)
    return {**summary, "shards_written": written, "shards_skipped": skipped}


class CachePlan(BaseModel):
    """Everything the cache flow decided before writing anything: where, what, under which keys."""

    home: str = Field(description="Store root.")
    model_identity: str = Field(description="Model name and content hash of its weights.")
    precision: str = Field(description="Weight dtype and autocast the activations are computed in.")
    n_layers: int = Field(description="Decoder blocks in the model.")
    tokens_key: str = Field(description="Dataset key of the tokenised corpus.")
    activations_key: str = Field(description="Dataset key of the activation cache.")


def plan_cache(recipe: CacheRecipe) -> CachePlan:
    """Validate a cache recipe against the store, the model and the corpus (no weights loaded, nothing written to
    the store): the cheap checks first, the corpus's size last: a bound from its bytes, then (unless the store
    holds its tokens already) the exact count, tokenised once for the check and the run."""
    home = check_store(recipe.home)
    resolved = models.resolve(recipe.model)
    config = models.load_config(recipe.model)
    check_layers(recipe.cache.layers, config.num_hidden_layers, recipe.model.name)
    corpus.check_source(recipe.corpus)
    if recipe.cache.skip_first >= recipe.corpus.context_length:
        raise UserInputError(
            "cache.skip_first", f"skips all {recipe.corpus.context_length} positions", "lower it below context_length"
        )
    corpus.check_size(recipe.corpus)
    precision = models.resolve_runtime(recipe.model).precision
    tokens = corpus.tokens_key(recipe.corpus, resolved.identity, recipe.cache.contexts_per_shard)
    if not corpus.tokens_dataset(str(home), tokens).marked_complete():
        corpus.check_tokens(models.load_tokenizer(recipe.model), recipe.corpus)
    cache = recipe.cache.model_dump(exclude={"batch_size"})  # batch size changes speed, not the result
    key = config_hash(
        STAGE, STAGE_VERSION, {"model": resolved.identity, "precision": precision, "tokens": tokens, "cache": cache}
    )
    return CachePlan(
        home=str(home),
        model_identity=resolved.identity,
        precision=precision,
        n_layers=config.num_hidden_layers,
        tokens_key=tokens,
        activations_key=key,
    )


def activations_dataset(plan: CachePlan) -> Dataset:
    return Dataset(Path(plan.home), STAGE, plan.activations_key)


@stage_task("cache-residual-stream", gpu=True, output=lambda p: activations_dataset(p["plan"]))
def cache_residual_stream(recipe: CacheRecipe, plan: CachePlan) -> dict[str, Any]:
    """Load the model and cache its residual stream over the tokenised corpus."""
    out = activations_dataset(plan)
    tokens = corpus.tokens_dataset(plan.home, plan.tokens_key)
    return complete_or(
        out, lambda: write_activations(models.load(recipe.model, frozen=True), recipe.cache, tokens, out)
    )
