"""Task records and their labelled prompts: one interface for every distraction task.

Why this module exists
----------------------
Every focuslens measurement needs three things about a prompt: the token ids, the exact token span
of the *relevant* context (the gold document, the gold key-value pair, the needle), and the spans of
everything else (distractors, the question). This module holds the one record type that every task
produces (:class:`TaskExample`, close to a *Lost in the Middle* JSONL line) and the one renderer
(:func:`render`) that turns it into a :class:`RenderedExample` through
:func:`focuslens.core.prompts.build_prompt`, so spans are exact *by construction*, never recovered by
fuzzy matching.

A record is plain data (JSON-serialisable, LitM-compatible: ``question``, ``answers``, ``ctxs`` with
``title``/``text``/``isgold``/``hasanswer``, plus ``gold_index`` and ``distractor_answers``). Prompt
variants (:data:`Variant`) and gold position are chosen when rendering:

* ``"original"``: all documents, gold where the record (or ``gold_position=``) puts it;
* ``"gold_only"``: only the gold document (the upper-bound baseline; ``"gold"`` is an alias);
* ``"negative"``: every document but the gold one (the lower-bound baseline).

Multi-gold records (RULER's multi-value needles, variable-tracking chains, HotpotQA's two supporting
paragraphs) list every gold document in ``support`` (indices; ``gold_index`` is one of them, the one
``relevant`` names). ``"gold_only"`` then keeps all of them and ``"negative"`` drops all of them, and
:attr:`RenderedExample.support_spans` gives their spans (the ``"support"`` span rule of
:class:`~focuslens.intervene.SplitSoftmax` / :class:`~focuslens.intervene.Pasta`).

CONTRACT (used by scoring, interventions, directions, evaluation): the names and fields of
:class:`Document`, :class:`TaskExample`, :class:`RenderedExample` and :func:`render` are stable;
fields and keyword arguments are only ever added (with defaults, at the end).

Example:
    >>> from focuslens.tasks import make_synthetic_qa, render
    >>> ex = make_synthetic_qa(1, n_docs=10, seed=0)[0]
    >>> r = render(ex, model.tokenizer, chat=True)
    >>> model.tokenizer.decode(r.tokens[r.relevant.slice])
    'Document [6](Title: Grothova) The capital of Grothova is Drulport.'
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Literal, Sequence

from jaxtyping import Int
from torch import Tensor

from ..core.prompts import LabelledPrompt, Span, build_prompt

__all__ = [
    "Document",
    "TaskExample",
    "RenderedExample",
    "Variant",
    "TaskKind",
    "VARIANTS",
    "TEMPLATES",
    "LITM_INSTRUCTION",
    "QA_INSTRUCTION",
    "normalise_variant",
    "KV_INSTRUCTION",
    "NEEDLE_INSTRUCTION",
    "NEEDLE_SENTENCE",
    "VT_INSTRUCTION",
    "render",
    "render_many",
    "format_prompt_text",
]

Variant = Literal["original", "gold_only", "negative"]
VARIANTS: tuple[str, ...] = ("original", "gold_only", "negative")
_VARIANT_ALIASES = {"gold": "gold_only", "oracle": "gold_only"}
#: Prompt templates: LitM multi-document QA, LitM key-value retrieval (JSON), RULER needle in a
#: haystack, RULER variable tracking.
TaskKind = Literal["qa", "kv", "needle", "variable_tracking"]
TEMPLATES: tuple[str, ...] = ("qa", "kv", "needle", "variable_tracking")

#: The *Lost in the Middle* multi-document QA instruction (``qa.prompt``), verbatim.
QA_INSTRUCTION = (
    "Write a high-quality answer for the given question using only the provided search results "
    "(some of which might be irrelevant)."
)
LITM_INSTRUCTION = QA_INSTRUCTION
#: The *Lost in the Middle* key-value retrieval instruction (``kv_retrieval.prompt``), verbatim.
KV_INSTRUCTION = "Extract the value corresponding to the specified key in the JSON object below."
#: RULER's multi-key needle-in-a-haystack instruction.
NEEDLE_INSTRUCTION = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards."
)
#: RULER's needle sentence (``type_needle_v="numbers"``): the one definition every needle task formats.
NEEDLE_SENTENCE = "One of the special magic numbers for {key} is: {value}."
#: RULER's variable-tracking instruction, verbatim.
VT_INSTRUCTION = "Memorize and track the chain(s) of variable assignment hidden in the following text."

_DOC_KEYS = ("title", "text", "isgold", "hasanswer")


def _short(text: str, n: int) -> str:
    """``text`` on one line, cut to ``n`` characters with an ellipsis (for reprs)."""
    one = " ".join(str(text).split())
    return one if len(one) <= n else one[: n - 1] + "…"


@dataclass
class Document:
    """One context passage (a LitM ``ctxs`` entry).

    Attributes:
        title, text: the passage; rendered as ``Document [i](Title: {title}) {text}`` for QA.
        isgold: this is the relevant passage (one per record, or none; several only when the
            record lists them all in ``support``).
        hasanswer: the passage contains one of the record's answers.
        answers: answers this passage states for *its own* question (a distractor's value); the
            record's ``distractor_answers`` are built from them. Not a LitM field (kept in JSON as
            ``"answers"`` only when non-empty).
        kind: how the passage was made (``"gold"``, ``"same_relation"``, ``"same_entity"``,
            ``"unrelated"``, ``"retrieved"``, ``"random"``, ``"hard"``, ``"needle"``, ``"haystack"``...).
        extra: any other JSON keys (LitM ``id``, ``score``, ``original_retrieval_index``), kept
            verbatim for round trips.
    """

    title: str
    text: str
    isgold: bool = False
    hasanswer: bool = False
    answers: list[str] = field(default_factory=list)
    kind: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        """One line: title, the text's opening words, gold mark."""
        return f"Document({_short(self.title, 30)!r}: {_short(self.text, 60)!r}{', gold' if self.isgold else ''})"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "title": self.title,
            "text": self.text,
            "isgold": self.isgold,
            "hasanswer": self.hasanswer,
        }
        if self.answers:
            d["answers"] = list(self.answers)
        if self.kind is not None:
            d["kind"] = self.kind
        d.update(copy.deepcopy(self.extra))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Document":
        if not isinstance(d, dict):
            raise ValueError(f"a ctxs entry must be a JSON object, got {type(d).__name__}")
        missing = [k for k in ("title", "text") if k not in d]
        if missing:
            raise ValueError(f"a ctxs entry lacks {missing} (has {sorted(d)})")
        if not isinstance(d["text"], str) or not isinstance(d["title"], (str, type(None))):
            raise ValueError("a ctxs entry needs string 'title' and 'text'")
        extra = {
            k: copy.deepcopy(v)
            for k, v in d.items()
            if k not in (*_DOC_KEYS, "answers", "kind")
        }
        answers = d.get("answers") or []
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise ValueError("'answers' of a ctxs entry must be a list of strings")
        return cls(
            title=d["title"] if d["title"] is not None else "",
            text=d["text"],
            isgold=bool(d.get("isgold", False)),
            hasanswer=bool(d.get("hasanswer", False)),
            answers=list(answers),
            kind=d.get("kind"),
            extra=extra,
        )


@dataclass
class TaskExample:
    """One task instance: a question, its answers, and the documents (a LitM record, extended).

    Attributes:
        question: the question text (for ``task="kv"`` the key, for ``"needle"`` the needle key).
        answers: accepted answers (best-subspan EM: any of them as a substring counts).
        ctxs: the documents, in prompt order.
        gold_index: index of the gold document in ``ctxs`` (``None``: no gold document; inferred
            from ``isgold`` when ``None`` is given and one document is marked).
        distractor_answers: answers stated by distractors (used for the distractor-copy rate).
        task: the task's name (``"synthetic_qa"``, ``"litm_nq"``, ``"kv"``, ``"needle"``...).
        meta: anything else (generator settings, relation, source line, LitM extra keys).
        id: a stable identifier (the evaluation runner keys its records on it).
        template: the prompt template: ``"qa"`` (LitM multi-document QA), ``"kv"`` (LitM key-value
            retrieval, JSON), ``"needle"`` (RULER needle in a haystack; the question asks for "all the
            special magic numbers" when there are several answers), ``"variable_tracking"`` (RULER VT;
            ``question`` is the value whose variables are asked for).
        support: indices of *every* gold document when there are several (multi-value needles, a
            variable chain, multi-hop QA); it includes ``gold_index`` (inferred as ``support[0]``
            when ``gold_index`` is ``None``), and all of them are marked ``isgold``. Empty (default):
            the one gold document ``gold_index``. Stored sorted.
    """

    question: str
    answers: list[str]
    ctxs: list[Document]
    gold_index: int | None = None
    distractor_answers: list[str] = field(default_factory=list)
    task: str = "synthetic_qa"
    meta: dict[str, Any] = field(default_factory=dict)
    id: str = ""
    template: str = "qa"
    support: list[int] = field(default_factory=list)

    def __repr__(self) -> str:
        """One line: id, task, question, answers, number of documents and the gold position."""
        ident = f"{self.id!r}, " if self.id else ""
        answers = ", ".join(repr(_short(a, 30)) for a in self.answers[:3]) + (", …" if len(self.answers) > 3 else "")
        support = f", support={self.support}" if self.support else ""
        return (f"TaskExample({ident}{self.task}: {_short(self.question, 80)!r} → [{answers}], "
                f"{len(self.ctxs)} docs, gold={self.gold_index}{support})")

    def __post_init__(self) -> None:
        if isinstance(self.answers, str):
            self.answers = [self.answers]
        if not self.answers or not all(isinstance(a, str) and a.strip() for a in self.answers):
            raise ValueError(f"TaskExample {self.id!r}: answers must be a non-empty list of strings.")
        if not isinstance(self.question, str) or not self.question.strip():
            raise ValueError(f"TaskExample {self.id!r}: the question is empty.")
        golds = [i for i, d in enumerate(self.ctxs) if d.isgold]
        if self.support:
            self._check_support(golds)
        elif self.gold_index is None:
            if len(golds) > 1:
                raise ValueError(
                    f"TaskExample {self.id!r}: {len(golds)} documents are marked isgold "
                    f"(indices {golds}); mark exactly one or none, or list several in support=."
                )
            self.gold_index = golds[0] if golds else None
        else:
            if not 0 <= self.gold_index < len(self.ctxs):
                raise ValueError(
                    f"TaskExample {self.id!r}: gold_index {self.gold_index} is outside its "
                    f"{len(self.ctxs)} documents."
                )
            if golds and golds != [self.gold_index]:
                raise ValueError(
                    f"TaskExample {self.id!r}: gold_index {self.gold_index} disagrees with the "
                    f"documents marked isgold {golds}."
                )
            self.ctxs[self.gold_index].isgold = True
        if self.template not in TEMPLATES:
            raise ValueError(
                f"TaskExample {self.id!r}: unknown template {self.template!r}; use one of {TEMPLATES}."
            )

    def _check_support(self, golds: list[int]) -> None:
        """Validate ``support`` (ints, in range, no duplicates, holds ``gold_index``); sort it, mark isgold."""
        sup = self.support
        if isinstance(sup, (str, bytes)) or not isinstance(sup, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in sup
        ):
            raise ValueError(f"TaskExample {self.id!r}: support must be a list of document indices, got {sup!r}.")
        n = len(self.ctxs)
        bad = [i for i in sup if not 0 <= i < n]
        if bad:
            raise ValueError(f"TaskExample {self.id!r}: support indices {bad} are outside its {n} documents.")
        if len(set(sup)) != len(sup):
            dup = sorted({i for i in sup if list(sup).count(i) > 1})
            raise ValueError(f"TaskExample {self.id!r}: support lists documents {dup} more than once.")
        if self.gold_index is None:
            self.gold_index = sup[0]
        if self.gold_index not in sup:
            raise ValueError(
                f"TaskExample {self.id!r}: support {list(sup)} does not include gold_index {self.gold_index}; "
                "the gold document is one of the support documents (add it)."
            )
        stray = [i for i in golds if i not in sup]
        if stray:
            raise ValueError(
                f"TaskExample {self.id!r}: documents {stray} are marked isgold but are not in support {list(sup)}."
            )
        self.support = sorted(sup)
        for i in self.support:
            self.ctxs[i].isgold = True

    # -- views ------------------------------------------------------------------------------------

    @property
    def n_docs(self) -> int:
        return len(self.ctxs)

    @property
    def gold(self) -> Document | None:
        return None if self.gold_index is None else self.ctxs[self.gold_index]

    @property
    def support_indices(self) -> list[int]:
        """Indices of every gold document: ``support``, or ``[gold_index]`` (``[]`` with no gold)."""
        if self.support:
            return list(self.support)
        return [] if self.gold_index is None else [self.gold_index]

    @property
    def distractors(self) -> list[Document]:
        """Every document that is not gold (not ``gold_index``, not in ``support``)."""
        gold = set(self.support_indices)
        return [d for i, d in enumerate(self.ctxs) if i not in gold]

    def with_gold_at(self, position: int) -> "TaskExample":
        """A copy with the gold document moved to ``position`` (0-based; negative counts from the end).

        The other documents keep their relative order (``support`` follows them).
        """
        if self.gold_index is None:
            raise ValueError(f"TaskExample {self.id!r} has no gold document to move.")
        n = len(self.ctxs)
        pos = position + n if position < 0 else position
        if not 0 <= pos < n:
            raise ValueError(f"gold position {position} is outside 0..{n - 1} ({n} documents).")
        order = list(range(n))
        order.insert(pos, order.pop(self.gold_index))
        docs = [self.ctxs[j] for j in order]
        support = sorted(order.index(j) for j in self.support)
        return replace(self, ctxs=docs, gold_index=pos, meta=dict(self.meta), support=support)

    def variant(self, variant: Variant | str = "original") -> "TaskExample":
        """The record that the prompt ``variant`` renders (a copy; ``"original"`` returns ``self``).

        With several gold documents (``support``), ``"gold_only"`` keeps all of them (in order) and
        ``"negative"`` drops all of them: the bounds are "every relevant document" and "none".
        """
        variant = normalise_variant(variant)
        if variant == "original":
            return self
        if self.gold_index is None:
            raise ValueError(
                f"Variant {variant!r} needs a gold document, and TaskExample {self.id!r} has none."
            )
        gold = self.support_indices
        if variant == "gold_only":
            support = list(range(len(gold))) if self.support else []
            return replace(self, ctxs=[self.ctxs[i] for i in gold], gold_index=gold.index(self.gold_index),
                           meta=dict(self.meta), support=support)
        docs = [d for i, d in enumerate(self.ctxs) if i not in gold]
        if not docs:
            raise ValueError(f"Variant 'negative' of {self.id!r} would have no documents at all.")
        return replace(self, ctxs=docs, gold_index=None, meta=dict(self.meta), support=[])

    # -- (de)serialisation ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A LitM-compatible JSON object (LitM readers ignore the extra keys)."""
        d: dict[str, Any] = {
            "question": self.question,
            "answers": list(self.answers),
            "ctxs": [c.to_dict() for c in self.ctxs],
            "gold_index": self.gold_index,
            "distractor_answers": list(self.distractor_answers),
        }
        d["task"] = self.task
        if self.id:
            d["id"] = self.id
        if self.template != "qa":
            d["template"] = self.template
        if self.support:
            d["support"] = list(self.support)
        for k, v in self.meta.items():
            if k not in d:
                d[k] = copy.deepcopy(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, id: str | None = None) -> "TaskExample":
        """Parse a LitM line (or one written by :meth:`to_dict`); raises ``ValueError`` if malformed."""
        if not isinstance(d, dict):
            raise ValueError(f"a record must be a JSON object, got {type(d).__name__}")
        for k in ("question", "answers", "ctxs"):
            if k not in d:
                raise ValueError(f"the record lacks {k!r} (has {sorted(d)})")
        if not isinstance(d["question"], str):
            raise ValueError("'question' must be a string")
        answers = d["answers"]
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise ValueError("'answers' must be a non-empty list of strings")
        if not isinstance(d["ctxs"], list):
            raise ValueError("'ctxs' must be a list of passages")
        ctxs = []
        for i, c in enumerate(d["ctxs"]):
            try:
                ctxs.append(Document.from_dict(c))
            except ValueError as e:
                raise ValueError(f"ctxs[{i}]: {e}") from None
        gold_index = d.get("gold_index")
        if gold_index is not None and not isinstance(gold_index, int):
            raise ValueError("'gold_index' must be an integer or null")
        dist = d.get("distractor_answers") or []
        if not isinstance(dist, list) or not all(isinstance(a, str) for a in dist):
            raise ValueError("'distractor_answers' must be a list of strings")
        support = d.get("support") or []
        if not isinstance(support, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in support):
            raise ValueError("'support' must be a list of document indices (integers)")
        known = {"question", "answers", "ctxs", "gold_index", "distractor_answers", "id", "task",
                 "template", "support"}
        meta = {k: copy.deepcopy(v) for k, v in d.items() if k not in known}
        return cls(
            question=d["question"],
            answers=list(answers),
            ctxs=ctxs,
            gold_index=gold_index,
            distractor_answers=list(dist),
            task=str(d.get("task", "litm")),
            meta=meta,
            id=str(d.get("id", id if id is not None else "")),
            template=str(d.get("template", "qa")),
            support=list(support),
        )


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def normalise_variant(variant: str) -> str:
    """``"original"``, ``"gold_only"`` (alias ``"gold"``) or ``"negative"``; anything else raises."""
    v = _VARIANT_ALIASES.get(variant, variant) if isinstance(variant, str) else variant
    if v not in VARIANTS:
        raise ValueError(f"Unknown variant {variant!r}; use one of {VARIANTS}.")
    return v


def _doc_text(ex: TaskExample, i: int, doc: Document) -> str:
    if ex.template == "qa":
        return f"Document [{i + 1}](Title: {doc.title}) {doc.text}"
    return doc.text


def _parts(ex: TaskExample) -> list:
    """Named segments + glue for the record's template (``doc_1``..``doc_N``, ``question``)."""
    docs = [(f"doc_{i + 1}", _doc_text(ex, i, d)) for i, d in enumerate(ex.ctxs)]
    parts: list = []
    if ex.template == "qa":
        # LitM qa.prompt: instruction, blank line, documents joined by "\n", blank line, question.
        parts += [("instruction", QA_INSTRUCTION), "\n\n"]
        for seg in docs:
            parts += [seg, "\n"]
        parts += ["\nQuestion: ", ("question", ex.question), "\nAnswer:"]
    elif ex.template == "kv":
        # LitM kv_retrieval.prompt: {"k": "v",\n "k": "v",\n ... "k": "v"}
        parts += [("instruction", KV_INSTRUCTION), "\n\nJSON data:\n{"]
        for j, seg in enumerate(docs):
            if j:
                parts.append(",\n ")
            parts.append(seg)
        parts += ["}\n\n", ("question", f'Key: "{ex.question}"'), "\nCorresponding value:"]
    elif ex.template == "needle":
        # RULER niah: instruction, haystack with needles, question (plural with several answers, as
        # RULER's niah_multivalue asks).
        parts += [("instruction", NEEDLE_INSTRUCTION), "\n"]
        for j, seg in enumerate(docs):
            if j:
                parts.append(" ")
            parts.append(seg)
        ask = (
            f"What are all the special magic numbers for {ex.question} mentioned in the provided text?"
            if len(ex.answers) > 1
            else f"What is the special magic number for {ex.question} mentioned in the provided text?"
        )
        parts += ["\n", ("question", ask), "\nAnswer:"]
    elif ex.template == "variable_tracking":
        # RULER vt: instruction, blank line, assignments and noise (one document a line), question.
        parts += [("instruction", VT_INSTRUCTION), "\n\n"]
        for j, seg in enumerate(docs):
            if j:
                parts.append("\n")
            parts.append(seg)
        parts += [
            "\n",
            ("question", f"Question: Find all variables that are assigned the value {ex.question} in the text above."),
            "\nAnswer:",
        ]
    else:  # pragma: no cover - checked in TaskExample
        raise ValueError(f"unknown template {ex.template!r}")
    return parts


def format_prompt_text(example: TaskExample, *, variant: Variant | str = "original") -> str:
    """The plain prompt text (no chat template, no tokenisation), e.g. to show or to diff."""
    ex = example.variant(variant)
    return "".join(p if isinstance(p, str) else p[1] for p in _parts(ex))


@dataclass
class RenderedExample:
    """A task record rendered to tokens, with the exact span of every part.

    Attributes:
        example: the record as rendered (after the variant and gold position were applied; its
            ``gold_index`` is the gold document's position in the prompt).
        prompt: the :class:`~focuslens.core.prompts.LabelledPrompt`; spans ``"instruction"``,
            ``"doc_1"``..``"doc_N"`` (prompt order) and ``"question"``.
        variant: ``"original"``, ``"gold_only"`` or ``"negative"``.
        relevant: span of the gold document / gold key-value pair / needle (``None`` for
            ``"negative"``).
        distractors: spans of the other (non-gold, non-support) documents, in prompt order.
        answers: accepted answers.
        distractor_answers: answers stated by the distractors.
        source: the record before the variant and gold position were applied.
        index: position in the list it was rendered from (``None`` when rendered alone).

    All spans are half-open ``[start, end)`` token ranges into :attr:`tokens`.
    """

    example: TaskExample
    prompt: LabelledPrompt
    variant: str
    relevant: Span | None
    distractors: list[Span]
    answers: list[str]
    distractor_answers: list[str]
    source: TaskExample | None = None
    index: int | None = None

    @property
    def tokens(self) -> Int[Tensor, "pos"]:
        """``[pos]`` token ids of the prompt."""
        return self.prompt.tokens

    @property
    def id(self) -> str:
        return self.example.id

    @property
    def n_docs(self) -> int:
        return self.example.n_docs

    @property
    def doc_spans(self) -> list[Span]:
        """Token span of every document, in prompt order."""
        return [self.prompt.spans[f"doc_{i + 1}"] for i in range(self.example.n_docs)]

    @property
    def gold_position(self) -> int | None:
        """0-based position of the gold document among the rendered documents (``None``: none)."""
        return self.example.gold_index

    @property
    def gold_span(self) -> Span | None:
        """Alias of :attr:`relevant`."""
        return self.relevant

    @property
    def support_spans(self) -> list[Span]:
        """Spans of every gold document (``example.support``), in prompt order; ``[gold_span]`` for a
        single-gold record, ``[]`` with no gold document (``"negative"``). The ``"support"`` span rule."""
        return [self.doc_spans[i] for i in self.example.support_indices]

    @property
    def question_span(self) -> Span:
        return self.prompt.spans["question"]

    def __len__(self) -> int:
        return len(self.prompt)

    def __repr__(self) -> str:
        """One line: the record, the variant, length and the relevant span (not the tokens)."""
        rel = f"{self.relevant.start}..{self.relevant.end}" if self.relevant is not None else None
        return (f"RenderedExample({self.variant}, {len(self)} tokens, relevant={rel}, "
                f"{len(self.distractors)} distractors; {self.example!r})")


def _tokenizer_of(model_or_tokenizer: Any):
    return getattr(model_or_tokenizer, "tokenizer", None) or model_or_tokenizer


def _max_length_of(model_or_tokenizer: Any) -> int | None:
    cfg = getattr(model_or_tokenizer, "cfg", None)
    n = int(getattr(cfg, "n_ctx", 0) or 0) if cfg is not None else 0
    return n or None


def render(
    example: TaskExample,
    tokenizer: Any,
    *,
    variant: Variant | str = "original",
    chat: bool = True,
    gold_position: int | None = None,
    system: str | None = None,
    max_length: int | None = None,
    index: int | None = None,
) -> RenderedExample:
    """Render a record into its task's prompt template, with exact token spans.

    Args:
        example: the record.
        tokenizer: a fast tokenizer, or a hooked model (its ``tokenizer`` and context length are used).
        variant: ``"original"`` (all documents), ``"gold_only"`` (gold only; alias ``"gold"``),
            ``"negative"`` (gold removed).
        chat: put the prompt as the user turn of the tokenizer's chat template (as chat models are
            evaluated); ``False`` for base models.
        gold_position: move the gold document to this 0-based position first (``"original"`` only;
            ``None`` keeps the record's order).
        system: optional system message for the chat template.
        max_length: raise if the prompt is longer (default: the model's ``n_ctx`` when a model is given).

    Returns:
        A :class:`RenderedExample`; ``r.relevant`` is the gold document's token span, ``r.doc_spans``
        all documents', ``r.question_span`` the question's.
    """
    tok = _tokenizer_of(tokenizer)
    if max_length is None:
        max_length = _max_length_of(tokenizer)
    src = example
    if gold_position is not None:
        if variant != "original":
            raise ValueError("gold_position only applies to the 'original' variant.")
        src = example.with_gold_at(gold_position)
    variant = normalise_variant(variant)
    ex = src.variant(variant)
    prompt = build_prompt(tok, _parts(ex), chat=chat, system=system, max_length=max_length)
    spans = [prompt.spans[f"doc_{i + 1}"] for i in range(ex.n_docs)]
    g = ex.gold_index
    gold = set(ex.support_indices)
    return RenderedExample(
        example=ex,
        prompt=prompt,
        variant=variant,
        relevant=None if g is None else spans[g],
        distractors=[s for i, s in enumerate(spans) if i not in gold],
        answers=list(ex.answers),
        distractor_answers=list(ex.distractor_answers),
        source=example,
        index=index,
    )


def render_many(
    examples: Iterable[TaskExample],
    tokenizer: Any,
    **kwargs: Any,
) -> list[RenderedExample]:
    """:func:`render` every record (``index`` set to its position in ``examples``)."""
    return [render(ex, tokenizer, index=i, **kwargs) for i, ex in enumerate(examples)]


def _unique(xs: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for x in xs:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out
