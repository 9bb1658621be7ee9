from storage.errors import TransientError, UserInputError, is_transient


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
