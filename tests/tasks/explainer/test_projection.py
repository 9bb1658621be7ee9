import numpy as np
import pytest
import torch

from storage.errors import UserInputError
from tasks.explainer.model import Explainer, check_injection
from tasks.explainer.projection import ProjectionFit, fit_projection, paired_explainer_ids, ridge, type_weights
from tests.factories import batch, make_explainer


class Texts:
    """ContextTexts over given token strings: context id -> pieces (position 0 is the context's start token)."""

    def __init__(self, by_context: dict[int, list[str]]) -> None:
        self.by_context = by_context

    def tokens(self, context_id: int) -> list[str]:
        return self.by_context[context_id]


def test_ridge_is_the_centred_weighted_least_squares_map_shrunk_by_the_relative_penalty():
    x, y = np.array([[0.0], [2.0]]), np.array([[1.0], [5.0]])  # y = 2x + 1
    w, mu_x, mu_y = ridge(x, y, np.ones(2), penalty=1e-12)
    np.testing.assert_allclose(w, [[2.0]], rtol=1e-9)
    np.testing.assert_allclose((mu_x, mu_y), ([1.0], [3.0]))
    # centred x = ±1: C_xx = 1, C_xy = 2, λ = 1 x C_xx / 1 = 1, so W = 2 / (1 + 1)
    np.testing.assert_allclose(ridge(x, y, np.ones(2), penalty=1.0)[0], [[1.0]])
    # weights 3:1 move the means to 0.5 and 2.0
    np.testing.assert_allclose(ridge(x, y, np.array([3.0, 1.0]), penalty=1e-12)[1:], ([0.5], [2.0]))


def test_type_weights_make_every_token_type_weigh_the_same():
    np.testing.assert_allclose(type_weights(np.array([5, 5, 7, 5])), [1 / 3, 1 / 3, 1.0, 1 / 3])


def test_target_tokens_pair_with_the_explainer_token_ending_at_the_same_character():
    tok = make_explainer().tokenizer  # byte tokens: 'a', 'b', 'c' are one token each
    texts = Texts({7: ["<start>", "ab", "c"]})  # target tokens "ab" (ends at 2) and "c" (ends at 3)
    rows, ids = paired_explainer_ids(np.array([7, 7, 7]), np.array([0, 1, 2]), texts, tok)
    np.testing.assert_array_equal(rows, [1, 2])  # the start token pairs with nothing
    np.testing.assert_array_equal(ids, tok.convert_tokens_to_ids(["b", "c"]))


def _fit(layer: int, d_m: int, d_e: int, residual: bool) -> ProjectionFit:
    rng = np.random.default_rng(0)
    return ProjectionFit({layer: rng.normal(size=(d_e, d_m)).astype(np.float32)},
                         {layer: (rng.normal(size=d_m) if residual else np.zeros(d_m)).astype(np.float32)},
                         {layer: rng.normal(size=d_e).astype(np.float32)}, {layer: 3.0}, {layer: 10})  # fmt: skip


def test_a_fitted_projection_writes_the_mean_embedding_plus_the_scaled_unit_map():
    ex = make_explainer(name="tiny-gemma3", d_target=64, projection="fitted")  # d_E 80, d_M 64
    fit = _fit(2, 64, 80, residual=True)
    ex.set_fitted_projection(fit)
    v = np.random.default_rng(1).normal(size=(2, 64))
    v[1] = fit.in_mean[2]  # the mean residual itself carries no token: it lands on μ_E
    b = batch(ex, v)  # queries of layer 2
    rows = ex.inject(b["input_ids"], b["vectors"], b["layers"])[b["input_ids"] == ex.payload_id]  # [2, d_E]
    mapped = fit.proj[2] @ (v[0] - fit.in_mean[2])
    want = fit.out_mean[2] + 3.0 * mapped / np.linalg.norm(mapped)
    np.testing.assert_allclose(rows[0].detach().numpy(), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(rows[1].detach().numpy(), fit.out_mean[2], rtol=1e-5, atol=1e-5)


def test_a_fitted_projection_survives_a_lora_checkpoint(tmp_path):
    ex = make_explainer(name="tiny-gemma3", d_target=64, projection="fitted", finetune="lora", lora_r=4)
    ex.set_fitted_projection(_fit(2, 64, 80, residual=True))
    ex.save(tmp_path / "ckpt")
    again = Explainer.load(tmp_path / "ckpt")
    v = np.random.default_rng(2).normal(size=(1, 64))
    b = batch(ex, v)  # layer 2
    torch.testing.assert_close(again.inject(b["input_ids"], b["vectors"], b["layers"]),
                               ex.inject(b["input_ids"], b["vectors"], b["layers"]))  # fmt: skip


def test_fit_recovers_a_linear_map_of_the_explainers_own_embeddings_and_skips_excluded_tokens():
    """Target states h = A E[t] + b for the explainer's own embedding E[t] of each token: the fitted Π maps
    h − μ_h back onto E − μ_E (cosine ≈ 1), and positions of an excluded token never enter the fit."""
    ex = make_explainer(projection="fitted")
    tok = ex.tokenizer
    rng = np.random.default_rng(3)
    letters = list("abcdefghijklmnop")
    pieces = {c: ["<start>", *rng.choice(letters, size=40)] for c in range(30)}
    token_id = np.array([tok.convert_tokens_to_ids(p) if i else 0 for c in pieces for i, p in enumerate(pieces[c])])
    embed = ex.model.get_input_embeddings().weight.detach().numpy()
    a, b = rng.normal(size=(64, 64)), rng.normal(size=64) * 5
    data = {"activation": (embed[token_id] @ a.T + b).astype(np.float16), "token_id": token_id,
            "context_id": np.repeat(np.arange(30), 41), "position": np.tile(np.arange(41), 30)}  # fmt: skip
    excluded = tok.convert_tokens_to_ids("p")
    fit = fit_projection(ex, {1: data}, Texts(pieces), penalty=1e-6, max_rows=10_000, residual_inputs=True, seed=0,
                         exclude_token_ids=[excluded])  # fmt: skip
    assert fit.n_pairs[1] == int(((token_id != 0) & (token_id != excluded)).sum())
    h = data["activation"].astype(np.float32)
    mapped = (h - fit.in_mean[1]) @ fit.proj[1].T
    target = embed[token_id] - fit.out_mean[1]
    cos = (mapped * target).sum(1) / np.linalg.norm(mapped, axis=1) / np.linalg.norm(target, axis=1)
    assert cos[(token_id != 0) & (token_id != excluded)].min() > 0.99  # 15 types span too little to map a 16th
    directions = fit_projection(ex, {1: data}, Texts(pieces), 1e-6, 10_000, residual_inputs=False, seed=0)
    assert not directions.in_mean[1].any()  # SAE directions are centred already: no μ_ℓ to subtract


def test_fitted_projection_is_refused_where_the_vector_skips_the_embedding():
    cfg = make_explainer(projection="fitted").cfg.model_copy(update={"injection": "residual"})
    with pytest.raises(UserInputError, match="explainers.self.projection: 'fitted' maps into the token-embedding"):
        check_injection(cfg, [1], 4, 64, "explainers.self")
