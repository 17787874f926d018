"""The argument checks written once (``checks.py``): what each accepts, and the message of what
it refuses (the name first, so ``errors.instantiate`` can prefix the dotted key)."""

import math

import pytest

from tad_torchtune.checks import (
    check_choice,
    check_int,
    check_non_negative,
    check_positive,
    is_int,
    is_number,
)


def test_booleans_are_neither_ints_nor_numbers():
    assert [is_int(x) for x in (3, -1, True, 2.0, "3", None)] == [True, True, False, False,
                                                                  False, False]
    assert [is_number(x) for x in (3, 2.5, False, "1", None)] == [True, True, False, False, False]


def test_check_int():
    assert check_int(1, "k") == 1 and check_int(0, "k", minimum=0) == 0
    assert check_int(None, "k", optional=True) is None
    for bad in (0, True, 2.5, "3", None):
        with pytest.raises(ValueError) as err:
            check_int(bad, "k")
        assert str(err.value) == f"k must be an integer >= 1, got {bad!r}"
    with pytest.raises(ValueError) as err:
        check_int(-1, "max_steps", optional=True, detail=" (and < vocabulary size)")
    assert str(err.value) == ("max_steps must be an integer >= 1 or null (and < vocabulary size), "
                              "got -1")


def test_check_positive_and_non_negative():
    assert check_positive(2, "beta") == 2.0 and type(check_positive(2, "beta")) is float
    assert check_non_negative(0, "w") == 0.0
    for bad in (0, -1.0, math.nan, math.inf, True, "1"):
        with pytest.raises(ValueError) as err:
            check_positive(bad, "beta")
        assert str(err.value) == f"beta must be a finite number > 0, got {bad!r}"
    for bad in (-1e-9, math.nan, False, None):
        with pytest.raises(ValueError) as err:
            check_non_negative(bad, "w")
        assert str(err.value) == f"w must be a number >= 0, got {bad!r}"


def test_check_choice():
    assert check_choice("row", "abar_scope", ("row", "document")) == "row"
    with pytest.raises(ValueError) as err:
        check_choice("doc", "abar_scope", ("row", "document"))
    assert str(err.value) == "abar_scope must be one of ('row', 'document'), got 'doc'"
