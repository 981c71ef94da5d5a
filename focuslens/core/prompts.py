"""Labelled prompts: token ids plus the exact token span of every named part.

Why this module exists
----------------------
Everything focuslens measures is "attention from these rows to those columns": from the response
tokens to the relevant document, the sink, each distractor. Reference implementations recover those
spans after the fact by fuzzy token matching, which silently lands inside the wrong document for
short answers. Here spans are built *by construction*: a prompt is rendered from named text segments
(instruction, ``doc_1`` ... ``doc_N``, question, ...), the whole text is tokenised **once** (so the ids
are exactly what the model would see, with at most one BOS), and each token is assigned to the segment
whose characters it covers, using the tokenizer's offset mapping.

Tokenizers may merge characters across a segment boundary into one token (``".\\n"``, ``" Paris"``).
Such a token is owned by the segment that holds most of its non-whitespace characters; tokens that
touch two *named* segments are listed in :attr:`LabelledPrompt.merged_tokens` so that nothing is
hidden.

All spans are half-open ``[start, end)`` token ranges into :attr:`LabelledPrompt.tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence, Union

import torch
from jaxtyping import Int
from torch import Tensor

__all__ = [
    "Span",
    "Segment",
    "LabelledPrompt",
    "build_prompt",
    "as_span",
    "normalise_spans",
    "SpanLike",
]


@dataclass(frozen=True, order=True)
class Span:
    """A half-open token range ``[start, end)``."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not isinstance(self.start, int) or not isinstance(self.end, int):
            raise TypeError(f"Span bounds must be ints, got ({self.start!r}, {self.end!r})")
        if self.start < 0 or self.end < self.start:
            raise ValueError(
                f"Invalid span [{self.start}, {self.end}): need 0 <= start <= end."
            )

    def __len__(self) -> int:
        return self.end - self.start

    @property
    def slice(self) -> slice:
        return slice(self.start, self.end)

    def __iter__(self):  # allows `start, end = span`
        yield self.start
        yield self.end

    def shift(self, offset: int) -> "Span":
        return Span(self.start + offset, self.end + offset)

    def __repr__(self) -> str:
        return f"Span({self.start}, {self.end})"


SpanLike = Union[Span, slice, tuple, list]


def as_span(span: SpanLike, *, seq_len: int | None = None, name: str = "span") -> Span:
    """Normalise a ``Span``, ``slice`` or ``(start, end)`` pair and check it against ``seq_len``.

    Raises a ``ValueError`` that names the span and the sequence length when the span is empty or
    reaches outside ``[0, seq_len)``: these are the most common silent bugs of attention analyses.
    """
    if isinstance(span, Span):
        s = span
    elif isinstance(span, slice):
        if span.step not in (None, 1):
            raise ValueError(f"{name}: slices with a step are not spans ({span!r}).")
        if span.start is None or span.stop is None:
            raise ValueError(f"{name}: give explicit start and stop, got {span!r}.")
        s = Span(int(span.start), int(span.stop))
    elif isinstance(span, (tuple, list)) and len(span) == 2:
        s = Span(int(span[0]), int(span[1]))
    else:
        raise TypeError(
            f"{name}: expected a Span, a slice or a (start, end) pair, got {type(span).__name__}."
        )
    if len(s) == 0:
        raise ValueError(f"{name} {s} is empty: it must cover at least one token.")
    if seq_len is not None and s.end > seq_len:
        raise ValueError(
            f"{name} {s} reaches outside the sequence of {seq_len} tokens "
            f"(valid positions are 0..{seq_len - 1})."
        )
    return s


def normalise_spans(
    spans: SpanLike | Sequence[SpanLike],
    *,
    seq_len: int | None = None,
    name: str = "span",
    before: Span | None = None,
) -> list[Span]:
    """One span or a list of spans (their union) -> a validated, non-empty ``list[Span]``.

    The one rule for every API that takes "a span or several": a :class:`Span`, a ``slice`` or an
    ``(start, end)`` pair of ints is one span; any other list/tuple is a list of them. Each is checked
    by :func:`as_span` (non-empty, inside ``seq_len``). With ``before`` (the response span of a scored
    sequence), every span must end at or before ``before.start``: response rows can only attend to
    earlier tokens, so a span reaching into the response is always a bug in the caller.
    """
    if isinstance(spans, (Span, slice)) or (
        isinstance(spans, (tuple, list)) and len(spans) == 2 and all(isinstance(v, int) for v in spans)
    ):
        items = [spans]
    elif isinstance(spans, (tuple, list)):
        items = list(spans)
    else:
        raise TypeError(
            f"{name} must be a Span, a slice, a (start, end) pair, or a list of them; got {type(spans).__name__}."
        )
    if not items:
        raise ValueError(f"{name}: an empty list of spans covers no token.")
    out = []
    for i, s in enumerate(items):
        label = name if len(items) == 1 else f"{name}[{i}]"
        sp = as_span(s, seq_len=seq_len, name=label)
        if before is not None and sp.end > before.start:
            how = "overlaps" if sp.start < before.end else "comes after"
            raise ValueError(
                f"{label} {sp} {how} the response {before} (it ends after the response starts): "
                f"response rows can only attend to earlier tokens, so scored spans must end at or before the response start "
                f"({before.start}). Check that the response was appended after the prompt."
            )
        out.append(sp)
    return out


@dataclass(frozen=True)
class Segment:
    """A named piece of prompt text. Unnamed glue text can be given as a plain ``str``."""

    name: str
    text: str


PartLike = Union[Segment, tuple, str]


@dataclass
class LabelledPrompt:
    """Token ids of one prompt with the exact token span of every named segment.

    Attributes:
        tokens: ``[pos]`` token ids, exactly the tokenisation of ``text`` (one BOS at most).
        text: the full rendered text (chat template included when used).
        spans: segment name -> half-open token :class:`Span`.
        char_spans: segment name -> ``(start, end)`` character range in ``text``.
        merged_tokens: ``(token_index, owner, other_segments)`` for tokens that cover characters of
            more than one named segment (the owner is the segment whose span contains the token).
        order: segment names in prompt order.
    """

    tokens: Int[Tensor, "pos"]
    text: str
    spans: dict[str, Span]
    char_spans: dict[str, tuple[int, int]]
    merged_tokens: list[tuple[int, str, tuple[str, ...]]] = field(default_factory=list)
    order: list[str] = field(default_factory=list)
    chat: bool = False

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def __repr__(self) -> str:
        """One line: length and the segments' spans (the first six), not the ids or the text."""
        names = self.order or list(self.spans)
        segs = ", ".join(f"{n} {self.spans[n].start}..{self.spans[n].end}" for n in names[:6] if n in self.spans)
        more = f", … ({len(names)} segments)" if len(names) > 6 else ""
        return f"LabelledPrompt({len(self)} tokens{', chat' if self.chat else ''}: {segs}{more})"

    def __getitem__(self, name: str) -> Span:
        return self.span(name)

    def span(self, name: str) -> Span:
        try:
            return self.spans[name]
        except KeyError:
            raise KeyError(
                f"No segment named {name!r}; this prompt has {list(self.spans)}."
            ) from None

    def spans_matching(self, prefix: str) -> dict[str, Span]:
        """All spans whose name starts with ``prefix`` (e.g. ``"doc_"``), in prompt order."""
        return {n: self.spans[n] for n in self.order if n.startswith(prefix) and n in self.spans}

    @property
    def response(self) -> Span:
        return self.span("response")

    def decode(self, tokenizer, name: str) -> str:
        return tokenizer.decode(self.tokens[self.span(name).slice].tolist())

    def with_response(
        self,
        tokenizer,
        response: str | Sequence[int] | Tensor,
        *,
        name: str = "response",
    ) -> "LabelledPrompt":
        """Append a response and label it.

        ``response`` as text is appended to :attr:`text` and the whole sequence is re-tokenised, so
        the ids equal tokenising the full text at once. As token ids (e.g. what ``generate``
        returned) the ids are appended verbatim, which is what the model actually conditioned on.
        """
        if name in self.spans:
            raise ValueError(f"This prompt already has a segment named {name!r}.")
        if isinstance(response, str):
            if not response.strip():
                raise ValueError("The response is empty: nothing to score or train on.")
            parts: list[PartLike] = []
            cursor = 0
            for seg in sorted(self.order, key=lambda n: self.char_spans[n][0]):
                a, b = self.char_spans[seg]
                if a > cursor:
                    parts.append(self.text[cursor:a])
                parts.append(Segment(seg, self.text[a:b]))
                cursor = b
            if cursor < len(self.text):
                parts.append(self.text[cursor:])
            parts.append(Segment(name, response))
            return _tokenise_parts(tokenizer, parts, chat=self.chat, rendered=True)
        ids = torch.as_tensor(response, dtype=torch.long).flatten()
        if ids.numel() == 0:
            raise ValueError("The response is empty: nothing to score or train on.")
        start = len(self)
        spans = dict(self.spans)
        spans[name] = Span(start, start + int(ids.numel()))
        text_add = tokenizer.decode(ids.tolist())
        char_spans = dict(self.char_spans)
        char_spans[name] = (len(self.text), len(self.text) + len(text_add))
        return LabelledPrompt(
            tokens=torch.cat([self.tokens, ids.to(self.tokens.device)]),
            text=self.text + text_add,
            spans=spans,
            char_spans=char_spans,
            merged_tokens=list(self.merged_tokens),
            order=[*self.order, name],
            chat=self.chat,
        )


def _check_tokenizer(tokenizer) -> None:
    """A Hugging Face *fast* tokenizer (callable, with offsets), named as such instead of a bare ``TypeError``."""
    from .errors import UsageError

    if tokenizer is None or isinstance(tokenizer, (str, bytes)) or not callable(tokenizer):
        raise UsageError(f"build_prompt: tokenizer must be a Hugging Face fast tokenizer (model.tokenizer, or "
                         f"AutoTokenizer.from_pretrained(name)), got {type(tokenizer).__name__}.")
    if getattr(tokenizer, "is_fast", True) is False:
        raise UsageError(f"build_prompt needs a fast tokenizer (token offsets label the spans); "
                         f"{type(tokenizer).__name__} is a slow one: load it with "
                         "AutoTokenizer.from_pretrained(name, use_fast=True).")


def _normalise_parts(parts: Iterable[PartLike]) -> list[Segment | str]:
    if isinstance(parts, (str, bytes)) or not isinstance(parts, Iterable):
        from .errors import UsageError

        raise UsageError(f"build_prompt: parts must be a list of str glue, (name, text) pairs or Segments, got "
                         f"{type(parts).__name__}; e.g. [\"Read this.\\n\", (\"doc_1\", text), \"\\nQ: \"].")
    out: list[Segment | str] = []
    seen: set[str] = set()
    for p in parts:
        if isinstance(p, str):
            out.append(p)
            continue
        if isinstance(p, tuple) and len(p) == 2:
            p = Segment(str(p[0]), p[1])
        if not isinstance(p, Segment):
            raise TypeError(
                f"Prompt parts must be str (unlabelled glue), (name, text) or Segment; got {p!r}."
            )
        if not isinstance(p.text, str):
            raise TypeError(f"Segment {p.name!r}: text must be a str, got {type(p.text).__name__}.")
        if not p.name:
            raise ValueError("Segment names must be non-empty strings.")
        if p.name in seen:
            raise ValueError(
                f"Duplicate segment name {p.name!r}: each segment needs a unique name "
                "(e.g. doc_1, doc_2, ...)."
            )
        if not p.text.strip():
            raise ValueError(
                f"Segment {p.name!r} is empty (or only whitespace): a span must cover at least one "
                "token. Drop the segment or give it text."
            )
        seen.add(p.name)
        out.append(p)
    return out


def build_prompt(
    tokenizer,
    parts: Iterable[PartLike],
    *,
    chat: bool = False,
    system: str | None = None,
    max_length: int | None = None,
) -> LabelledPrompt:
    """Render named segments into one prompt and label every segment's exact token span.

    Args:
        tokenizer: a Hugging Face *fast* tokenizer (offsets are needed).
        parts: in order; ``(name, text)`` pairs or :class:`Segment` for labelled parts, plain ``str``
            for unlabelled glue (separators, newlines). Names must be unique, texts non-empty.
        chat: wrap the rendered text as the user turn of the tokenizer's chat template (with the
            generation prompt), as chat models are evaluated. Tokenised once: one BOS at most.
        system: optional system message for the chat template.
        max_length: the model's context length; a longer prompt raises a ``ValueError``.

    Returns:
        A :class:`LabelledPrompt`; ``prompt.spans["doc_3"]`` is the half-open token span of that
        segment, ``prompt.tokens`` the ``[pos]`` ids.

    Example:
        >>> p = build_prompt(tok, ["Read this.\\n", ("doc_1", "The sky is blue."), "\\nQ: "])
        >>> tok.decode(p.tokens[p.spans["doc_1"].slice])
        'The sky is blue.'
    """
    _check_tokenizer(tokenizer)
    norm = _normalise_parts(parts)
    if not any(isinstance(p, Segment) for p in norm):
        raise ValueError("A labelled prompt needs at least one named segment.")
    if chat:
        user_text = "".join(p if isinstance(p, str) else p.text for p in norm)
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user_text}
        ]
        if getattr(tokenizer, "chat_template", None) is None:
            from .errors import UsageError

            raise UsageError(
                "chat=True, but this tokenizer has no chat template (a base model): pass chat=False. "
                "render, evaluate, make_direction_examples, make_corrupted_pair and FocusLens.evaluate "
                "default to chat=True and take it; find_heads takes the records rendered that way: "
                "[focuslens.tasks.render(e, model, chat=False) for e in examples]."
            )
        rendered = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        at = rendered.rfind(user_text)
        if at < 0:
            raise RuntimeError(
                "The chat template altered the user message (e.g. stripped whitespace), so segment "
                "offsets cannot be located. Strip leading/trailing whitespace from the prompt parts."
            )
        norm = [rendered[:at], *norm, rendered[at + len(user_text):]]
    prompt = _tokenise_parts(tokenizer, norm, chat=chat, rendered=chat)
    if max_length is not None and len(prompt) > max_length:
        from .errors import UsageError

        # The same rule and wording as focuslens.core.models.check_context, for a tokenizer-only caller.
        raise UsageError(
            f"the prompt has {len(prompt)} tokens but the model's context is {max_length} tokens; shorten it "
            "(fewer or shorter documents) or use a model with a longer context."
        )
    return prompt


def _has_leading_special(tokenizer, text: str) -> bool:
    bos = getattr(tokenizer, "bos_token", None)
    return bool(bos) and text.startswith(bos)


def _tokenise_parts(tokenizer, parts: list[Segment | str], *, chat: bool, rendered: bool) -> LabelledPrompt:
    text = ""
    char_spans: dict[str, tuple[int, int]] = {}
    order: list[str] = []
    for p in parts:
        if isinstance(p, str):
            text += p
        else:
            char_spans[p.name] = (len(text), len(text) + len(p.text))
            order.append(p.name)
            text += p.text
    # Tokenise once. If the text already starts with the BOS string (chat templates of Llama-style
    # models do), do not let the tokenizer add a second one.
    add_special = not (_has_leading_special(tokenizer, text) or rendered)
    enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is not None and len(ids) >= 2 and ids[0] == bos_id and ids[1] == bos_id:
        ids, offsets = ids[1:], offsets[1:]

    owners: list[str | None] = []
    merged: list[tuple[int, str, tuple[str, ...]]] = []
    for i, (a, b) in enumerate(offsets):
        if b <= a:  # special tokens carry (0, 0)
            owners.append(None)
            continue
        best, best_key, touched = None, (0, 0), []
        for name in order:
            sa, sb = char_spans[name]
            lo, hi = max(a, sa), min(b, sb)
            if hi <= lo:
                continue
            touched.append(name)
            chunk = text[lo:hi]
            key = (len(chunk) - sum(c.isspace() for c in chunk), len(chunk))
            if key > best_key:
                best, best_key = name, key
        owners.append(best)
        if len(touched) > 1:
            merged.append((i, best, tuple(n for n in touched if n != best)))

    spans: dict[str, Span] = {}
    for name in order:
        idx = [i for i, o in enumerate(owners) if o == name]
        if not idx:
            raise ValueError(
                f"Segment {name!r} owns no token after tokenisation (it was merged into a "
                "neighbour). Separate it from its neighbours with whitespace or punctuation."
            )
        spans[name] = Span(idx[0], idx[-1] + 1)
    names = sorted(spans, key=lambda n: spans[n].start)
    for x, y in zip(names, names[1:]):
        if spans[x].end > spans[y].start:
            raise ValueError(f"Segments {x!r} and {y!r} interleave after tokenisation.")
    return LabelledPrompt(
        tokens=torch.tensor(ids, dtype=torch.long),
        text=text,
        spans=spans,
        char_spans=char_spans,
        merged_tokens=merged,
        order=order,
        chat=chat,
    )
