"""Answer metrics: LitM normalisation and best-subspan EM, substring match, distractor copy, positions."""

from __future__ import annotations

import math

import pytest

from focuslens.tasks.metrics import (
    accuracy_by_position,
    best_subspan_em,
    clean_distractor_answers,
    distractor_copy,
    first_line,
    mean_se,
    normalize_answer,
    substring_match,
)


@pytest.mark.parametrize(
    "raw, norm",
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  A   cat,  an apple;  the end. ", "cat apple end"),
        ("Wilhelm Conrad Röntgen", "wilhelm conrad röntgen"),
        ("U.S.A.", "u s"),  # punctuation becomes spaces (LitM), then the article "a" is dropped
        ("snake_case", "snake case"),
        ("‘quoted’ `x´", "quoted x"),
        ("theatre another", "theatre another"),  # articles only as whole words
    ],
)
def test_normalize_answer_like_litm(raw, norm):
    assert normalize_answer(raw) == norm


def test_best_subspan_em():
    assert best_subspan_em("The capital of Veloria is Quentor.", ["Quentor"]) == 1.0
    assert best_subspan_em("quentor", "Quentor") == 1.0
    assert best_subspan_em("It is Pell.\nQuentor", ["Quentor"]) == 0.0  # first line only
    assert best_subspan_em("\n  Quentor\nmore", ["Quentor"]) == 1.0  # leading blank lines skipped
    assert best_subspan_em("Pell", ["Quentor", "Pell"]) == 1.0  # any answer
    assert best_subspan_em("", ["Quentor"]) == 0.0
    assert best_subspan_em("The answer", ["the"]) == 0.0  # an answer that normalises to nothing never matches
    assert best_subspan_em("Röntgen, Wilhelm", ["Wilhelm Conrad Röntgen"]) == 0.0


def test_substring_match_reads_the_whole_response():
    assert substring_match("It is Pell.\nQuentor", ["quentor"]) == 1.0
    assert substring_match("It is Pell.", ["Quentor"]) == 0.0


def test_distractor_copy():
    assert distractor_copy("The capital is Pell.", ["Pell", "Marn"], ["Quentor"]) == 1.0
    assert distractor_copy("The capital is Quentor.", ["Pell"], ["Quentor"]) == 0.0
    assert distractor_copy("Quentor.\nPell", ["Pell"], ["Quentor"]) == 0.0  # first line only
    # A distractor answer that overlaps the gold one cannot be told apart: ignored.
    assert clean_distractor_answers(["Paris", "Paris Hilton", "Lyon", "Lyon"], ["Paris"]) == ["Lyon"]
    assert distractor_copy("Paris Hilton", ["Paris Hilton"], ["Paris"]) == 0.0


def test_first_line():
    assert first_line("  a b\nc") == "a b"
    assert first_line("\n\nx") == "x"


def test_mean_se():
    m, se = mean_se([1, 0, 1, 0])
    assert m == 0.5 and se == pytest.approx(math.sqrt((4 * 0.25 / 3) / 4))
    assert mean_se([1.0]) == (1.0, 0.0)
    assert all(math.isnan(x) for x in mean_se([]))


def test_accuracy_by_position():
    recs = [
        {"em": 1.0, "gold_position": 0}, {"em": 0.0, "gold_position": 0},
        {"em": 1.0, "gold_position": 4}, {"em": 0.0, "gold_position": None},
    ]
    out = accuracy_by_position(recs)
    assert list(out) == [0, 4]
    assert out[0]["accuracy"] == 0.5 and out[0]["n"] == 2 and out[4]["accuracy"] == 1.0


def test_paired_difference_against_the_textbook_formula():
    import math
    import random

    from focuslens.tasks import paired_difference

    rng = random.Random(0)
    a = [float(rng.random() < 0.6) for _ in range(57)]
    b = [float(rng.random() < 0.4) for _ in range(60)]  # longer: only the shared prefix is paired
    d = [x - y for x, y in zip(a, b)]
    m = sum(d) / len(d)
    se = math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d))
    p = paired_difference(a, b)
    assert p.n == 57 and abs(p.mean - m) < 1e-12 and abs(p.se - se) < 1e-12
    assert p.wins == sum(x > 0 for x in d) and p.losses == sum(x < 0 for x in d)
    same = paired_difference(a, a)
    assert same.mean == 0.0 and same.se == 0.0 and same.wins == same.losses == 0
