"""The sweep's forward passes: a patch replaces the residual locally, labels equal full forwards of every patched
copy on a model that copies its subject, and a batch of one chunk never runs the blocks below it."""

import pytest
import torch

from tasks.common import models
from tasks.common.config import ModelConfig
from tasks.patching.ground_truth import layer_chunks
from tasks.patching.sweep import SHARE, _Patch, all_layers, clean_run, next_tokens


@pytest.fixture(scope="module")
def lm():
    return models.load(ModelConfig(name="tiny-llama", autocast="none"))


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


def test_a_batch_of_one_chunk_runs_no_block_below_it_and_labels_equal_every_reference(lm):
    """Patches in chunks [1] and [2, 3]: block 0 runs only single rows (the clean run, the prefix runs), block 1
    runs the first chunk's batch, and blocks below 2 never see the second chunk's. Every path's labels agree
    with one forward per patch, including a patch at position 0 (no prefix) and at the last position."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 200, (24,), generator=gen).tolist()
    chunks = [[1], [2, 3]]
    patches = [(c, t, 30 * torch.randn(64, generator=gen)) for c in chunks for t in (0, 5, 11, 17, 23)]
    seen: dict[int, list[int]] = {0: [], 1: [], 2: []}  # block -> batch size of each call of its attention
    blocks = lm.model.model.layers
    hooks = [blocks[b].self_attn.register_forward_hook(lambda m, a, k, o, b=b: seen[b].append(k["hidden_states"].shape[0]),
                                                       with_kwargs=True) for b in seen]  # fmt: skip
    try:
        fast = next_tokens(lm, ids, patches, 8)
    finally:
        for h in hooks:
            h.remove()
    assert set(seen[0]) == {1} and 5 in seen[1] and 5 in seen[2]  # batches of 5: one per chunk
    assert seen[1].count(5) == 1  # block 1 ran chunk [1]'s batch; chunk [2, 3]'s started at block 2
    one_by_one = [next_tokens(lm, ids, [p], 1, share="none")[0] for p in patches]
    assert fast == one_by_one and len(set(fast)) >= 3
    assert all(next_tokens(lm, ids, patches, 3, share=s) == one_by_one for s in SHARE)  # batches that split a chunk
    assert next_tokens(lm, ids, None, 1) == [clean_run(lm, ids).token]
    assert next_tokens(lm, ids, patches, 8, clean=clean_run(lm, ids)) == one_by_one  # the caller's clean run...
    assert next_tokens(lm, ids, patches, 8, clean=clean_run(lm, ids[::-1])) != one_by_one  # ...is the one used
    with pytest.raises(ValueError, match="share 'some' is not one of"):
        next_tokens(lm, ids, patches, 8, share="some")


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
