"""Training data for focus directions: the full prompt with the gold-only response appended (``docs/method.md`` §4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence


from ..core.generation import DEFAULT_MAX_NEW_TOKENS, generate_responses
from ..core.models import HookedModel
from ..core.prompts import LabelledPrompt, Span, as_span

__all__ = ["DirectionExample", "make_direction_examples"]


@dataclass
class DirectionExample:
    """One training example: the full prompt with a response appended, and the relevant span.

    ``prompt.spans["response"]`` gives the rows R; ``relevant`` the columns C.
    """

    prompt: LabelledPrompt
    relevant: Span

    def __post_init__(self) -> None:
        n = len(self.prompt)
        self.relevant = as_span(self.relevant, seq_len=n, name="relevant span")
        r = as_span(self.prompt.response, seq_len=n, name="response span")
        if self.relevant.end > r.start:
            raise ValueError(f"The relevant span {self.relevant} must lie before the response {r}.")


_BUILD = "build training examples with focuslens.directions.make_direction_examples(model, examples) first"


def _check_direction_examples(examples: Any, name: str = "examples") -> None:
    """Refuse anything but a sequence of :class:`DirectionExample`, naming the function that builds them."""
    if isinstance(examples, DirectionExample):
        raise TypeError(f"{name} must be a list of DirectionExample, got a single one: pass [example].")
    if isinstance(examples, (str, bytes)) or not isinstance(examples, Sequence):
        raise TypeError(f"{name} must be a list of DirectionExample, got {type(examples).__name__}: {_BUILD}.")
    for i, ex in enumerate(examples):
        if isinstance(ex, DirectionExample):
            continue
        kind = type(ex).__name__
        if hasattr(ex, "ctxs") and hasattr(ex, "gold_index"):  # a task record (TaskExample)
            what = "a task record, with no prompt or response yet"
        elif hasattr(ex, "prompt") and hasattr(ex, "relevant"):  # RenderedExample
            what = ("a rendered prompt without the response the directions train on; for rendered examples "
                    "pass their records: make_direction_examples(model, [r.example for r in rendered])")
        else:
            what = ("not a training example; for a prompt of your own use "
                    "DirectionExample(prompt.with_response(tokenizer, answer), relevant=prompt['<segment>'])")
        raise TypeError(f"{name}[{i}] is a {kind} ({what}). Focus directions train on DirectionExample "
                        f"(the full prompt with a response appended, and the relevant span): {_BUILD}.")


def make_direction_examples(
    model: HookedModel,
    examples: Sequence[Any],
    *,
    responses: Sequence[str | Sequence[int]] | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    chat: bool = True,
    batch_size: int = 8,
    progress: bool = True,
) -> list[DirectionExample]:
    """The paper's training data: the gold-only prompt's response appended to the full prompt.

    Args:
        examples: :class:`focuslens.tasks.TaskExample` records with a gold document.
        responses: per example, text or token ids to append instead of generating (e.g. cached
            gold-only responses, or the gold answer sentence for ``objective="likelihood"``).
        max_new_tokens: greedy generation length when ``responses`` is None.
        batch_size: gold-only prompts decoded together (:func:`~focuslens.core.generation.generate_responses`;
            1 = one at a time, the same responses up to float near-ties).
        progress: a tqdm bar while the gold-only responses are generated.
    """
    from ..tasks import TaskExample, render

    for i, ex in enumerate(examples):
        if not isinstance(ex, TaskExample):
            hint = ("pass their records: make_direction_examples(model, [r.example for r in rendered])"
                    if hasattr(ex, "example") and hasattr(ex, "prompt") else
                    "for a prompt of your own build DirectionExample(prompt.with_response(tokenizer, answer), "
                    "relevant=prompt['<segment>']) directly")
            raise TypeError(f"make_direction_examples takes focuslens.tasks.TaskExample records; examples[{i}] is a "
                            f"{type(ex).__name__}: {hint}.")
    if responses is not None and len(responses) != len(examples):
        raise ValueError(f"Got {len(responses)} responses for {len(examples)} examples.")
    fulls = []
    for i, ex in enumerate(examples):
        full = render(ex, model.tokenizer, variant="original", chat=chat)
        if full.relevant is None:
            raise ValueError(f"Example {i} has no gold document: focus directions need a relevant span.")
        fulls.append(full)
    if responses is None:
        golds = [render(ex, model.tokenizer, variant="gold_only", chat=chat).prompt.tokens for ex in examples]
        responses = [r.tolist() for r in generate_responses(model, golds, max_new_tokens=max_new_tokens,
                                                            batch_size=batch_size,
                                                            progress=progress and "gold-only responses")]
    out = []
    for full, resp in zip(fulls, responses):
        if (isinstance(resp, str) and not resp.strip()) or (not isinstance(resp, str) and len(resp) == 0):
            continue  # an empty gold-only answer gives no response rows
        out.append(DirectionExample(full.prompt.with_response(model.tokenizer, resp), full.relevant))
    if not out:
        raise ValueError("No usable training example (all responses were empty).")
    return out
