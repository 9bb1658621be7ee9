import pytest

from storage.errors import MAX_PART_CHARS, TransientError, UserInputError, is_transient, short_repr


def test_transient_detection_follows_the_cause_chain():
    try:
        try:
            raise TimeoutError("nfs")
        except TimeoutError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert is_transient(outer)
    assert is_transient(TransientError("x"))
    assert not is_transient(ValueError("bug"))
    assert not is_transient(UserInputError("f", "bad", "fix"))


def test_user_input_error_is_one_line_with_field_and_fix():
    msg = str(UserInputError("cache.layers", "layer 40 is out of range", "use 0..29"))
    assert msg == "cache.layers: layer 40 is out of range; fix: use 0..29"


@pytest.mark.parametrize(
    "field, problem, expected",
    [
        ("recipe field 'cache\nlayers'", "unknown key", "recipe field 'cache\\nlayers': unknown key; fix: f"),
        ("corpus.source", "/a\r\nb does not exist", "corpus.source: /a\\r\\nb does not exist; fix: f"),
        ("x", "tab\there and \u2028 there", "x: tab\\there and \\u2028 there; fix: f"),
        ("x", "y" * 5000, "x: " + "y" * (MAX_PART_CHARS - 1) + "…; fix: f"),
    ],
)
def test_user_input_error_escapes_line_breaks_and_cuts_long_parts(field, problem, expected):
    msg = str(UserInputError(field, problem, "f"))
    assert msg == expected and len(msg.splitlines()) == 1


def test_short_repr_never_expands_a_nested_value():
    bomb: list = ["x"] * 9
    for _ in range(8):  # 9^9 leaves if written out
        bomb = [bomb] * 9
    assert len(short_repr(bomb)) <= 100 and short_repr(list(range(100))) == "[0, 1, 2, 3, 4, 5, ...]"
