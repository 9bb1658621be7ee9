"""Fitted Π (`projection: fitted`): a label-free linear map from the target's layer-ℓ residual stream into the
explainer's token-embedding space, fitted by ridge regression on the activation cache, then trained on (the
paper's "pretrained Π").

Pairs: the target's residual h_ℓ(x)_t at a cached position t of a corpus context x, and the explainer's input
embedding E[t'] of its own token t' that ends at the same character of the same text (one tokenizer: t' = t;
two: `alignment.pair_tokens`, as the alignment diagnostics pair them). So the map learns where the target's
state of a token lies relative to the explainer's embedding of that token, with no label anywhere.

The fit is centred (Π maps h − μ_ℓ to E − μ_E) and weighs every token *type* the same, so it is not the map of
the twenty most frequent tokens. Its ridge penalty is relative: λ = `fit_ridge` x the mean variance of a
coordinate of h. At injection (`Explainer.project`) u = μ_E + s · unit(Π_ℓ (v − c_ℓ)): back on the embeddings'
manifold (every real embedding carries μ_E; a bare direction does not) at s, the mean norm of E − μ_E.
c_ℓ = μ_ℓ for vectors that are residuals (calibration) and 0 for directions (an SAE decoder row is a difference
of residuals, centred already): the task says which.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tasks.common.corpus import ContextTexts
from tasks.explainer import alignment


@dataclass
class ProjectionFit:
    """What `Explainer.set_fitted_projection` installs: Π per fitted target layer, and the two centres."""

    proj: dict[int, np.ndarray]  # layer -> Π_ℓ [d_E, d_M]
    in_mean: dict[int, np.ndarray]  # layer -> c_ℓ [d_M]: μ_ℓ for residual inputs, zeros for directions
    out_mean: dict[int, np.ndarray]  # layer -> μ_E [d_E] over that layer's paired tokens (type-weighted)
    out_norm: dict[int, float]  # layer -> s: the mean |E[t'] − μ_E| over them
    n_pairs: dict[int, int]  # layer -> (position, token) pairs the fit used


def ridge(x: np.ndarray, y: np.ndarray, w: np.ndarray, penalty: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(W [d_y, d_x], μ_x [d_x], μ_y [d_y]) minimising Σ_i w_i |(y_i − μ_y) − W (x_i − μ_x)|² + λ |W|², weighted
    means μ, λ = penalty x trace(C_x) / d_x (C_x the weighted covariance). x [N, d_x], y [N, d_y], w [N] ≥ 0."""
    w = w / w.sum()
    mu_x, mu_y = w @ x, w @ y
    xc, yc = x - mu_x, y - mu_y
    cxx = (xc * w[:, None]).T @ xc  # [d_x, d_x]
    cxy = (xc * w[:, None]).T @ yc  # [d_x, d_y]
    lam = penalty * np.trace(cxx) / x.shape[1]
    return np.linalg.solve(cxx + lam * np.eye(x.shape[1]), cxy).T, mu_x, mu_y


def type_weights(token_ids: np.ndarray) -> np.ndarray:
    """[N]: 1 / (occurrences of the row's token type), so each type weighs the same in the fit."""
    _, inverse, counts = np.unique(token_ids, return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse]


def paired_explainer_ids(
    context_id: np.ndarray, position: np.ndarray, texts: ContextTexts, tokenizer
) -> tuple[np.ndarray, np.ndarray]:
    """(rows [P] of the cache, explainer token ids [P]): the cached positions whose target token ends at the
    same character as one of the explainer's tokens on the context's text (position 0, the context's start
    token, is not text and pairs with nothing)."""
    rows, ids = [], []
    by_context: dict[int, dict[int, int]] = {}
    for c in np.unique(context_id):
        pieces = texts.tokens(int(c))[1:]
        enc = tokenizer("".join(pieces), add_special_tokens=False, return_offsets_mapping=True)
        ends = [e for _, e in enc["offset_mapping"]]
        by_context[int(c)] = {t + 1: enc["input_ids"][j] for t, j in alignment.pair_tokens(pieces, ends)}
    for i, (c, p) in enumerate(zip(context_id.tolist(), position.tolist(), strict=True)):
        if (tid := by_context[c].get(p)) is not None:
            rows.append(i)
            ids.append(tid)
    return np.asarray(rows, dtype=np.int64), np.asarray(ids, dtype=np.int64)


def fit_projection(
    explainer,
    layers: dict[int, dict[str, np.ndarray]],
    texts: ContextTexts,
    penalty: float,
    max_rows: int,
    residual_inputs: bool,
    seed: int,
    exclude_token_ids: Sequence[int] = (),
) -> ProjectionFit:
    """Fit Π_ℓ for every layer of `layers` (layer -> `sae.layer_activations` arrays) into `explainer`'s
    embedding space; at most `max_rows` seeded rows per layer, none whose target token is in
    `exclude_token_ids` (the calibration's test types: never fit on what is tested). Under the rotated-basis
    control the inputs are Qh, so the fit absorbs Q."""
    embed = explainer.model.get_input_embeddings()
    exclude = np.asarray(sorted(set(exclude_token_ids)), dtype=np.int64)
    rng = np.random.default_rng(seed)
    fit = ProjectionFit({}, {}, {}, {}, {})
    for layer, data in sorted(layers.items()):
        keep = np.flatnonzero(~np.isin(data["token_id"], exclude))
        keep = np.sort(rng.permutation(keep)[:max_rows])
        rows, ids = paired_explainer_ids(data["context_id"][keep], data["position"][keep], texts, explainer.tokenizer)
        if len(rows) < 2:
            raise ValueError(f"layer {layer}: {len(rows)} cached positions pair with an explainer token")
        h = torch.from_numpy(data["activation"][keep[rows]].astype(np.float32))  # [P, d_M]
        if explainer.rotation is not None:
            h = h @ explainer.rotation.cpu().T  # [P, d_M]: Qh
        with torch.no_grad():
            e = embed(torch.as_tensor(ids, device=embed.weight.device)).float().cpu().numpy()  # [P, d_E]
        w = type_weights(data["token_id"][keep[rows]])
        pi, mu_h, mu_e = ridge(h.double().numpy(), e.astype(np.float64), w, penalty)
        fit.proj[layer] = pi.astype(np.float32)
        fit.in_mean[layer] = (mu_h if residual_inputs else np.zeros_like(mu_h)).astype(np.float32)
        fit.out_mean[layer] = mu_e.astype(np.float32)
        fit.out_norm[layer] = float((w / w.sum()) @ np.linalg.norm(e - mu_e, axis=1))
        fit.n_pairs[layer] = len(rows)
    return fit


@dataclass
class LayerStats:
    """What `Explainer.set_layer_stats` installs under vector_norm 'layer_mean': where the target's layer-ℓ
    residuals lie, so a vector can be written as a state of that layer (u = μ_ℓ + s σ_ℓ unit(v − c_ℓ))."""

    mean: dict[int, np.ndarray]  # layer -> μ_ℓ [d_M]: the mean cached residual
    spread: dict[int, float]  # layer -> σ_ℓ: the median |h − μ_ℓ|, the size of a residual's own part
    centre: dict[int, np.ndarray]  # layer -> c_ℓ [d_M]: μ_ℓ for residual inputs, zeros for directions


def residual_stats(layers: dict[int, dict[str, np.ndarray]], residual_inputs: bool) -> LayerStats:
    """μ_ℓ and σ_ℓ of every layer of `layers` (layer -> `sae.layer_activations` arrays). The cache holds no
    position 0 (the attention sink, whose norm is many times the rest), so neither is pulled by it."""
    stats = LayerStats({}, {}, {})
    for layer, data in sorted(layers.items()):
        h = data["activation"].astype(np.float32)  # [N, d_M]
        mu = h.mean(axis=0)
        stats.mean[layer] = mu
        stats.spread[layer] = float(np.median(np.linalg.norm(h - mu, axis=1)))
        stats.centre[layer] = mu if residual_inputs else np.zeros_like(mu)
    return stats
