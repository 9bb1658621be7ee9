from pathlib import Path

import numpy as np
import pytest
import torch

from storage.errors import UserInputError
from storage.store import Dataset
from tasks.common import models
from tasks.explainer.config import ExplainerConfig
from tasks.explainer.model import SPAN, Explainer, Query, basis_rotation, check_injection, shuffled_donors
from tasks.explainer.projection import LayerStats, residual_stats
from tasks.explainer.train import step_budget, train
from tasks.features.prompts import FEATURE_TEMPLATES_BASE, FEATURE_TEMPLATES_CHAT, feature_queries
from tests.factories import batch, make_explainer


def _logits(ex: Explainer, batch) -> torch.Tensor:
    with torch.no_grad():
        return ex(batch["input_ids"], batch["attention_mask"], batch["vectors"], batch["layers"]).logits


def test_injected_vector_changes_logits_after_the_placeholder_only():
    ex = make_explainer()
    rng = np.random.default_rng(0)
    v = rng.normal(size=(1, 64)) * 3
    b_v, b_0, b_w = batch(ex, v), batch(ex, np.zeros((1, 64))), batch(ex, rng.normal(size=(1, 64)) * 3)
    lv, l0, lw = _logits(ex, b_v), _logits(ex, b_0), _logits(ex, b_w)
    pos = int((b_v["input_ids"][0] == ex.payload_id).nonzero())
    assert not torch.allclose(lv[0, pos:], l0[0, pos:], atol=1e-4)  # v vs zero vector
    assert not torch.allclose(lv[0, pos:], lw[0, pos:], atol=1e-4)  # v vs another vector
    torch.testing.assert_close(lv[0, :pos], l0[0, :pos], rtol=0, atol=0)  # causal: nothing before it moves


def test_writing_a_token_embedding_reproduces_that_token():
    """R7e: the payload row holding embed(id) gives the logits of the prompt with `id` in that slot."""
    for name in ("tiny-llama", "tiny-gemma3"):  # Gemma scales embeddings inside the module: must still hold
        d = 64 if name == "tiny-llama" else 80
        ex = make_explainer(name=name, d_target=d)
        tok_id = ex.tokenizer.convert_tokens_to_ids("a")
        vector = ex.model.get_input_embeddings()(torch.tensor([tok_id]))[0].detach().numpy()
        b = batch(ex, vector[None])
        injected = _logits(ex, b)
        ids = b["input_ids"].clone()
        ids[ids == ex.payload_id] = tok_id
        with torch.no_grad():
            plain = ex.model(input_ids=ids, attention_mask=b["attention_mask"]).logits
        torch.testing.assert_close(injected, plain, rtol=1e-5, atol=1e-5)


def test_projection_exists_when_widths_differ_and_receives_gradient_under_lora():
    ex = make_explainer(name="tiny-gemma3", d_target=64, finetune="lora", lora_r=4)
    assert ex.proj is not None and ex.proj.shape == (4, 80, 64) and ex.proj.requires_grad  # METHOD §3.6
    assert make_explainer().proj is None  # same width: raw injection
    q = Query(np.ones(64, dtype=np.float32), 3, f"{SPAN} activates at layer 3 for ", "the letter a")
    loss = ex.loss(ex.collate([q], train=True))
    loss.backward()
    assert ex.proj.grad is not None and float(ex.proj.grad[3].abs().sum()) > 0
    assert float(ex.proj.grad[0].abs().sum()) == 0  # only the vector's own layer's Π moves
    base = [n for n, p in ex.model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert base == []  # LoRA: only adapters (and Π, outside the model) train


def test_vector_norm_match_rescales_to_token_embedding_norm():
    ex = make_explainer(vector_norm="match")
    b = batch(ex, np.full((1, 64), 1000.0))
    embeds = ex.inject(b["input_ids"], b["vectors"], b["layers"])
    row = embeds[0][b["input_ids"][0] == ex.payload_id][0]
    torch.testing.assert_close(row.norm(), ex.embedding_norm, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt, templates", [("base", FEATURE_TEMPLATES_BASE), ("chat", FEATURE_TEMPLATES_CHAT)])
def test_loss_mask_covers_exactly_the_answer_tokens(fmt, templates):
    ex = make_explainer(format=fmt)
    answer = 'the tokens "def" and "class"'
    for template in templates:
        q = Query(np.zeros(64, np.float32), 1, template.format(feature=SPAN, layer=1), answer)
        ids, labels = ex.training_example(q)
        prompt = ex.prompt_ids(q)
        assert ids[: len(prompt)] == prompt  # the generation prefix is the training prefix (METHOD §3.2)
        answer_ids = [t for t in labels if t != -100]
        assert labels[: len(prompt)] == [-100] * len(prompt) and len(answer_ids) == len(ids) - len(prompt)
        assert answer_ids[-1] == ex.tokenizer.eos_token_id  # EOS trained on (METHOD §3.3)
        expected = answer if fmt == "chat" else " " + answer
        assert ex.tokenizer.decode(answer_ids[:-1]) == expected
        assert ids.count(ex.payload_id) == 1
        if fmt == "base":
            assert ex.tokenizer.decode(prompt).endswith(template.format(feature=SPAN, layer=1).rstrip(" ")[-8:])


def test_cached_and_uncached_greedy_decoding_agree():
    ex = make_explainer(name="tiny-gemma3", d_target=64)
    rng = np.random.default_rng(1)
    qs = feature_queries(rng.normal(size=(5, 64)), [0, 1, 2, 3, 0], [None] * 5, list("abcde"), chat=False, seed=0)
    cached = ex.generate(qs, max_new_tokens=8, batch_size=3, use_cache=True)
    uncached = ex.generate(qs, max_new_tokens=8, batch_size=5, use_cache=False)
    assert cached == uncached
    assert len(set(cached)) > 1  # different vectors, different texts


def test_training_teaches_the_vector_not_the_text(tmp_path):
    """Two queries with the same text and different vectors must get their own answers after training."""
    ex = make_explainer(lr=3e-3, epochs=60, batch_size=2, val_fraction=0.0)
    rng = np.random.default_rng(0)
    v1, v2 = rng.normal(size=64) * 3, rng.normal(size=64) * 3
    text = f"What does {SPAN} encode at layer 1?"
    qs = [Query(v1.astype(np.float32), 1, text, "cats"), Query(v2.astype(np.float32), 1, text, "dogs")]
    result = train(ex, qs, [])
    assert result.train_loss[-1] < 0.1 * result.train_loss[0]
    strip = [Query(q.vector, q.layer, q.text) for q in qs]
    assert ex.generate(strip, max_new_tokens=4, batch_size=2) == ["cats", "dogs"]
    ex.save(tmp_path / "ckpt")
    again = Explainer.load(tmp_path / "ckpt")
    assert again.generate(strip, max_new_tokens=4, batch_size=2) == ["cats", "dogs"]


def test_lora_checkpoint_with_projection_reloads_to_the_same_logits(tmp_path):
    ex = make_explainer(name="tiny-gemma3", d_target=64, finetune="lora", lora_r=4, lr=1e-2, epochs=2)
    rng = np.random.default_rng(3)
    qs = [
        Query(rng.normal(size=64).astype(np.float32), i % 4, f"{SPAN} activates at layer 1 for ", "x") for i in range(4)
    ]
    train(ex, qs, [])
    ex.save(tmp_path / "ckpt")
    again = Explainer.load(tmp_path / "ckpt")
    b = ex.collate(qs, train=False)
    torch.testing.assert_close(_logits(again, b), _logits(ex, b), rtol=1e-5, atol=1e-5)
    assert again.proj is not None and torch.equal(again.proj, ex.proj)


def test_loss_over_kept_answer_columns_equals_the_full_cross_entropy():
    """The loss computes logits only for the last columns; it must equal CE over all answer tokens."""
    ex = make_explainer()
    rng = np.random.default_rng(2)
    qs = [Query(rng.normal(size=64).astype(np.float32), 1, f"What does {SPAN} encode at layer 1?" + "x" * k, a)
          for k, a in ((0, "cats and dogs"), (9, "a"), (3, "the tokens 'def'"))]  # fmt: skip
    batch = ex.collate(qs, train=True)
    with torch.no_grad():
        full = ex(batch["input_ids"], batch["attention_mask"], batch["vectors"], batch["layers"]).logits
        expected = torch.nn.functional.cross_entropy(
            full[:, :-1].reshape(-1, full.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
        )
        torch.testing.assert_close(ex.loss(batch), expected, rtol=1e-5, atol=1e-5)


def test_text_only_queries_inject_nothing_and_a_lost_payload_is_caught():
    ex = make_explainer()
    text = Query(None, 0, "Is the hint used?", "yes")
    b = ex.collate([text], train=False)
    with torch.no_grad():
        embeds = ex.inject(b["input_ids"], b["vectors"], b["layers"], b["n_payloads"])
        plain = ex.model.get_input_embeddings()(b["input_ids"])
    torch.testing.assert_close(embeds, plain, rtol=0, atol=0)
    with pytest.raises(ValueError, match="payload"):
        ex.collate([Query(np.ones(64, np.float32), 0, "no placeholder here")], train=False)


def test_training_killed_mid_epoch_resumes_from_its_last_epoch_to_the_same_weights(tmp_path):
    rng = np.random.default_rng(4)
    qs = [Query(rng.normal(size=64).astype(np.float32), 1, f"What does {SPAN} encode at layer 1?", a)
          for a in ("cats", "dogs", "fish", "owls", "bees", "ants")]  # fmt: skip
    settings = {"lr": 3e-3, "epochs": 3, "batch_size": 2, "val_fraction": 0.0}
    reference = make_explainer(**settings)
    ref = train(reference, qs, [])

    class Killed(Exception):
        pass

    def die_in_epoch_two(fraction: float, message: str) -> None:
        if message.startswith("epoch 1") and fraction > 0.4:  # after epoch 0 was saved, mid epoch 1
            raise Killed

    state = tmp_path / "state.pt"
    with pytest.raises(Killed):
        train(make_explainer(**settings), qs, [], die_in_epoch_two, state)
    assert torch.load(state, weights_only=False)["log"]["epoch"] == 1
    resumed = make_explainer(**settings)
    result = train(resumed, qs, [], None, state)
    assert result.train_loss == pytest.approx(ref.train_loss, rel=1e-6) and result.steps == ref.steps
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize(
    "raw, cut",
    [("The output would remain unchanged from <<<Answer: C>>>. And more", "The output would remain unchanged from <<<Answer: C>>>."),
     ('the tokens "def" and "class" [END] junk', 'the tokens "def" and "class"'),
     ("first line\nsecond", "first line"),
     ("  no stop at all ", "no stop at all")],
)  # fmt: skip
def test_decoded_text_is_cut_at_stop_strings_keeping_an_outcome_sentence_whole(raw, cut):
    from tasks.explainer.model import _cut

    assert _cut(raw) == cut


def test_prompt_ablation_queries_drop_the_layer_or_the_vector():
    v, layers, ids = np.ones((12, 8), np.float32), [3] * 12, [f"f{i}" for i in range(12)]
    for chat in (True, False):
        full = feature_queries(v, layers, ["x"] * 12, ids, chat, seed=1)
        no_layer = feature_queries(v, layers, ["x"] * 12, ids, chat, seed=1, mode="no_layer")
        no_act = feature_queries(v, layers, ["x"] * 12, ids, chat, seed=1, mode="no_activation")
        assert all("layer 3" in q.text and SPAN in q.text for q in full)
        assert all("layer" not in q.text and SPAN in q.text and q.vector is not None for q in no_layer)
        assert all(SPAN not in q.text and "his feature" in q.text and q.vector is None for q in no_act)
        assert all("layer 3" in q.text and q.text[0].isupper() for q in no_act)
        assert [q.answer for q in no_act] == ["x"] * 12  # the same labels, the same template draws
    assert feature_queries(v[:1], [3], ["x"], ["f"], False, 0, "no_layer")[0].text.endswith(" ")  # base: one space


def _block_outputs(ex: Explainer, batch, blocks: list[int]) -> dict[int, torch.Tensor]:
    """{block: its output hidden state [B, T, d]} in one forward of the explainer over `batch`."""
    seen: dict[int, torch.Tensor] = {}
    layers = models.decoder_layers(ex.lm.model)

    def keep(b):
        return lambda m, a, out: seen.__setitem__(b, (out[0] if isinstance(out, tuple) else out).detach().clone())

    handles = [layers[b].register_forward_hook(keep(b)) for b in blocks]
    try:
        _logits(ex, batch)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_residual_injection_writes_v_after_block_l_at_the_payload_only():
    ex = make_explainer(injection="residual")  # vector_norm raw: v is written as given
    v = np.random.default_rng(5).normal(size=(1, 64)) * 3
    b_v, b_0 = batch(ex, v), batch(ex, np.zeros((1, 64)))  # the query's vector is from target layer 2
    pos = int((b_v["input_ids"][0] == ex.payload_id).nonzero())
    with_v, with_0 = _block_outputs(ex, b_v, [1, 2]), _block_outputs(ex, b_0, [1, 2])
    torch.testing.assert_close(with_v[2][0, pos], torch.tensor(v[0], dtype=torch.float32), rtol=0, atol=0)
    torch.testing.assert_close(with_v[1], with_0[1], rtol=0, atol=0)  # below block 2 nothing moves
    torch.testing.assert_close(with_v[2][0, :pos], with_0[2][0, :pos], rtol=0, atol=0)  # nor before the payload


def test_residual_injection_matches_the_prompts_median_norm():
    ex = make_explainer(injection="residual", vector_norm="match")
    v = np.random.default_rng(6).normal(size=(1, 64))
    b = batch(ex, v)
    pos = int((b["input_ids"][0] == ex.payload_id).nonzero())
    h = _block_outputs(ex, b, [2])[2][0]  # [T, d]: only the payload's row was written
    median = h.norm(dim=-1)[torch.arange(h.shape[0]) != pos].median()
    written = h[pos]
    torch.testing.assert_close(written, torch.tensor(v[0] / np.linalg.norm(v[0]), dtype=torch.float32) * median)


def test_early_add_adds_the_unit_vector_at_the_streams_norm():
    ex = make_explainer(injection="early_add", inject_layer=1, inject_scale=2.0)
    v = np.random.default_rng(7).normal(size=(1, 64))
    b_v, b_0 = batch(ex, v), batch(ex, np.zeros((1, 64)))
    pos = int((b_v["input_ids"][0] == ex.payload_id).nonzero())
    h = _block_outputs(ex, b_0, [1])[1][0, pos]  # v = 0 adds nothing: the stream as it is
    expected = h + torch.tensor(v[0] / np.linalg.norm(v[0]), dtype=torch.float32) * h.norm() * 2.0
    torch.testing.assert_close(_block_outputs(ex, b_v, [1])[1][0, pos], expected)


def test_layer_mean_writes_the_layers_mean_plus_v_at_a_residuals_own_size(tmp_path):
    ex = make_explainer(injection="residual", vector_norm="layer_mean", inject_scale=2.0)
    mu = np.zeros(64, dtype=np.float32)
    mu[0] = 10.0
    centre = np.zeros(64, dtype=np.float32)
    centre[1] = 4.0  # residual inputs: c_ℓ subtracted before the direction is taken
    ex.set_layer_stats(LayerStats({2: mu}, {2: 3.0}, {2: centre}))
    v = np.zeros((1, 64))
    v[0, 1], v[0, 2] = 7.0, 4.0  # v − c = (0, 3, 4, 0, ...): unit (0, 0.6, 0.8, ...)
    b_v, b_0 = batch(ex, v), batch(ex, np.zeros((1, 64)))
    pos = int((b_v["input_ids"][0] == ex.payload_id).nonzero())
    expected = mu.copy()
    expected[1], expected[2] = 0.6 * 3.0 * 2.0, 0.8 * 3.0 * 2.0  # μ + inject_scale x σ x unit(v − c)
    torch.testing.assert_close(_block_outputs(ex, b_v, [2])[2][0, pos], torch.from_numpy(expected))
    torch.testing.assert_close(_block_outputs(ex, b_0, [2])[2][0, pos], torch.from_numpy(mu))  # v = 0: μ alone
    ex.save(tmp_path / "ckpt")  # the statistics travel with the checkpoint
    again = Explainer.load(tmp_path / "ckpt")
    torch.testing.assert_close(_block_outputs(again, b_v, [2])[2][0, pos], torch.from_numpy(expected))


def test_layer_mean_under_the_rotated_basis_rotates_the_centred_vector():
    """The rotated-basis control reads Q(v − c_ℓ): the layer's own mean is not rotated into the payload."""
    ex = make_explainer(injection="residual", vector_norm="layer_mean", rotation_seed=3)
    mu = np.zeros(64, dtype=np.float32)
    mu[0] = 10.0
    centre = np.full(64, 0.5, dtype=np.float32)
    ex.set_layer_stats(LayerStats({2: mu}, {2: 3.0}, {2: centre}))
    v = np.random.default_rng(8).normal(size=(1, 64)).astype(np.float32)
    b = batch(ex, v)
    pos = int((b["input_ids"][0] == ex.payload_id).nonzero())
    q = ex.rotation.cpu().numpy()
    turned = q @ (v[0] - centre)  # Q(v − c), not Qv − c
    expected = mu + 3.0 * turned / np.linalg.norm(turned)
    torch.testing.assert_close(_block_outputs(ex, b, [2])[2][0, pos], torch.from_numpy(expected))


def test_residual_stats_are_the_mean_and_the_median_centred_norm():
    h = np.array([[1.0, 0.0], [3.0, 0.0], [2.0, 3.0], [2.0, -3.0]], dtype=np.float16)  # mean (2, 0)
    stats = residual_stats({5: {"activation": h}}, residual_inputs=True)
    np.testing.assert_allclose(stats.mean[5], [2.0, 0.0])
    assert stats.spread[5] == 2.0  # |h − μ| = 1, 1, 3, 3: median 2
    np.testing.assert_allclose(stats.centre[5], [2.0, 0.0])
    assert not residual_stats({5: {"activation": h}}, residual_inputs=False).centre[5].any()


@pytest.mark.parametrize(("update", "width"), [({"injection": "embedding"}, 64), ({"projection": "always"}, 64),
                                               ({}, 32)])  # fmt: skip
def test_layer_mean_is_refused_off_the_targets_own_residual_stream(update, width):
    cfg = make_explainer().cfg.model_copy(update={"injection": "residual", "vector_norm": "layer_mean", **update})
    with pytest.raises(UserInputError, match="^explainers.self.vector_norm: 'layer_mean' writes a state"):
        check_injection(cfg, [1], 4, width, "explainers.self")


def test_injection_sites_follow_relative_depth():
    ex = make_explainer(injection="residual", n_layers=8)  # a 4-block explainer of an 8-layer target
    sites = ex.injection_sites(torch.tensor([0, 1, 3, 5, 7]))
    assert sites.tolist() == [0, 0, 1, 2, 3]  # round(l * 3 / 7)
    assert make_explainer(injection="residual").injection_sites(torch.tensor([0, 3])).tolist() == [0, 3]
    early = make_explainer(injection="early_add", inject_layer=2)
    assert early.injection_sites(torch.tensor([0, 3])).tolist() == [2, 2]


@pytest.mark.parametrize("injection", ["residual", "early_add"])
def test_cached_decoding_carries_a_stream_injection(injection):
    ex = make_explainer(name="tiny-gemma3", d_target=64, injection=injection)
    rng = np.random.default_rng(1)
    qs = feature_queries(rng.normal(size=(4, 64)), [0, 1, 2, 3], [None] * 4, list("abcd"), chat=False, seed=0)
    cached = ex.generate(qs, max_new_tokens=8, batch_size=2, use_cache=True)
    assert cached == ex.generate(qs, max_new_tokens=8, batch_size=4, use_cache=False)
    assert len(set(cached)) > 1


def test_lora_training_keeps_adapters_in_float32_beside_a_base_stored_as_autocast_computes():
    """The frozen base's linears are bf16 under autocast, the adapters fp32; the loss is the same bits as with the
    base in fp32, and training on CPU runs eager attention, then hands the model back with its own kernel."""
    ex = make_explainer(finetune="lora", lora_r=4, model={"name": "tiny-llama", "autocast": "bfloat16"})
    linears = {n: m for n, m in ex.model.named_modules() if isinstance(m, torch.nn.Linear) and "layers." in n}
    assert {m.weight.dtype for n, m in linears.items() if "lora_" not in n} == {torch.bfloat16}
    adapters = [p for n, p in ex.model.named_parameters() if "lora_" in n]
    assert adapters and all(p.dtype == torch.float32 and p.requires_grad for p in adapters)
    rng = np.random.default_rng(2)
    qs = [Query(rng.normal(size=64).astype(np.float32), 1, f"What does {SPAN} encode at layer 1?", a)
          for a in ("cats", "dogs")]  # fmt: skip
    b = ex.collate(qs, train=True)
    with torch.no_grad():
        stored = ex.loss(b)
        for m in linears.values():
            m.float()
        assert torch.equal(ex.loss(b), stored)
    own = ex.lm.model.config._attn_implementation
    seen = []
    ex.lm.model.register_forward_pre_hook(lambda m, a: seen.append(m.config._attn_implementation))
    train(ex, qs, [])
    assert set(seen) == {"eager"} and own != "eager" and ex.lm.model.config._attn_implementation == own


def test_step_budget_raises_small_sets_to_min_steps_and_caps_at_max_steps():
    cfg = ExplainerConfig(batch_size=4, epochs=2)
    assert step_budget(cfg, 10) == (6, 3)  # 3 batches an epoch, validated each epoch
    assert step_budget(cfg.model_copy(update={"min_steps": 20}), 10) == (20, 3)
    assert step_budget(cfg.model_copy(update={"max_steps": 4, "eval_every": 2}), 10) == (4, 2)


def test_min_steps_trains_past_an_early_stop():
    rng = np.random.default_rng(8)
    qs = [Query(rng.normal(size=64).astype(np.float32), 1, f"What does {SPAN} encode at layer 1?", a)
          for a in ("cats", "dogs", "fish", "owls")]  # fmt: skip
    val = [Query(rng.normal(size=64).astype(np.float32), 1, qs[0].text, "zebra")]  # unlearnable: loss rises
    common = {"lr": 3e-2, "epochs": 1, "batch_size": 2, "eval_every": 1}
    stopped = train(make_explainer(**common), qs, val)
    floor = train(make_explainer(**common, min_steps=8), qs, val)
    assert stopped.steps < 8 and floor.steps == 8 and floor.val_steps == list(range(1, 9))


def test_training_killed_between_validations_resumes_to_the_same_weights(tmp_path):
    rng = np.random.default_rng(9)
    qs = [Query(rng.normal(size=64).astype(np.float32), 1, f"What does {SPAN} encode at layer 1?", a)
          for a in ("cats", "dogs", "fish", "owls", "bees", "ants")]  # fmt: skip
    settings = {"lr": 3e-3, "epochs": 1, "min_steps": 7, "eval_every": 2, "batch_size": 2, "val_fraction": 0.0}
    ref = train(reference := make_explainer(**settings), qs, [])

    class Killed(Exception):
        pass

    def die_at_step_five(fraction: float, message: str) -> None:
        if " step 5 " in message:  # mid epoch 1, one step after the validation at step 4 was saved
            raise Killed

    state = tmp_path / "state.pt"
    with pytest.raises(Killed):
        train(make_explainer(**settings), qs, [], die_at_step_five, state)
    saved = torch.load(state, weights_only=False)["log"]
    assert (saved["steps"], saved["epoch"], saved["epoch_step"]) == (4, 1, 1)
    result = train(resumed := make_explainer(**settings), qs, [], None, state)
    assert result.steps == ref.steps == 7 and result.val_steps == ref.val_steps == [2, 4, 6, 7]
    assert result.train_loss == pytest.approx(ref.train_loss, rel=1e-6)
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_shuffled_donors_give_each_item_another_vector_of_its_group():
    groups = [3, 3, 3, 9, 9, 3, 5]
    donor = shuffled_donors(groups, seed=0)
    assert sorted(donor) == list(range(7))  # a permutation
    assert all(d != i and groups[d] == groups[i] for i, d in enumerate(donor[:6]))
    assert donor[6] == 6  # alone in its group: keeps its own vector


def test_basis_rotation_is_a_fixed_orthogonal_matrix_per_seed():
    q = basis_rotation(6, seed=3)
    torch.testing.assert_close(q @ q.T, torch.eye(6), rtol=0, atol=1e-6)
    assert torch.equal(q, basis_rotation(6, seed=3)) and not torch.allclose(q, basis_rotation(6, seed=4))
    # a 2-d rotation or reflection: |Q e1| = 1 and Q e1 is orthogonal to Q e2
    q2 = basis_rotation(2, seed=0)
    assert float(q2[:, 0] @ q2[:, 1]) == pytest.approx(0.0, abs=1e-7) and float(q2[:, 0].norm()) == pytest.approx(1.0)


def test_rotated_basis_writes_qv_and_a_checkpoint_keeps_q(tmp_path):
    ex = make_explainer(injection="residual", rotation_seed=11)  # vector_norm raw: Qv is written as given
    v = np.random.default_rng(8).normal(size=(1, 64))
    b = batch(ex, v)
    pos = int((b["input_ids"][0] == ex.payload_id).nonzero())
    qv = basis_rotation(64, 11) @ torch.tensor(v[0], dtype=torch.float32)
    torch.testing.assert_close(_block_outputs(ex, b, [2])[2][0, pos], qv, rtol=1e-5, atol=1e-5)
    plain = make_explainer(injection="residual")  # the same weights read v itself
    assert not torch.allclose(_block_outputs(plain, b, [2])[2][0, pos], qv)
    ex.save(tmp_path / "ckpt")
    again = Explainer.load(tmp_path / "ckpt")
    assert again.rotation_seed == 11 and torch.equal(again.rotation, ex.rotation)
    torch.testing.assert_close(_logits(again, b), _logits(ex, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("settings", [{"injection": "residual", "vector_norm": "layer_mean"}, {"projection": "fitted"}])
def test_a_text_only_explainer_reloads_as_text_only(tmp_path, settings):
    """The '- activation' explainer of a recipe whose explainers read v through layer statistics or a fitted Π:
    built without a vector width, it has neither to save, and its checkpoint must not ask for them."""
    ex = make_explainer(d_target=None, **settings)
    assert ex.text_only and not ex.on_manifold and not ex.fitted
    ex.save(tmp_path / "ckpt")
    again = Explainer.load(tmp_path / "ckpt")
    assert again.text_only and not again.on_manifold and not again.fitted
    q = [Query(None, 0, "What does this feature encode at layer 1?", None)]
    assert again.generate(q, max_new_tokens=6, batch_size=1) == ex.generate(q, max_new_tokens=6, batch_size=1)


def test_the_readout_warm_up_trains_its_steps_before_the_run_and_is_recorded(tmp_path):
    from tasks.explainer.train import train_to_checkpoint

    rng = np.random.default_rng(6)
    qs = [Query(rng.normal(size=64).astype(np.float32), 1, f"What does {SPAN} encode at layer 1?", a)
          for a in ("cats", "dogs", "fish", "owls")]  # fmt: skip
    warm = [Query(rng.normal(size=64).astype(np.float32), 1, f"What does {SPAN} encode at layer 1?", f'the token "{t}"')
            for t in "abcdef"]  # fmt: skip
    asked = []

    def readout(e: Explainer, n: int) -> list[Query]:
        asked.append(n)
        return warm[:n]

    def run(key: str, readout_out: Dataset | None = None, **cfg) -> tuple[dict, Path]:
        settings = {"model": models.ModelConfig(name="tiny-llama", autocast="none"), "finetune": "full",
                    "vector_norm": "raw", "lr": 3e-3, "epochs": 1, "batch_size": 2, "val_fraction": 0.0, **cfg}  # fmt: skip
        out = Dataset(tmp_path, "explainers", key)
        summary = train_to_checkpoint(out, ExplainerConfig(**settings), 64, 4, lambda e: qs, {"role": "self"},
                                      readout=readout, readout_out=readout_out)  # fmt: skip
        return summary, out.path / "checkpoint"

    plain, plain_at = run("plain")
    assert asked == [] and "readout_steps" not in plain
    warmed, warmed_at = run("warmed", readout_steps=3)
    assert asked == [6]  # 3 steps of batch 2, each item once
    assert warmed["steps"] == plain["steps"] == 2 and warmed["readout_steps"] == 3 and warmed["readout_loss"] > 0
    assert ("readout_steps", 3.0) in Explainer.step_counts(warmed_at)
    assert [name for name, _ in Explainer.step_counts(plain_at)] == ["train_steps", "best_step"]
    plain_ex, warmed_ex = Explainer.load(plain_at), Explainer.load(warmed_at)
    moved = [not torch.equal(a, b) for a, b in zip(plain_ex.state_dict().values(), warmed_ex.state_dict().values(),
                                                    strict=True)]  # fmt: skip
    assert any(moved)  # the same run after the warm-up ends elsewhere
    # kept in a readouts dataset, the warm-up runs once: a second explainer (another n_train) starts from it
    shared = Dataset(tmp_path, "readouts", "r")
    first, first_at = run("first", shared, readout_steps=3)
    second, second_at = run("second", shared, readout_steps=3)
    assert asked == [6, 6] and first["readout_loss"] == second["readout_loss"] == warmed["readout_loss"]
    for at in (first_at, second_at):  # the same weights as the warm-up run in place
        for (name, a), b in zip(warmed_ex.state_dict().items(), Explainer.load(at).state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_a_fixed_step_budget_trains_exactly_that_many_steps():
    rng = np.random.default_rng(2)
    qs = [Query(rng.normal(size=64).astype(np.float32), 1, f"What does {SPAN} encode at layer 1?", a)
          for a in ("cats", "dogs", "fish")]  # fmt: skip
    e = make_explainer(lr=3e-3, epochs=1, min_steps=1, batch_size=1, val_fraction=0.0)
    result = train(e, qs, [], steps=5)  # beyond one epoch of 3 and the floor of 1
    assert (result.steps, result.best_step, result.val_steps, result.epochs_run) == (5, 5, [5], 2)
