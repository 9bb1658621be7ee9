"""Stage `saes`: SAE ground truth. Train TopK SAEs with sae-lens on the cached residual stream (or load
pretrained sae-lens SAEs), then write tables `features`, `feature_activations` and `exemplars`.

Training reads one layer's cached activations into memory (float16), scales them so the mean norm is √d
(the scale is stored; decoder directions do not depend on it), and runs sae-lens' own TopK training forward
pass and auxiliary dead-feature loss under Adam, renormalising decoder rows to unit norm after each step.
Exemplars are computed in DuckDB from the sparse long-format feature activations: per feature, the contexts
with the highest maximum activation.
"""

from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import torch

from storage.errors import UserInputError
from storage.store import Dataset
from tasks.features.config import SAETrainConfig

STAGE = "saes"
STAGE_VERSION = 2  # 2: a seed per layer


def layer_activations(acts: Dataset, layer: int) -> dict[str, np.ndarray]:
    """One layer of the cache: activation [N, d] (float16), context_id [N], position [N], token_id [N]."""
    table = (
        pads.dataset([str(p) for p in acts.shard_files()], format="parquet")
        .filter(pads.field("layer") == layer)
        .to_table(columns=["context_id", "position", "token_id", "activation"])
    )
    if table.num_rows == 0:
        raise UserInputError("cache.layers", f"layer {layer} is not in the activation cache", "cache it first")
    col = table.column("activation").combine_chunks()
    d = col.type.list_size
    values = col.values.to_numpy(zero_copy_only=False).reshape(-1, d)
    if not np.isfinite(values).all():
        raise UserInputError("activations", f"layer {layer} holds NaN/Inf activations", "recompute the cache")
    return {
        "activation": values,
        "context_id": table.column("context_id").to_numpy(),
        "position": table.column("position").to_numpy(),
        "token_id": table.column("token_id").to_numpy(),
    }


def layer_seed(seed: int, layer: int) -> int:
    """The SAE seed of one layer: every layer draws its own initialisation and batch order (with one seed for
    all, feature i of two layers started from the same direction)."""
    return int(np.random.SeedSequence([seed, layer]).generate_state(1)[0])


def train_topk_sae(
    x: np.ndarray, cfg: SAETrainConfig, device: torch.device, seed: int
) -> tuple[Any, float, dict[str, float]]:
    """Train a TopK SAE on x [N, d] from `seed`; returns (sae, input scale, quality metrics)."""
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    n, d = x.shape
    torch.manual_seed(seed)
    scale = float(np.sqrt(d) / np.linalg.norm(x[: min(n, 20000)].astype(np.float32), axis=1).mean())
    sae = TopKTrainingSAE(
        TopKTrainingSAEConfig(d_in=d, d_sae=cfg.expansion * d, k=cfg.k, dtype="float32", device=str(device))
    )
    with torch.no_grad():  # start b_dec at the data mean: the usual geometric-median shortcut
        sae.b_dec.copy_(torch.from_numpy(x[: min(n, 20000)].astype(np.float32).mean(0) * scale))
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    rng = np.random.default_rng(seed)
    steps_since_fired = torch.zeros(sae.cfg.d_sae, device=device)
    step = 0
    for _ in range(cfg.epochs):
        for idx in np.array_split(rng.permutation(n), max(1, n // cfg.batch_tokens)):
            batch = torch.from_numpy(x[np.sort(idx)].astype(np.float32) * scale).to(device)  # [b, d]
            out = sae.training_forward_pass(
                TrainStepInput(
                    sae_in=batch,
                    coefficients={},
                    dead_neuron_mask=steps_since_fired > 200,  # feeds the TopK auxiliary loss
                    n_training_steps=step,
                    is_logging_step=False,
                )
            )
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            with torch.no_grad():
                sae.W_dec.data /= sae.W_dec.data.norm(dim=1, keepdim=True).clamp_min(1e-8)  # unit directions
                fired = (out.feature_acts > 0).any(dim=0)
                steps_since_fired = torch.where(fired, 0, steps_since_fired + 1)
            step += 1
    return sae, scale, quality(sae, x, scale, device)


@torch.no_grad()
def encode(sae: Any, x: np.ndarray, scale: float, device: torch.device, chunk: int = 8192) -> tuple[np.ndarray, ...]:
    """Sparse codes of x [N, d]: (row [M], feature [M], value [M]) for every nonzero activation."""
    rows, feats, vals = [], [], []
    for start in range(0, len(x), chunk):
        acts = sae.encode(torch.from_numpy(x[start : start + chunk].astype(np.float32) * scale).to(device))
        r, f = torch.nonzero(acts > 0, as_tuple=True)
        rows.append(r.cpu().numpy() + start)
        feats.append(f.cpu().numpy())
        vals.append(acts[r, f].float().cpu().numpy())
    return np.concatenate(rows), np.concatenate(feats), np.concatenate(vals)


@torch.no_grad()
def quality(sae: Any, x: np.ndarray, scale: float, device: torch.device, chunk: int = 8192) -> dict[str, float]:
    """Explained variance (1 - SSE/SST over the scaled inputs), mean L0, and the fraction of dead features."""
    sse = sst = l0 = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=device)
    mean = torch.from_numpy(x.astype(np.float32).mean(0) * scale).to(device)
    for start in range(0, len(x), chunk):
        xb = torch.from_numpy(x[start : start + chunk].astype(np.float32) * scale).to(device)
        acts = sae.encode(xb)
        recon = sae.decode(acts)
        sse += float(((recon - xb) ** 2).sum())
        sst += float(((xb - mean) ** 2).sum())
        l0 += float((acts > 0).sum())
        fired |= (acts > 0).any(0)
    return {
        "sae_explained_variance": 1 - sse / sst,
        "sae_l0": l0 / len(x),
        "sae_dead_fraction": float((~fired).float().mean()),
    }


def load_sae(folder: Path, layer: int, device: torch.device) -> Any:
    """A pretrained sae-lens SAE from `folder/layer_<layer>` (cfg.json + sae_weights.safetensors)."""
    from sae_lens import SAE

    path = folder / f"layer_{layer}"
    if not (path / "cfg.json").is_file():
        raise UserInputError(
            "sae.load_from", f"{path} holds no sae-lens SAE (cfg.json)", "save one per layer as layer_<l>/"
        )
    return SAE.load_from_disk(str(path), device=str(device))


def write_sae_layer(
    acts: Dataset, layer: int, cfg: SAETrainConfig, out: Dataset, shard: int, device: torch.device
) -> dict[str, float]:
    """Train (or load) the SAE of one layer; write its features and sparse activations as shard `shard`."""
    data = layer_activations(acts, layer)
    x = data["activation"]
    if cfg.load_from:
        sae, scale = load_sae(Path(cfg.load_from), layer, device), 1.0
        metrics = quality(sae, x, scale, device)
    else:
        sae, scale, metrics = train_topk_sae(x, cfg, device, layer_seed(cfg.seed, layer))
    sae_dir = out.path / f"layer_{layer}"
    if hasattr(sae, "save_inference_model"):  # a training SAE saves its inference form
        sae.save_inference_model(sae_dir)
    else:
        sae.save_model(sae_dir)
    rows, feats, vals = encode(sae, x, scale, device)
    fa = pa.table(
        {
            "layer": pa.array(np.full(len(rows), layer, dtype=np.int16)),
            "feature_id": pa.array(feats.astype(np.int32)),
            "context_id": pa.array(data["context_id"][rows]),
            "position": pa.array(data["position"][rows]),
            "token_id": pa.array(data["token_id"][rows]),
            "value": pa.array(vals.astype(np.float32)),
        }
    )
    info = {"stage": STAGE, "version": STAGE_VERSION, "sae": cfg.model_dump()}
    for table in ("feature_activations", "features"):
        Dataset(out.root, table, out.key).create(info)
    Dataset(out.root, "feature_activations", out.key).write_shard(shard, fa)
    d_sae = sae.cfg.d_sae
    counts = np.bincount(feats, minlength=d_sae)
    maxima = np.zeros(d_sae, dtype=np.float32)
    np.maximum.at(maxima, feats, vals)
    w_dec = sae.W_dec.detach().float().cpu().numpy()  # [d_sae, d], unit rows
    features = pa.table(
        {
            "layer": pa.array(np.full(d_sae, layer, dtype=np.int16)),
            "feature_id": pa.array(np.arange(d_sae, dtype=np.int32)),
            "direction": pa.FixedSizeListArray.from_arrays(pa.array(w_dec.reshape(-1)), w_dec.shape[1]),
            "frequency": pa.array(counts / len(x)),
            "max_activation": pa.array(maxima),
            "input_scale": pa.array(np.full(d_sae, scale, dtype=np.float32)),
        }
    )
    Dataset(out.root, "features", out.key).write_shard(shard, features)
    return {**metrics, "tokens": float(len(x)), "d_sae": float(d_sae)}


def exemplars_sql(
    files: list[str], n_exemplars: int, relation: str | None = None, candidates: int | None = None
) -> str:
    """Per (layer, feature): the top contexts by max activation, with the position of that max, over the
    `feature_activations` shards `files` (or a SQL `relation` of the same columns).

    Why not group every row by (layer, feature, context) and rank: at 10M rows that makes ~9M groups, and the
    hash aggregate and the window over them are nearly all of the time (BENCHMARKS.md). Instead each feature's
    `candidates` largest values (default 4 × n_exemplars; a top-n aggregate over few groups) give a threshold t,
    and only rows ≥ t are grouped by context. That is exact whenever they span ≥ n_exemplars contexts: every
    context whose max is ≥ t keeps its max row, and every context left out has its max < t, below all of them.
    A feature whose candidate rows span fewer contexts (a feature that fires in bursts) is grouped in full."""
    source = relation or f"read_parquet({files})"
    k, m = int(n_exemplars), int(candidates or 4 * n_exemplars)
    return f"""
        with threshold as (
            select layer, feature_id, list_min(max(value, {m})) as t from {source} group by all
        ),
        candidate as (
            select layer, feature_id, context_id, max(value) as max_value, arg_max(position, value) as max_position
            from {source} join threshold using (layer, feature_id) where value >= t group by all
        ),
        bursty as (select layer, feature_id from candidate group by all having count(*) < {k}),
        per_context as (
            select * from candidate anti join bursty using (layer, feature_id)
            union all
            select layer, feature_id, context_id, max(value), arg_max(position, value)
            from {source} semi join bursty using (layer, feature_id) group by all
        )
        select layer, feature_id, context_id, max_value, max_position,
               row_number() over (partition by layer, feature_id order by max_value desc, context_id) as rank
        from per_context
        qualify rank <= {k}
        order by layer, feature_id, rank
        """


def write_exemplars(root: Path, key: str, n_exemplars: int) -> int:
    """Table `exemplars`: per feature, the top contexts by max activation (DuckDB over the sparse table)."""
    fa = Dataset(root, "feature_activations", key)
    files = [str(p) for p in fa.shard_files()]
    out = Dataset(root, "exemplars", key)
    out.create({"stage": STAGE, "version": STAGE_VERSION})
    table = duckdb.connect().sql(exemplars_sql(files, n_exemplars)).to_arrow_table()
    out.write_shard(0, table)
    out.mark_complete({"rows": table.num_rows})
    return table.num_rows
