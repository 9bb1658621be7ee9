import numpy as np

from tasks.common.models import byte_tokenizer
from tasks.explainer.calibrate import Item, answer, exact_match, split_items, token_strings


def test_token_strings_keep_what_can_be_quoted():
    tok = byte_tokenizer()
    ids = np.array(tok('a b"\\\n ', add_special_tokens=False)["input_ids"] * 2)
    assert token_strings(tok, ids, max_chars=5) == {tok.convert_tokens_to_ids("a"): "a",
                                                     tok.convert_tokens_to_ids("b"): "b"}  # fmt: skip


def test_split_holds_token_types_out_at_every_layer():
    token_id = np.repeat(np.arange(40), 3)  # 40 types, 3 occurrences each
    vectors = np.arange(120, dtype=np.float32)[:, None] * np.ones((1, 4), np.float32)  # row r holds r
    names = {t: f"t{t}" for t in range(40)}
    train3, test3 = split_items(token_id, vectors, 3, names, n_train=200, n_test=100, test_fraction=0.25, seed=1)
    train9, test9 = split_items(token_id, vectors, 9, names, n_train=200, n_test=100, test_fraction=0.25, seed=1)
    test_types = {it.token for it in test3}
    assert test_types == {it.token for it in test9}  # the same types held out at every layer
    assert not test_types & {it.token for it in train3 + train9}
    assert len(test3) == len(test_types) and 0 < len(test_types) < 40  # one item per held-out type
    assert len(train3) == 200 and all(it.layer == 3 for it in train3)
    for it in train3 + test3:  # each vector is an occurrence of its own token
        assert f"t{token_id[int(it.vector[0])]}" == it.token


def test_exact_match_is_the_whole_answer():
    items = [Item("a", 3, np.zeros(2, np.float32), "def"), Item("b", 3, np.zeros(2, np.float32), "in")]
    assert answer("def") == 'the token "def"'
    assert exact_match(['the token "def" ', 'the token "int"'], items) == [1.0, 0.0]
