"""Span-edit specs: :class:`SplitSoftmax` and :class:`Pasta`, re-exported by :mod:`focuslens.intervene.specs`.

Both rewrite the attention pattern of chosen heads around a span that each example names (its gold
document by default), so they share the span rules and the batched attach: one span per row of a
left-padded batch, shifted by the row's padding (:meth:`_SpanEdit.attach_batch`).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from ..core.hooks import HookHandle
from ..core.models import HookedModel
from ..core.prompts import Span, normalise_spans
from ..core.checks import head_list, real
from .specs import InterventionSpec, SpanRule, check_batch, format_heads, tokens_of

__all__ = ["SplitSoftmax", "Pasta"]


class _SpanEdit(InterventionSpec):
    """Shared by :class:`SplitSoftmax` and :class:`Pasta`: heads, a span rule, per-row batching."""

    __slots__ = ("heads", "span")
    _strength = "tau"

    def _init_span(self, heads: Iterable[Sequence[int]], span: Any, what: str) -> None:
        self.heads = head_list(heads, what=what)
        if isinstance(span, str):
            if not span:
                raise ValueError(f"{what}: span rule must be a non-empty name such as 'relevant'.")
            self.span = span
        else:
            self.span = tuple(normalise_spans(span, name=f"{what} span"))

    @property
    def per_example(self) -> bool:
        return True

    def _span_identity(self) -> Any:
        return self.span if isinstance(self.span, str) else [[s.start, s.end] for s in self.span]

    def _span_arg(self) -> Any:
        return self.span if isinstance(self.span, str) else list(self.span)

    def spans_for(self, example: Any) -> list[Span]:
        """The span(s) this spec edits for ``example`` (explicit spans are returned as given)."""
        what = type(self).__name__
        if not isinstance(self.span, str):
            return list(self.span)
        if example is None:
            raise ValueError(
                f"{what}(span={self.span!r}) takes its span from the example: "
                "attach(model, example) with a RenderedExample (or give explicit spans)."
            )
        val = getattr(example, self.span, None) if not self.span.startswith("_") else None
        if val is None:
            spans = getattr(getattr(example, "prompt", example), "spans", None)
            if isinstance(spans, Mapping) and self.span in spans:
                val = spans[self.span]
        if val is None or (isinstance(val, (list, tuple)) and len(val) == 0):
            name = getattr(example, "id", None)
            names = sorted(getattr(getattr(example, "prompt", example), "spans", {}) or {})
            raise ValueError(
                f"{what}(span={self.span!r}): example {name!r} has no such span (a 'negative' prompt "
                f"has no relevant document; prompt spans: {names})."
            )
        return normalise_spans(val, name=f"{what} span {self.span!r}")

    def _hook(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def attach(self, model: HookedModel, example: Any = None) -> HookHandle:
        tokens = tokens_of(example) if example is not None else None
        seq_len = int(tokens.shape[-1]) if tokens is not None else None
        fn, strength = self._hook()
        return fn(model, self.heads, self.spans_for(example), strength, seq_len=seq_len)

    def attach_batch(self, model: HookedModel, examples: Sequence[Any], *, offsets: Sequence[int]) -> HookHandle:
        """Each row's own span (read from its example, shifted by its left padding): one attach per batch."""
        check_batch(examples, offsets, what=type(self).__name__)
        widths = {int(tokens_of(e).shape[-1]) + o for e, o in zip(examples, offsets) if tokens_of(e) is not None}
        if len(widths) > 1:
            raise ValueError(f"{type(self).__name__}.attach_batch: prompt length + offset differs between rows "
                             f"({sorted(widths)}); offsets must left-pad every prompt to the same width.")
        fn, strength = self._hook()
        return fn(model, self.heads, [self.spans_for(e) for e in examples], strength,
                  seq_len=widths.pop() if widths else None, offsets=list(offsets))


class SplitSoftmax(_SpanEdit):
    """Split softmax (METHOD.md §3) on ``heads``: the attention mass on the span becomes π^τ.

    Args:
        heads: ``(layer, head)`` query heads, in order (the order is part of the identity).
        tau: exponent > 0; 1 is the identity, < 1 moves attention onto the span.
        span: where the mass goes. A rule read from the example at attach time: ``"relevant"``
            (default: ``example.relevant``, the gold document), ``"distractors"`` (their union),
            any other span attribute of the example, or a prompt span name (``"question"``,
            ``"doc_3"``). Or explicit spans (a :class:`~focuslens.core.prompts.Span`, a ``(start, end)``
            pair, or a list of them), the same for every example.

    Attached per example (the span is in absolute positions of an unpadded prompt), or per batch
    with :meth:`attach_batch`: one span per row, shifted by the row's left padding
    (:func:`~focuslens.intervene.eager.split_softmax` with ``offsets``).
    """

    kind = "split_softmax"
    __slots__ = ("tau",)

    def __init__(self, heads: Iterable[Sequence[int]], tau: float, *, span: SpanRule | Any = "relevant"):
        what = "SplitSoftmax"
        self._init_span(heads, span, what)
        t = real(tau, name="tau", what=what)
        if not t > 0:
            raise ValueError(
                f"{what}: tau must be > 0, got {tau!r}: the mass on the span becomes π^τ, so τ = 1 is the "
                "identity, 0 < τ < 1 raises attention on the span and τ > 1 lowers it."
            )
        self.tau = t
        self._freeze()

    def _ctor(self):
        return (self.heads, self.tau), {"span": self._span_arg()}

    def _identity(self) -> dict[str, Any]:
        return {"heads": [list(h) for h in self.heads], "tau": self.tau, "span": self._span_identity()}

    def _hook(self):
        from .eager import split_softmax

        return split_softmax, self.tau

    def __repr__(self) -> str:
        span = repr(self.span) if isinstance(self.span, str) else list(self.span)
        return f"SplitSoftmax({format_heads(self.heads)}, τ={self.tau:g}, span={span})"


class Pasta(_SpanEdit):
    """PASTA attention steering (Zhang et al. 2024) on ``heads`` (:func:`~focuslens.intervene.eager.pasta`).

    On each head, attention outside the span is multiplied by ``coefficient`` and every row
    renormalised (PASTA's ``+log(coefficient)`` on the scores outside the span). Same span rules
    and batching as :class:`SplitSoftmax`.

    Args:
        heads: ``(layer, head)`` query heads, in order.
        coefficient: > 0; 0.01 is PASTA's default, 1 the identity.
        span: as :class:`SplitSoftmax` (default ``"relevant"``).
    """

    kind = "pasta"
    __slots__ = ("coefficient",)

    def __init__(self, heads: Iterable[Sequence[int]], *, coefficient: float = 0.01, span: SpanRule | Any = "relevant"):
        what = "Pasta"
        self._init_span(heads, span, what)
        c = real(coefficient, name="coefficient", what=what)
        if not c > 0:
            raise ValueError(f"{what}: coefficient must be > 0, got {coefficient!r}: attention outside the span "
                             "is multiplied by it (1 is the identity, PASTA's default is 0.01).")
        self.coefficient = c
        self._freeze()

    def _ctor(self):
        return (self.heads,), {"coefficient": self.coefficient, "span": self._span_arg()}

    def _identity(self) -> dict[str, Any]:
        return {"heads": [list(h) for h in self.heads], "coefficient": self.coefficient,
                "span": self._span_identity()}

    def _hook(self):
        from .eager import pasta

        return pasta, self.coefficient

    def __repr__(self) -> str:
        span = repr(self.span) if isinstance(self.span, str) else list(self.span)
        return f"Pasta({format_heads(self.heads)}, coefficient={self.coefficient:g}, span={span})"
