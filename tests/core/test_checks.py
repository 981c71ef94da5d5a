"""focuslens.core.checks: the one validation per concept (heads, strengths, vectors) that every route calls."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from focuslens.core.checks import (
    check_count,
    check_scaled,
    frozen_vectors,
    head_list,
    is_index,
    positive,
    real,
    validate_heads,
)


def test_is_index_takes_integers_only():
    for ok in (0, 3, np.int64(2), torch.tensor(1)):
        assert is_index(ok), ok
    for bad in (True, False, 1.0, 1.5, np.float32(1), torch.tensor(1.0), torch.tensor(True), torch.tensor([1]), "1"):
        assert not is_index(bad), bad


def test_head_list_refuses_bools_floats_duplicates_and_empty():
    assert head_list([(0, 1), [1, 0], (np.int64(1), torch.tensor(2))]) == ((0, 1), (1, 0), (1, 2))
    for bad, msg in [
        ([(0.0, 1.5)], "pairs of ints"),
        ([(0.0, 1.0)], "pairs of ints"),  # a float that is an integer is not truncated either
        ([(True, 0)], "bools"),
        ([(0, 1), (0, 1)], "twice"),
        ([], "at least one"),
        ([(0, 1, 2)], "pairs"),
        ("ab", "list of"),
        (5, "list of"),
    ]:
        with pytest.raises(ValueError, match=msg):
            head_list(bad)


def test_validate_heads_adds_the_ranges():
    assert validate_heads([(1, 3)], n_layers=2, n_heads=4) == [(1, 3)]
    for bad in ([(2, 0)], [(0, 4)], [(-1, 0)]):
        with pytest.raises(ValueError, match="Unknown head"):
            validate_heads(bad, n_layers=2, n_heads=4)


def test_real_refuses_bools_non_finite_and_non_numbers():
    assert real(2, name="alpha", what="t") == 2.0
    assert real(np.float32(0.5), name="alpha", what="t") == 0.5
    assert real(torch.tensor(-1.5), name="alpha", what="t") == -1.5
    for bad, msg in [(True, "bool"), (False, "bool"), (torch.tensor(True), "bool"), (math.nan, "finite"),
                     (math.inf, "finite"), (-math.inf, "finite"), ("0.5", "real number"), (1j, "real number"),
                     (None, "real number"), (torch.ones(2), "shape")]:
        with pytest.raises(ValueError, match=msg):
            real(bad, name="alpha", what="t")


def test_positive_has_one_message_for_zero_negative_and_non_finite():
    assert positive(0.2, name="tau", what="t") == 0.2
    for bad in (0, -0.5, math.nan, math.inf):
        with pytest.raises(ValueError, match="tau must be > 0 and finite"):
            positive(bad, name="tau", what="t", why="because")
    with pytest.raises(ValueError, match="bool"):
        positive(True, name="tau", what="t")


def test_check_count():
    assert check_count(3, what="t", upper=5) == 3
    for bad in (0, 6, True, 2.0):
        with pytest.raises(ValueError, match="k must be an int"):
            check_count(bad, what="t", upper=5)


def test_frozen_vectors_copies_and_checks():
    u = torch.ones(4)
    fv = frozen_vectors({(0, 1): u}, what="t", d_head=4)
    u[0] = 7.0
    assert fv[(0, 1)][0] == 1.0  # a private copy
    with pytest.raises(TypeError):
        fv[(0, 2)] = torch.ones(4)  # read-only
    for bad, kw, msg in [
        ({}, {}, "non-empty"),
        ({(0, 0): torch.tensor([1.0, math.nan])}, {}, "NaN or inf"),
        ({(0, 0): torch.tensor([1.0, math.inf])}, {}, "NaN or inf"),
        ({(0, 0): torch.ones(3)}, {"d_head": 4}, "d_head = 4"),
        ({(0, 0): torch.ones(4), (0, 1): torch.ones(5)}, {}, "different shapes"),
        ({(0, 0): torch.ones(2, 4)}, {}, "shape"),
        ({(0.0, 1.0): torch.ones(4)}, {}, "pairs of ints"),
        ({(True, 1): torch.ones(4)}, {}, "pairs of ints"),
        ({(0, 0): torch.ones(4, dtype=torch.bool)}, {}, "real-valued"),
        ({(0, 0): True}, {}, "1-D tensor"),
    ]:
        with pytest.raises(ValueError, match=msg):
            frozen_vectors(bad, what="t", **kw)


def test_frozen_vectors_rows():
    fv = frozen_vectors({(0, 0): torch.ones(3, 4), (1, 0): torch.zeros(3, 4)}, what="t", rows=True, d_head=4)
    assert fv[(0, 0)].shape == (3, 4)
    with pytest.raises(ValueError, match="different shapes"):
        frozen_vectors({(0, 0): torch.ones(3, 4), (1, 0): torch.zeros(4)}, what="t", rows=True)
    with pytest.raises(ValueError, match="shape"):
        frozen_vectors({(0, 0): torch.ones(2, 3, 4)}, what="t", rows=True)


def test_check_scaled_is_about_the_dtype():
    v = {(0, 0): torch.full((4,), 1e38)}
    check_scaled(v, 1.0, dtype=torch.float32, what="t")
    check_scaled(v, 10.0, dtype=torch.float64, what="t")  # 1e39 is finite in float64
    with pytest.raises(ValueError, match="not finite in float32"):
        check_scaled(v, 10.0, dtype=torch.float32, what="t")
    with pytest.raises(ValueError, match="not finite in bfloat16|not finite in float16"):
        check_scaled({(0, 0): torch.full((4,), 1e5)}, 1.0, dtype=torch.float16, what="t")
