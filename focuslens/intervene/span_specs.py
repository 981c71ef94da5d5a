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
from ..core.checks import head_list, positive
from .edits import attach_span_edit, pasta_pattern, split_softmax_pattern
from .specs import InterventionSpec, SpanRule, check_batch, format_heads, tokens_of

__all__ = ["SplitSoftmax", "Pasta"]

#: Span rules whose name differs from the example attribute they read: ``"support"`` is
#: ``RenderedExample.support_spans`` (every gold document; ``[relevant]`` for a single-gold record).
_RULE_ATTRIBUTES = {"support": "support_spans"}


class _SpanEdit(InterventionSpec):
    """Shared by :class:`SplitSoftmax` and :class:`Pasta`: heads, a span rule, per-row batching."""

    __slots__ = ("heads", "span")
    _eager_name = "span edit"

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
        attr = _RULE_ATTRIBUTES.get(self.span, self.span)
        val = getattr(example, attr, None) if not self.span.startswith("_") else None
        if val is None:
            spans = getattr(getattr(example, "prompt", example), "spans", None)
            if isinstance(spans, Mapping) and self.span in spans:
                val = spans[self.span]
        if val is None or (isinstance(val, (list, tuple)) and len(val) == 0):
            name = getattr(example, "id", None)
            names = sorted(getattr(getattr(example, "prompt", example), "spans", {}) or {})
            raise ValueError(
                f"{what}(span={self.span!r}): example {name!r} has no such span (a 'negative' prompt "
                f"has no relevant or support document; prompt spans: {names})."
            )
        return normalise_spans(val, name=f"{what} span {self.span!r}")

    def _edit(self):  # pragma: no cover - abstract
        """``(edit(pattern, key_mask, query_positions=, min_query=), is_identity, label)``."""
        raise NotImplementedError

    def attach(self, model: HookedModel, example: Any = None) -> HookHandle:
        tokens = tokens_of(example) if example is not None else None
        seq_len = int(tokens.shape[-1]) if tokens is not None else None
        return self.attach_spans(model, self.spans_for(example), seq_len=seq_len)

    def attach_batch(self, model: HookedModel, examples: Sequence[Any], *, offsets: Sequence[int]) -> HookHandle:
        """Each row's own span (read from its example, shifted by its left padding): one attach per batch."""
        width = self._padded_width(examples, offsets, "attach_batch")
        return self.attach_spans(model, [self.spans_for(e) for e in examples], seq_len=width, offsets=list(offsets))

    def _padded_width(self, examples: Sequence[Any], offsets: Sequence[int], where: str) -> int | None:
        """The batch's padded prompt length (prompt length + offset, the same for every row), or None."""
        check_batch(examples, offsets, what=type(self).__name__)
        widths = {int(tokens_of(e).shape[-1]) + o for e, o in zip(examples, offsets) if tokens_of(e) is not None}
        if len(widths) > 1:
            raise ValueError(f"{type(self).__name__}.{where}: prompt length + offset differs between rows "
                             f"({sorted(widths)}); offsets must left-pad every prompt to the same width.")
        return widths.pop() if widths else None

    def attach_fused(self, engine: Any, examples: Sequence[Any], *, offsets: Sequence[int]) -> HookHandle:
        """The same edit on the fused engine (:meth:`FusedModel.span_edit <focuslens.engine.FusedModel.span_edit>`):
        each row's own span, shifted by its left padding, only the spec's heads recomputed explicitly."""
        width = self._padded_width(examples, offsets, "attach_fused")
        return self.attach_spans_fused(engine, [self.spans_for(e) for e in examples], seq_len=width,
                                       offsets=list(offsets))

    def attach_spans_fused(self, engine: Any, spans: Sequence[Any], *, seq_len: int | None,
                           offsets: Sequence[int]) -> HookHandle:
        """:meth:`attach_spans` on the fused engine: one span (or list of spans) per row of a left-padded batch,
        in each row's unpadded positions (what :class:`~focuslens.intervene.label_free.SelfLocatedSpan` edits)."""
        edit, identity, label = self._edit()
        return engine.span_edit(self.heads, list(spans), edit=edit, identity=identity, label=f"fused {label}",
                                offsets=list(offsets), seq_len=seq_len)

    def attach_spans(self, model: HookedModel, spans: Any = None, *, seq_len: int | None = None,
                     offsets: Sequence[int] | None = None) -> HookHandle:
        """Attach with explicit spans instead of the spec's rule (what :meth:`attach` and :meth:`attach_batch`
        and the eager functions end in).

        ``spans``: absolute positions of an unpadded prompt (a :class:`Span`, a ``(start, end)`` pair, a
        list of them); ``None``: the spec's own explicit spans. With ``offsets`` (a left-padded batch,
        ``offsets[i]`` pad tokens before row i) one span (or list of spans) per row, each shifted by its
        row's padding. ``seq_len``: the (padded) prompt length, to check the spans now.
        """
        if spans is None:
            spans = self.spans_for(None)
        edit, identity, label = self._edit()
        batch = f", batch of {len(offsets)}" if offsets is not None else ""
        return attach_span_edit(model, self.heads, spans, edit=edit, identity=identity, offsets=offsets,
                                seq_len=seq_len, label=f"{label}, {len(self.heads)} heads{batch})",
                                what=self._eager_name)


class SplitSoftmax(_SpanEdit):
    """Split softmax (``docs/method.md`` §3) on ``heads``: the attention mass on the span becomes π^τ.

    Args:
        heads: ``(layer, head)`` query heads, in order (the order is part of the identity).
        tau: exponent > 0; 1 is the identity, < 1 moves attention onto the span.
        span: where the mass goes. A rule read from the example at attach time: ``"relevant"``
            (default: ``example.relevant``, the gold document), ``"support"`` (every gold document of
            a multi-gold record, their union: ``example.support_spans``; the gold document alone
            otherwise), ``"distractors"`` (their union),
            any other span attribute of the example, or a prompt span name (``"question"``,
            ``"doc_3"``). Or explicit spans (a :class:`~focuslens.core.prompts.Span`, a ``(start, end)``
            pair, or a list of them), the same for every example.

    Attached per example (the span is in absolute positions of an unpadded prompt), or per batch
    with :meth:`attach_batch`: one span per row, shifted by the row's left padding
    (:func:`~focuslens.intervene.eager.split_softmax` with ``offsets``).
    """

    kind = "split_softmax"
    __slots__ = ("tau",)
    _eager_name = "split_softmax"

    def __init__(self, heads: Iterable[Sequence[int]], tau: float, *, span: SpanRule | Any = "relevant"):
        what = "SplitSoftmax"
        self._init_span(heads, span, what)
        self.tau = positive(tau, name="tau", what=what, why=(
            "the mass on the span becomes π^τ, so τ = 1 is the identity, 0 < τ < 1 raises attention on the "
            "span and τ > 1 lowers it."))
        self._freeze()

    def _ctor(self):
        return (self.heads, self.tau), {"span": self._span_arg()}

    def _identity(self) -> dict[str, Any]:
        return {"heads": [list(h) for h in self.heads], "tau": self.tau, "span": self._span_identity()}

    def _edit(self):
        tau = self.tau

        def edit(p, mask, *, query_positions, min_query):
            return split_softmax_pattern(p, mask, tau, query_positions=query_positions, min_query=min_query)

        return edit, tau == 1.0, f"split_softmax(tau={tau:g}"

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
    _eager_name = "pasta"

    def __init__(self, heads: Iterable[Sequence[int]], *, coefficient: float = 0.01, span: SpanRule | Any = "relevant"):
        what = "Pasta"
        self._init_span(heads, span, what)
        self.coefficient = positive(coefficient, name="coefficient", what=what, why=(
            "attention outside the span is multiplied by it before renormalising (1 is the identity, PASTA's "
            "default is 0.01)."))
        self._freeze()

    def _ctor(self):
        return (self.heads,), {"coefficient": self.coefficient, "span": self._span_arg()}

    def _identity(self) -> dict[str, Any]:
        return {"heads": [list(h) for h in self.heads], "coefficient": self.coefficient,
                "span": self._span_identity()}

    def _edit(self):
        c = self.coefficient

        def edit(p, mask, *, query_positions, min_query):
            return pasta_pattern(p, mask, c, query_positions=query_positions, min_query=min_query)

        return edit, c == 1.0, f"pasta(coefficient={c:g}"

    def __repr__(self) -> str:
        span = repr(self.span) if isinstance(self.span, str) else list(self.span)
        return f"Pasta({format_heads(self.heads)}, coefficient={self.coefficient:g}, span={span})"
