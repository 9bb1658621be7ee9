import json

import numpy as np
import pytest
import torch

from tasks.common import models
from tasks.common.config import ModelConfig
from tasks.outcomes.facts import Fact
from tasks.patching.config import PatchingConfig
from tasks.patching.ground_truth import (
    _Patch,
    all_layers,
    balance,
    layer_chunks,
    make_pairs,
    next_tokens,
    render,
    sweep_pair,
    tokenise,
)

CAPITALS = [("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome"), ("Japan", "Tokyo"), ("Egypt", "Cairo"),
            ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Chile", "Santiago"), ("Cuba", "Havana"), ("Iran", "Tehran")]  # fmt: skip


def capital_facts() -> list[Fact]:
    return [Fact(s, "capital", o, "The capital of {} is") for s, o in CAPITALS]


@pytest.fixture(scope="module")
def lm():
    return models.load(ModelConfig(name="tiny-llama", autocast="none"))


def test_layer_chunks_are_contiguous_and_near_equal():
    assert [len(c) for c in layer_chunks(30, 4)] == [8, 8, 7, 7]
    assert layer_chunks(4, 4) == [[0], [1], [2], [3]]
    assert sum(layer_chunks(30, 4), []) == list(range(30))


def test_pairs_share_the_relation_and_never_cross_splits():
    cfg = PatchingConfig(n_pairs=10, test_fraction=0.3)
    pairs = make_pairs(capital_facts(), cfg)
    assert pairs
    for p in pairs:
        assert p.x.relation == p.x_prime.relation and p.x.subject != p.x_prime.subject
        assert p.x.object != p.x_prime.object and {p.x.object, p.x_prime.object} <= set(p.options)
        assert len(set(p.options)) == 6 and p.options[-1] == "unknown"
    train = {s for p in pairs if p.split == "train" for s in (p.x.subject, p.x_prime.subject)}
    test = {s for p in pairs if p.split == "test" for s in (p.x.subject, p.x_prime.subject)}
    assert not train & test  # METHOD §5.3: no prompt in both splits


def test_patching_a_prompt_with_its_own_residual_changes_nothing(lm):
    """METHOD §6.1: a one-layer chunk with x' = x leaves the logits unchanged; another vector changes them."""
    ids = lm.tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    h = all_layers(lm, ids)  # [n_layers, T, d]
    x = torch.tensor([ids, ids])
    with torch.no_grad():
        clean = lm.model(input_ids=x).logits
        with _Patch(lm, [[1], [1]], torch.tensor([3, 3]), torch.stack([h[1, 3], h[1, 3] + 5.0])):
            patched = lm.model(input_ids=x).logits
    torch.testing.assert_close(patched[0], clean[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(patched[1, 3:], clean[1, 3:], atol=1e-3)
    torch.testing.assert_close(patched[1, :3], clean[1, :3], rtol=0, atol=0)  # replacement is local in time


def test_sweep_rows_are_aligned_typed_and_match_one_forward_per_patch(lm):
    cfg = PatchingConfig(n_chunks=2, positions_per_pair=None, batch_size=7)
    pair = make_pairs(capital_facts(), PatchingConfig(n_pairs=10, test_fraction=0.2))[0]
    chunks = layer_chunks(lm.n_layers, 2)
    rows, _ = sweep_pair(lm, pair, chunks, cfg, pair_id=0)
    types = {r["token_type"] for r in rows}
    assert {"subject_final", "relation", "orig_answer_option", "new_answer_option", "other_answer_option"} <= types
    assert {r["chunk"] for r in rows} == {0, 1}
    # every aligned position is swept once per chunk
    assert len(rows) == 2 * len({r["orig_pos"] for r in rows})
    text_p, query_p = render(lm, pair.x_prime.prompt, pair.options, cfg.prompt_format)
    subj = query_p[0] + pair.x_prime.template.index("{}")
    tp = tokenise(lm, text_p, (subj, subj + len(pair.x_prime.subject)))
    h_prime = all_layers(lm, tp.ids)
    sf = next(r for r in rows if r["token_type"] == "subject_final" and r["chunk"] == 1)
    assert sf["counterfact_pos"] == tp.subject[-1]
    assert sf["counterfact_text_token"] == lm.tokenizer.decode([tp.ids[tp.subject[-1]]])
    np.testing.assert_allclose(sf["intervention_vector"], h_prime[chunks[1], tp.subject[-1]].mean(0).numpy(), rtol=1e-6)
    # The sweep's labels (batched, clean prefix run once per batch) equal full forwards of every patched copy,
    # batched or one per patch.
    text_x, query_x = render(lm, pair.x.prompt, pair.options, cfg.prompt_format)
    ids_x = lm.tokenizer(text_x, add_special_tokens=False)["input_ids"]
    patches = [(r["layer"], r["orig_pos"], torch.tensor(r["intervention_vector"])) for r in rows]
    labels = [r["ablated_token_id"] for r in rows]
    assert next_tokens(lm, ids_x, patches, 5, reuse_prefix=False) == labels
    # Large random vectors flip answers, so the two paths are compared where labels differ across rows.
    gen = torch.Generator().manual_seed(0)
    loud = [(c, t, 30 * torch.randn(v.shape, generator=gen)) for c, t, v in patches]
    fast = next_tokens(lm, ids_x, loud, 5)
    assert fast == next_tokens(lm, ids_x, loud, 5, reuse_prefix=False) and len(set(fast)) >= 3
    some = list(range(0, len(rows), max(1, len(rows) // 6)))
    assert [next_tokens(lm, ids_x, [patches[i]], 1, reuse_prefix=False)[0] for i in some] == [labels[i] for i in some]
    assert all(r["is_different"] == (r["ablated_token_id"] != r["original_token_id"]) for r in rows)


def test_balance_caps_cells_and_evens_classes():
    rows = [{"token_type": "relation", "chunk": 0, "is_different": i < 10} for i in range(100)]
    rows += [{"token_type": "subject_final", "chunk": 3, "is_different": True} for _ in range(50)]
    kept = balance(rows, cap=20, seed=0)
    changed = sum(r["is_different"] for r in kept)
    assert changed == len(kept) - changed == 20  # 20 unchanged (capped); changed downsampled to 20
    assert max(sum(1 for r in kept if (r["token_type"], r["chunk"], r["is_different"]) == c) for c in
               {(r["token_type"], r["chunk"], r["is_different"]) for r in kept}) <= 20  # fmt: skip


def test_counterfact_loader(tmp_path):
    from tasks.outcomes.facts import load_facts

    rec = {"requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                                 "target_true": {"str": "French"}, "target_new": {"str": "English"},
                                 "relation_id": "P103"}}  # fmt: skip
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([rec]))
    (fact,) = load_facts(str(path))
    assert fact.prompt == "The mother tongue of Danielle Darrieux is" and fact.object == "French"


def copy_model():
    """A tiny model built to copy its subject: every block writes nothing (o_proj, down_proj = 0) and the
    unembedding is the embedding, so the residual at the last token stays that token's embedding and the
    greedy next token repeats it. Prompts end with the subject, so the model answers with its subject."""
    lm = models.load(ModelConfig(name="tiny-llama", seed=1, autocast="none"))
    with torch.no_grad():
        for layer in lm.model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        lm.model.lm_head.weight.copy_(lm.model.get_input_embeddings().weight)
    return lm


def test_patching_the_subject_of_a_copying_model_with_x_prime_changes_its_answer():
    lm = copy_model()
    tok = lm.tokenizer
    ids_x = tok("Copy: France", add_special_tokens=False)["input_ids"]
    ids_p = tok("Copy: Spain", add_special_tokens=False)["input_ids"]
    assert next_tokens(lm, ids_x, None, 1) == [ids_x[-1]]  # the construction copies its subject ("e")
    h_p = all_layers(lm, ids_p)  # [n_layers, T', d]
    t, tp = len(ids_x) - 1, len(ids_p) - 1  # subject-final tokens
    chunks = layer_chunks(lm.n_layers, 2)
    patches = [(c, t, h_p[c, tp].mean(0)) for c in chunks]  # x' at the subject-final token, every chunk
    patches += [(c, 2, h_p[c, 2].mean(0)) for c in chunks]  # x' at a shared non-subject token ("p")
    assert next_tokens(lm, ids_x, patches, 4) == [ids_p[-1]] * 2 + [ids_x[-1]] * 2
    # and patching with x's own activations changes nothing
    h_x = all_layers(lm, ids_x)
    assert next_tokens(lm, ids_x, [(c, t, h_x[c, t].mean(0)) for c in chunks], 4) == [ids_x[-1]] * 2
