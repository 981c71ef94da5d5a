"""Task records (close to Lost-in-the-Middle's) and their rendering into exactly labelled prompts.

CONTRACT (used by scoring, interventions, directions, evaluation): keep these names and fields stable;
adding fields/kwargs is fine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..prompts import LabelledPrompt, Span, build_prompt

__all__ = ["Document", "TaskExample", "RenderedExample", "render", "LITM_INSTRUCTION"]

LITM_INSTRUCTION = (
    "Write a high-quality answer for the given question using only the provided search results "
    "(some of which might be irrelevant)."
)


@dataclass
class Document:
    title: str
    text: str
    isgold: bool = False
    hasanswer: bool = False


@dataclass
class TaskExample:
    """One multi-document QA example (a LitM record plus the fields focuslens needs)."""

    question: str
    answers: list[str]
    ctxs: list[Document]
    gold_index: int | None
    distractor_answers: list[str] = field(default_factory=list)
    task: str = "synthetic_qa"
    meta: dict = field(default_factory=dict)


@dataclass
class RenderedExample:
    """An example rendered to a prompt, with the token spans every analysis needs."""

    example: TaskExample
    prompt: LabelledPrompt  # spans "instruction", "doc_1".."doc_N" (prompt order), "question"
    variant: str  # "original" | "gold_only" | "negative"
    relevant: Span | None  # gold document span (None for "negative")
    distractors: list[Span]
    answers: list[str]
    distractor_answers: list[str]


def render(example: TaskExample, tokenizer, *, variant: str = "original", chat: bool = True,
           max_length: int | None = None) -> RenderedExample:
    """Render to the LitM multi-document QA template (documents numbered in prompt order)."""
    if variant not in ("original", "gold_only", "negative"):
        raise ValueError(f"variant must be original, gold_only or negative; got {variant!r}.")
    docs = list(enumerate(example.ctxs))
    if variant != "original" and example.gold_index is None:
        raise ValueError(f"variant {variant!r} needs an example with a gold document.")
    if variant == "gold_only":
        docs = [(i, d) for i, d in docs if i == example.gold_index]
    elif variant == "negative":
        docs = [(i, d) for i, d in docs if i != example.gold_index]
    parts: list = [("instruction", LITM_INSTRUCTION), "\n\n"]
    for k, (_, d) in enumerate(docs, start=1):
        parts.append((f"doc_{k}", f"Document [{k}](Title: {d.title}) {d.text}"))
        parts.append("\n")
    parts += ["\nQuestion: ", ("question", example.question), "\nAnswer:"]
    prompt = build_prompt(tokenizer, parts, chat=chat, max_length=max_length)
    relevant, distractors = None, []
    for k, (i, _) in enumerate(docs, start=1):
        s = prompt.spans[f"doc_{k}"]
        if i == example.gold_index:
            relevant = s
        else:
            distractors.append(s)
    return RenderedExample(example, prompt, variant, relevant, distractors,
                           list(example.answers), list(example.distractor_answers))
