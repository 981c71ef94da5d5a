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
