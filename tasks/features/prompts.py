"""Task A's prompts: the paper's feature-description templates (base and chat) and the queries built from them."""

import random
import re
from collections.abc import Sequence

import numpy as np

from tasks.explainer.model import SPAN, Query

# paper §3.2: base templates, each ending in exactly one space; {feature} is the span, {layer} an integer.
FEATURE_TEMPLATES_BASE = (
    "At layer {layer}, {feature} encodes ",
    "{feature} activates at layer {layer} for ",
    "We can describe {feature} at layer {layer} as encoding ",
    "Generate a description of this feature at layer {layer}: {feature}. ",
    "What does {feature} encode at layer {layer}? ",
    "{feature} activates at layer {layer} for inputs with the following features: ",
)


# Chat explainers: a user turn, then the label as the assistant turn.
FEATURE_TEMPLATES_CHAT = (
    "Generate a description of this feature at layer {layer}: {feature}.",
    "What does {feature} encode at layer {layer}?",
    "{feature} activates at layer {layer} for inputs with the following features:",
)


# The layer phrase of the templates above ("At layer {layer}, ", " at layer {layer}"): the '- layer' ablation
# removes it, which leaves a grammatical question.
FEATURE_LAYER_PHRASE = re.compile(r"At layer \{layer\}, | at layer \{layer\}")


def feature_queries(
    vectors: np.ndarray,
    layers: Sequence[int],
    labels: Sequence[str | None],
    ids: Sequence[str],
    chat: bool,
    seed: int,
    mode: str = "trained",
) -> list[Query]:
    """Feature-description queries, one template drawn per example with a seeded RNG (METHOD §3.5). mode 'no_layer'
    drops the layer phrase; 'no_activation' puts "this feature" in place of the placeholder, so the query
    carries no vector; any other mode ('trained', 'rotated_basis') asks with the trained templates."""
    templates = FEATURE_TEMPLATES_CHAT if chat else FEATURE_TEMPLATES_BASE
    rng = random.Random(seed)
    out = []
    for v, layer, label, ex in zip(vectors, layers, labels, ids, strict=True):
        template = rng.choice(templates)
        if mode == "no_layer":
            template = FEATURE_LAYER_PHRASE.sub("", template)
        if mode == "no_activation":  # words in place of the placeholder: "What does this feature encode ...?"
            text = template.format(feature="this feature", layer=layer)
            out.append(Query(None, int(layer), text[0].upper() + text[1:], label, ex))
        else:
            out.append(Query(np.asarray(v, dtype=np.float32), int(layer), template.format(feature=SPAN, layer=layer),
                             label, ex))  # fmt: skip
    return out
