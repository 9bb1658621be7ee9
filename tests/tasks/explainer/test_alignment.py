"""Privileged-access diagnostics on tiny models: an explainer that is the target scores 1, another model less."""

import numpy as np
import torch

from tasks.common import models
from tasks.common.activations import residual_stream
from tasks.common.config import ModelConfig
from tasks.common.corpus import context_start_id
from tasks.explainer.alignment import pair_tokens, similarities
from tasks.explainer.config import ExplainerConfig
from tasks.explainer.model import Explainer, explainer_layer

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Residual streams carry information between layers."]


def test_tokens_pair_when_they_end_at_the_same_character():
    # target ends 3, 5, 9, 11; the explainer's BOS (-1) pairs with nothing
    assert pair_tokens(["Hel", "lo", " wor", "ld"], [-1, 2, 5, 8, 11]) == [(1, 2), (3, 4)]
    assert pair_tokens(["a", "", "b"], [-1, 1, 2]) == [(0, 1), (2, 2)]  # an empty piece pairs with nothing


def test_layers_pair_by_relative_depth():
    assert [explainer_layer(layer, 4, 4) for layer in range(4)] == [0, 1, 2, 3]
    assert [explainer_layer(layer, 30, 18) for layer in (0, 15, 29)] == [0, 9, 17]


def _target_states(name: str):
    """pieces(context) and states(layer, context) of a tiny target on TEXTS, like the activation cache's."""
    lm = models.load(ModelConfig(name=name, autocast="none"))
    ids = {c: [context_start_id(lm.tokenizer), *lm.tokenizer(t, add_special_tokens=False)["input_ids"]]
           for c, t in enumerate(TEXTS)}  # fmt: skip
    # block outputs, as the cache stores them (HF's last hidden_states entry is after the final norm)
    hidden = {c: residual_stream(lm, torch.tensor([row]), [0, 1, 2, 3]) for c, row in ids.items()}

    def pieces(c: int) -> list[str]:
        return [lm.tokenizer.decode([i]) for i in ids[c]]

    def states(layer: int, c: int) -> tuple[np.ndarray, np.ndarray]:  # positions 1.. as cached (BOS skipped)
        return np.arange(1, len(ids[c])), hidden[c][layer][0, 1:].numpy().astype(np.float16)

    return pieces, states


def test_the_target_itself_is_aligned_and_another_model_is_not():
    pieces, states = _target_states("tiny-llama")
    rng = np.random.default_rng(0)
    features = [(layer, rng.normal(size=64).astype(np.float32), c) for layer in (1, 3) for c in (0, 1)]
    # LoRA starts with B = 0: before training, the self explainer computes exactly the target's hidden states.
    cfg = ExplainerConfig(model=ModelConfig(name="tiny-llama", autocast="none"))
    same = similarities(Explainer(models.load(cfg.model), 64, 4, cfg), states, pieces, [1, 3], features)
    assert same["dot_product_similarity"][0] > 0.999 and same["dot_product_similarity"][2] == 2 * 2  # contexts x layers
    assert same["sae_pattern_similarity"][0] > 0.999 and same["sae_pattern_similarity"][2] == len(features)
    # Another model (its own weights, seen through a random Π) does not share the target's hidden states.
    cfg = ExplainerConfig(model=ModelConfig(name="tiny-gemma3", autocast="none"), projection="always")
    other = similarities(Explainer(models.load(cfg.model), 64, 4, cfg), states, pieces, [1, 3], features)
    assert abs(other["dot_product_similarity"][0]) < 0.5 and other["sae_pattern_similarity"][0] < 0.9
