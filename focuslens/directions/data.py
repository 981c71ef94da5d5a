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
    from ..tasks import render

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
