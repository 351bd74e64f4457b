import pytest

from pipeline.decode import parse_label


@pytest.mark.parametrize("text, label", [("3", 3), (" 2.0 ", 2), ("0.", 0), (None, None),
                                         ("", None), (" NaN ", None)])  # missing, as pandas writes it
def test_labels(text, label):
    assert parse_label(text, 10) == label


@pytest.mark.parametrize("text, reason", [("2.5", "unreadable label '2.5'"), ("inf", "unreadable label 'inf'"),
                                          ("cat", "unreadable label 'cat'"), ("10.0", "label 10 out of range 0..9")])
def test_bad_labels(text, reason):
    with pytest.raises(ValueError, match=reason):
        parse_label(text, 10)
