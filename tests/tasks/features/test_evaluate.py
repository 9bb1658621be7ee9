"""What the features evaluation hands each explainer."""

import numpy as np

from tasks.features.evaluate import EvalItem, explainer_vectors


def test_act_vectors_are_centred_for_explainers_that_read_centred_directions():
    mu = {3: np.array([10.0, 0.0, 0.0], dtype=np.float32)}
    items = [EvalItem("f", 3, np.array([0.0, 1.0, 0.0], dtype=np.float32), [], "x", "test"),  # an SAE direction
             EvalItem("a", 3, np.array([11.0, 2.0, 0.0], dtype=np.float32), [], None, "ood_act"),  # a residual
             EvalItem("d", 3, np.array([1.0, 0.0, 5.0], dtype=np.float32), [], None, "ood_delta")]  # a difference  # fmt: skip
    centred = explainer_vectors(items, mu, centres=True)
    np.testing.assert_array_equal(centred[0], [0.0, 1.0, 0.0])
    np.testing.assert_array_equal(centred[1], [1.0, 2.0, 0.0])  # its own part, h − μ_ℓ
    np.testing.assert_array_equal(centred[2], [1.0, 0.0, 5.0])  # μ cancels in a difference already
    raw = explainer_vectors(items, mu, centres=False)  # the paper's form ('match'): every vector as it is
    np.testing.assert_array_equal(raw[1], [11.0, 2.0, 0.0])
