import json

import numpy as np
import pytest
import torch

from tasks.common import models
from tasks.common.config import ModelConfig
from tasks.outcomes.facts import Fact
from tasks.patching.config import PatchingConfig
from tasks.patching.ground_truth import balance, layer_chunks, make_pairs, render, sweep_pair, tokenise
from tasks.patching.sweep import all_layers, next_tokens

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
    # The sweep's labels (batched by chunk, from the clean run) equal full forwards of every patched copy,
    # batched or one per patch.
    text_x, query_x = render(lm, pair.x.prompt, pair.options, cfg.prompt_format)
    ids_x = lm.tokenizer(text_x, add_special_tokens=False)["input_ids"]
    patches = [(r["layer"], r["orig_pos"], torch.tensor(r["intervention_vector"])) for r in rows]
    labels = [r["ablated_token_id"] for r in rows]
    assert next_tokens(lm, ids_x, patches, 5, share="none") == labels
    # Large random vectors flip answers, so the two paths are compared where labels differ across rows.
    gen = torch.Generator().manual_seed(0)
    loud = [(c, t, 30 * torch.randn(v.shape, generator=gen)) for c, t, v in patches]
    fast = next_tokens(lm, ids_x, loud, 5)
    assert fast == next_tokens(lm, ids_x, loud, 5, share="none") == next_tokens(lm, ids_x, loud, 5, share="prefix")
    assert len(set(fast)) >= 3
    some = list(range(0, len(rows), max(1, len(rows) // 6)))
    assert [next_tokens(lm, ids_x, [patches[i]], 1, share="none")[0] for i in some] == [labels[i] for i in some]
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
