"""Privileged-access diagnostics (paper §3.8, Table 4): how closely an explainer's own hidden states follow
the target's on the same text. Two `metrics` rows per trained explainer (task `alignment`, split `test`):

dot_product_similarity   mean over contexts x, cached layers ℓ and paired tokens t of
                         cos(h^E_ℓ'(x)_t', Π_ℓ h^M_ℓ(x)_t)
sae_pattern_similarity   mean over (held-out feature v, exemplar context x) of
                         corr_t(<h^E_ℓ'(x)_t', Π_ℓ v>, <h^M_ℓ(x)_t, v>)

h^M comes from the activation cache (the target read its own token ids). The explainer reads the same text:
the context's target tokens, joined. Its token t' is paired with target token t when both end at the same
character, so tokenizers may differ (unpaired tokens are skipped); its layer ℓ' sits at the same relative
depth. Π_ℓ is the explainer's trained projection for target layer ℓ (identity when it has none: the self
explainer, same width). The paper reports both in %, "presumably normalised"; these are normalised
fractions. The explainer runs as trained (LoRA on), on plain text, no placeholder.
"""

from collections.abc import Callable, Sequence

import numpy as np
import torch

from tasks.common.activations import residual_stream
from tasks.common.corpus import context_start_id
from tasks.explainer import model as ex
from tasks.features.simulate import mean_se


def pair_tokens(target_pieces: Sequence[str], explainer_ends: Sequence[int]) -> list[tuple[int, int]]:
    """(target index, explainer index) of the tokens that end at the same character of ''.join(target_pieces)."""
    at_end = {int(e): j for j, e in enumerate(explainer_ends)}
    ends = np.cumsum([len(p) for p in target_pieces])
    return [(t, at_end[int(e)]) for t, e in enumerate(ends) if target_pieces[t] and int(e) in at_end]


@torch.inference_mode()
def explainer_states(explainer: ex.Explainer, text: str) -> tuple[torch.Tensor, list[int]]:
    """(block outputs [n_layers, T', d_E] float32, character end of each of the T' tokens) of the explainer
    on `text`, behind the token its contexts start with (as the target's do; its end -1 pairs with nothing).
    Block outputs, as the target's cache holds them (HF's last hidden state is after the final norm). The
    adapters of a LoRA explainer sit inside its base model's modules, so the base model runs them."""
    tok = explainer.tokenizer
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = [context_start_id(tok), *enc["input_ids"]]
    ends = [-1, *(e for _, e in enc["offset_mapping"])]
    n = explainer.lm.n_layers
    blocks = residual_stream(explainer.lm, torch.tensor([ids]), list(range(n)))  # {layer: [1, T', d_E]}
    return torch.stack([blocks[layer][0].float() for layer in range(n)]).cpu(), ends


def similarities(
    explainer: ex.Explainer,
    target_states: Callable[[int, int], tuple[np.ndarray, np.ndarray]],
    pieces: Callable[[int], list[str]],
    layers: Sequence[int],
    features: Sequence[tuple[int, np.ndarray, int]],
) -> dict[str, tuple[float, float, int]]:
    """{'dot_product_similarity': (mean, se, n), 'sae_pattern_similarity': (mean, se, n)}.

    target_states(layer, context) -> (positions [P], h^M [P, d_M]); pieces(context) -> the target's token
    strings by position (position 0, the BOS, is not part of the text); features: (layer ℓ, direction v [d_M],
    context x) triples for the pattern correlation. Every context of `features` enters the cosine, at every
    cached layer in `layers`.
    """
    n_e = explainer.lm.n_layers
    proj = None if explainer.proj is None else explainer.proj.detach().float().cpu()  # [L_M, d_E, d_M]

    def to_explainer(layer: int, h: torch.Tensor) -> torch.Tensor:  # [..., d_M] -> [..., d_E]
        return h if proj is None else h @ proj[layer].T

    states: dict[int, tuple[torch.Tensor, list[tuple[int, int]]]] = {}  # context -> (h^E, token pairs)
    for context in sorted({c for _, _, c in features}):
        text_pieces = pieces(context)[1:]
        hidden, ends = explainer_states(explainer, "".join(text_pieces))
        states[context] = hidden, [(t + 1, j) for t, j in pair_tokens(text_pieces, ends)]  # target positions

    def paired(layer: int, context: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(h^M [n, d_M], h^E at the same-depth layer [n, d_E]) over the paired, cached positions."""
        positions, h_m = target_states(layer, context)
        row = {int(p): i for i, p in enumerate(positions)}
        hidden, pairs = states[context]
        keep = [(row[t], j) for t, j in pairs if t in row]
        h_e = hidden[ex.explainer_layer(layer, explainer.n_target_layers, n_e)]
        return torch.from_numpy(h_m[[i for i, _ in keep]].astype(np.float32)), h_e[[j for _, j in keep]]

    # Every (layer, context) pairing once: the cosines use them all, the correlations look theirs up.
    both = {(layer, context): paired(layer, context) for context in states for layer in layers}
    cosines = [
        float(torch.nn.functional.cosine_similarity(h_e, to_explainer(layer, h_m)).mean())
        for (layer, _), (h_m, h_e) in both.items()
        if len(h_m)
    ]
    correlations = []
    for layer, v, context in features:
        h_m, h_e = both[(layer, context)]
        v_m = torch.from_numpy(np.asarray(v, dtype=np.float32))
        a_m, a_e = h_m @ v_m, h_e @ to_explainer(layer, v_m)
        if len(a_m) > 2 and a_m.std() > 0 and a_e.std() > 0:
            correlations.append(float(torch.corrcoef(torch.stack([a_m, a_e]))[0, 1]))
    return {"dot_product_similarity": mean_se(cosines), "sae_pattern_similarity": mean_se(correlations)}
