import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from deploy.cli import main
from storage.errors import UserInputError
from storage.store import Dataset
from tasks.common import models
from tasks.explainer import explain
from tasks.explainer.config import ExplainRecipe
from tests.factories import MU, TARGET, save_checkpoint


@pytest.fixture
def asked(monkeypatch):
    """The vectors and layers handed to the explainer, captured; each answered with its row index."""
    calls = []

    def describe(explainer, vectors, layers, seed=None):
        calls.append((np.asarray(vectors), list(layers)))
        return [f"said {i}" for i in range(len(layers))]

    monkeypatch.setattr(explain, "describe", describe)
    return calls


def _residuals(text: str, layer: int) -> np.ndarray:
    """[T, d]: block `layer`'s output over BOS + text, without the BOS row (the cache's convention)."""
    tok = models.load(TARGET).tokenizer
    return _block_outputs([tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]], layer)[1:].numpy()


def test_a_texts_residual_reaches_the_explainer_centred_by_the_layer_mean(home, asked):
    ck = save_checkpoint(home, "k1")
    rows = explain.explain_text(ck, "Paris is", 3, -1)
    h = _residuals("Paris is", 3)  # 8 byte tokens
    ((vectors, layers),) = asked
    np.testing.assert_allclose(vectors, (h[-1] - MU[3])[None], atol=1e-5)
    assert layers == [3] and rows == [{"layer": 3, "position": 7, "token": "s", "explanation": "said 0"}]
    rows = explain.explain_text(ck, "Paris is", 1, "all")  # the explanation lens: one row per token
    np.testing.assert_allclose(asked[1][0], _residuals("Paris is", 1) - MU[1], atol=1e-5)
    assert [r["position"] for r in rows] == list(range(8)) and "".join(r["token"] for r in rows) == "Paris is"
    assert [r["explanation"] for r in rows] == [f"said {i}" for i in range(8)]
    explain.explain_text(ck, "Paris is", 1, -8)
    np.testing.assert_allclose(asked[2][0], (_residuals("Paris is", 1)[0] - MU[1])[None], atol=1e-5)


def test_a_feature_and_a_vector_reach_the_explainer_as_directions(home, asked):
    ck = save_checkpoint(home, "k1")
    directions = np.arange(3 * 64, dtype=np.float32).reshape(3, 64) / 100
    feats = Dataset(home, "features", "g0")
    feats.create({})
    feats.write_shard(0, pa.table({"layer": [3, 3, 1], "feature_id": [0, 1, 0],
                                   "direction": pa.array(list(directions), pa.list_(pa.float32()))}))  # fmt: skip
    feats.mark_complete({})
    labels = Dataset(home, "feature_labels", "g0")
    labels.create({})
    labels.write_shard(0, pa.table({"layer": [3], "feature_id": [1], "label": ['the token "is"']}))
    labels.mark_complete({})
    assert explain.explain_feature(ck, home, 3, 1) == [
        {"layer": 3, "feature_id": 1, "label": 'the token "is"', "explanation": "said 0"}
    ]
    np.testing.assert_array_equal(asked[0][0], directions[1:2])  # not centred: a direction, as in training
    assert explain.explain_feature(ck, home, 1, 0)[0]["label"] is None  # unlabelled: the explainer's word only
    with pytest.raises(UserInputError, match=r"^feature: layer 3 has no SAE feature 5 \(2 features\)"):
        explain.explain_feature(ck, home, 3, 5)
    v = np.ones(64, dtype=np.float32)
    assert explain.explain_vector(ck, v, 1) == [{"layer": 1, "explanation": "said 0"}]
    np.testing.assert_array_equal(asked[-1][0], v[None])


@pytest.mark.parametrize(
    "ask, message",
    [
        (lambda ck: explain.explain_text(ck, "Paris", 2, -1),
         "layer: 2 is not a layer this explainer was trained on ([1, 3]); fix: use one of [1, 3]"),
        (lambda ck: explain.explain_text(ck, "Paris", 1, 5),
         "position: 5 is outside the text's 5 tokens; fix: use -5 to 4, or 'all'"),
        (lambda ck: explain.explain_text(ck, "", 1, -1), "text: the text has no tokens"),
        (lambda ck: explain.explain_vector(ck, np.ones(32), 1),
         "vector: has shape [32], the explainer reads vectors of width 64"),
        (lambda ck: explain.explain_vector(ck, np.full(64, np.nan), 1), "vector: holds a NaN or an infinity"),
        (lambda ck: explain.explain_feature(ck, None, 1, 0), "feature: the features ground truth of this "
                                                             "explainer (g0) is not in the store"),
    ],
)  # fmt: skip
def test_bad_questions_are_one_line(home, ask, message, monkeypatch):
    ck = save_checkpoint(home, "k1")
    monkeypatch.setenv("SELFEXPLAIN_HOME", str(home))
    with pytest.raises(UserInputError) as err:
        ask(ck)
    assert str(err.value).startswith(message), str(err.value)


def test_checkpoints_are_found_by_key_folder_or_as_the_latest_of_a_role(home, tmp_path):
    save_checkpoint(home, "aaa", completed_at=5.0)
    save_checkpoint(home, "bbb", completed_at=9.0)
    save_checkpoint(home, "ccc", role="other", completed_at=20.0)
    save_checkpoint(home, "ddd", completed_at=30.0, task="patching")  # not a features explainer
    assert explain.find_checkpoint(home).key == "bbb"
    assert explain.find_checkpoint(home, role="other").key == "ccc"
    assert explain.find_checkpoint(home, "aaa").path == home / "tables" / "explainers" / "aaa" / "checkpoint"
    assert explain.find_checkpoint(home, str(home / "tables" / "explainers" / "aaa")).meta["role"] == "self"
    with pytest.raises(UserInputError, match=r"^explainer: 'zzz' is neither a checkpoint key"):
        explain.find_checkpoint(home, "zzz")
    with pytest.raises(UserInputError, match=r"^explainer: 'ddd' is a patching explainer"):
        explain.find_checkpoint(home, "ddd")
    with pytest.raises(UserInputError, match=r"holds no trained features explainer of role 'judge'"):
        explain.find_checkpoint(home, role="judge")
    np.save(tmp_path / "bad.npy", np.array(["a", "b"]))
    with pytest.raises(UserInputError, match=r"holds no array of numbers"):
        explain.read_vector(tmp_path / "bad.npy")


def test_the_cli_prints_the_explanations_as_a_table_csv_or_json(home, tmp_path, capsys):
    save_checkpoint(home, "k1")
    assert main(["explain", "--home", str(home), "--text", "Hi there", "--layer", "1", "--position", "all",
                 "--format", "json"]) == 0  # fmt: skip
    rows = json.loads(capsys.readouterr().out)
    assert [(r["position"], r["token"]) for r in rows] == list(enumerate("Hi there"))
    assert all(isinstance(r["explanation"], str) for r in rows)
    np.save(tmp_path / "v.npy", np.ones(64, dtype=np.float32))
    assert main(["explain", "--home", str(home), "--vector", str(tmp_path / "v.npy"), "--layer", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["layer", "explanation"] and out[-1] == "(1 row)"
    assert main(["explain", "--home", str(home), "--text", "Hi", "--vector", "v.npy", "--layer", "1"]) == 2
    assert capsys.readouterr().err == (
        "error: recipe field 'text': text and vector to explain; fix: give exactly one of text, feature or vector\n"
    )


def _patched_next(ids: list[int], layers: list[int], t: int, v: torch.Tensor | None) -> int:
    """Greedy next token of ids with h[t] pinned to v after every block of `layers` (None: clean)."""
    lm = models.load(TARGET)

    def pin(module, args, out):
        h = (out[0] if isinstance(out, tuple) else out).clone()
        h[0, t] = v
        return (h, *out[1:]) if isinstance(out, tuple) else h

    hooks = [lm.model.model.layers[ell].register_forward_hook(pin) for ell in layers] if v is not None else []
    with torch.no_grad():
        token = int(lm.model(torch.tensor([ids])).logits[0, -1].argmax())
    for h in hooks:
        h.remove()
    return token


def test_a_patch_question_hands_the_explainer_the_sweeps_vector_and_checks_the_real_outcome(home, monkeypatch):
    save_checkpoint(home, "pk", task="patching", gt="p0", variant="trained")
    gt = Dataset(home, "patching_gt", "p0")
    gt.create({})
    gt.write_shard(0, pa.table({"layer": [[2, 3], [0, 1], [0, 1]]}))  # the ground truth's chunks, in any order
    gt.mark_complete({})
    asked = []

    def generate(self, queries, max_new_tokens, batch_size):
        asked.extend(queries)
        return ["The most likely output would remain <<<x>>>."]

    monkeypatch.setattr(explain.ex.Explainer, "generate", generate)
    recipe = ExplainRecipe(home=str(home), explainer="pk", text="Rome is in", counterfactual_text="Oslo is in",
                           position=3, chunk=1, check=True)  # fmt: skip
    (row,) = explain.run(recipe)
    ids_p = models.load(TARGET).tokenizer("Oslo is in", add_special_tokens=False)["input_ids"]
    v = (_block_outputs(ids_p, 2)[3] + _block_outputs(ids_p, 3)[3]) / 2  # mean over chunk 1 (layers 2, 3) at t' = 3
    (query,) = asked
    np.testing.assert_allclose(query.vector, v.numpy(), atol=1e-5)
    assert query.layer == 2 and "Rome is in" in query.text and "<e>" in query.text  # x's token at t = 3 is "e"
    ids = models.load(TARGET).tokenizer("Rome is in", add_special_tokens=False)["input_ids"]
    clean, patched = _patched_next(ids, [2, 3], 3, None), _patched_next(ids, [2, 3], 3, v)
    tok = models.load(TARGET).tokenizer
    expected = (f"The most likely output would change to <<<{tok.decode([patched])}>>>." if patched != clean
                else f"The output would remain unchanged from <<<{tok.decode([patched])}>>>.")  # fmt: skip
    assert row == {"chunk": 1, "layers": "2-3", "position": 3, "token": "e", "counterfactual_token": "o",
                   "real_outcome": expected, "explanation": "The most likely output would remain <<<x>>>."}  # fmt: skip
    with pytest.raises(
        UserInputError, match=r"^chunk: 2 is not a chunk of this explainer \(2: \[\[0, 1\], \[2, 3\]\]\)"
    ):
        explain.run(recipe.model_copy(update={"chunk": 2}))
    with pytest.raises(UserInputError, match=r"^counterfactual_position: 20 is outside the 10 tokens"):
        explain.run(recipe.model_copy(update={"counterfactual_position": 20}))
    with pytest.raises(UserInputError, match=r"^explainer: 'k1' is a features explainer"):
        save_checkpoint(home, "k1")
        explain.run(recipe.model_copy(update={"explainer": "k1"}))


def _block_outputs(ids: list[int], layer: int) -> torch.Tensor:
    """[T, d]: the output of decoder block `layer` over ids, read by a hook on the block itself (HF's last
    hidden_states entry is after the final norm)."""
    lm = models.load(TARGET)
    seen = []
    hook = lm.model.model.layers[layer].register_forward_hook(
        lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out)
    )
    with torch.no_grad():
        lm.model(torch.tensor([ids]))
    hook.remove()
    return seen[0][0]
