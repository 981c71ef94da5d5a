"""The training path refuses what is not a DirectionExample and names the function that builds them."""

from __future__ import annotations

import pytest

import focuslens as fl
from focuslens.core.prompts import build_prompt
from focuslens.directions import (
    DirectionExample,
    make_direction_examples,
    train_focus_directions,
)
from focuslens.tasks import render
from focuslens.testing import capital_example

HEADS = [(1, 2), (0, 1)]
BUILDER = r"focuslens\.directions\.make_direction_examples\(model, examples\)"


@pytest.fixture(scope="module")
def records():
    return [capital_example(i) for i in range(3)]


def test_task_records_are_refused_by_name(tiny_llama, records):
    with pytest.raises(TypeError, match=rf"examples\[0\] is a TaskExample.*{BUILDER}"):
        train_focus_directions(tiny_llama, records, heads=HEADS, progress=False)


def test_rendered_examples_point_at_their_records(tiny_llama, records):
    rendered = [render(r, tiny_llama.tokenizer) for r in records]
    with pytest.raises(TypeError, match=r"RenderedExample.*\[r\.example for r in rendered\]") as e:
        train_focus_directions(tiny_llama, rendered, heads=HEADS, progress=False)
    assert "make_direction_examples" in str(e.value)


def test_raw_prompts_and_containers(tiny_llama, records):
    p = build_prompt(tiny_llama.tokenizer, ["Read.\n", ("fact", "The sky is green."), "\nQ: colour?"])
    with pytest.raises(TypeError, match=rf"LabelledPrompt.*with_response.*{BUILDER}"):
        train_focus_directions(tiny_llama, [p], heads=HEADS, progress=False)
    with pytest.raises(TypeError, match=rf"got str: build training examples with {BUILDER}"):
        train_focus_directions(tiny_llama, "The sky is green.", heads=HEADS, progress=False)  # type: ignore[arg-type]
    good = make_direction_examples(tiny_llama, records, responses=["B0.", "C1.", "D2."], progress=False)
    with pytest.raises(TypeError, match=r"single one: pass \[example\]"):
        train_focus_directions(tiny_llama, good[0], heads=HEADS, progress=False)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=rf"val_examples\[0\] is a TaskExample.*{BUILDER}"):
        train_focus_directions(tiny_llama, good, heads=HEADS, val_examples=records, progress=False)
    with pytest.raises(ValueError, match="No training examples.*make_direction_examples"):
        train_focus_directions(tiny_llama, [], heads=HEADS, progress=False)


def test_lens_says_the_same_and_a_hand_built_example_trains(tiny_llama, records):
    lens = fl.FocusLens(tiny_llama)
    with pytest.raises(TypeError, match=BUILDER):
        lens.train_directions(records, heads=HEADS, progress=False)
    with pytest.raises(TypeError, match=BUILDER):
        lens.train_directions([render(r, tiny_llama.tokenizer) for r in records], heads=HEADS, progress=False)
    # the error's recipe for a prompt of one's own works as written
    p = build_prompt(tiny_llama.tokenizer, ["Read.\n", ("fact", "The sky is green."), "\nQ: colour?\nA:"])
    own = DirectionExample(p.with_response(tiny_llama.tokenizer, " green"), relevant=p["fact"])
    d = lens.train_directions([own], heads=HEADS, steps=3, progress=False)
    assert d.heads == HEADS


def test_make_direction_examples_names_what_it_takes(tiny_llama, records):
    rendered = [render(r, tiny_llama.tokenizer) for r in records]
    with pytest.raises(TypeError, match=r"TaskExample records; examples\[0\] is a RenderedExample.*r\.example"):
        make_direction_examples(tiny_llama, rendered, responses=["a", "b", "c"], progress=False)
    p = build_prompt(tiny_llama.tokenizer, ["Read.\n", ("fact", "The sky is green.")])
    with pytest.raises(TypeError, match=r"LabelledPrompt.*DirectionExample\(prompt\.with_response"):
        make_direction_examples(tiny_llama, [p], responses=["a"], progress=False)
    ok = make_direction_examples(tiny_llama, [r.example for r in rendered], responses=["a", "b", "c"], progress=False)
    assert len(ok) == 3 and all(isinstance(e, DirectionExample) for e in ok)
