"""Interventions on single attention heads: split softmax, query/key vector injection, composition.

Why this module exists
----------------------
Contextual scoring (``docs/method.md`` §1) says *which* heads look at the relevant document. Interventions say
whether that attention *matters*: move more of a head's attention onto the relevant span and see
whether the answer improves (split softmax, ``docs/method.md`` §3), or bias a head's queries with a fixed
vector (focus directions, ``docs/method.md`` §4). Both must be exact (the neutral setting is a bit-for-bit
identity, heads not listed are untouched), must act during ``model.generate`` with the KV cache as
well as in a single forward pass, and must leave the model clean when they are removed, even when an
exception interrupts them.

Every function here returns a :class:`focuslens.core.hooks.HookHandle` (``.remove()``; usable as a
context manager). Handles compose: nest ``with`` blocks, or bundle several with :func:`compose`.
These are the *eager* shortcuts (hooks attach when called), each one line of sugar over its spec:
``split_softmax(m, heads, span, tau)`` is ``SplitSoftmax(heads, tau, span=span)`` attached, ``pasta`` is
:class:`~focuslens.intervene.span_specs.Pasta`, ``inject_vectors`` is
:class:`~focuslens.intervene.vector_specs.InjectVectors`: the same validation (heads, τ/α/coefficient, vectors)
and the same hooks. To describe an intervention before it is applied (per example in an evaluation,
batched under left padding, with a content identity for stored results, all-or-nothing composition)
use the specs themselves. A handle is attached to one prompt's absolute positions: do not hand it to
``evaluate(..., batch_size > 1)`` (refused there; pass the spec).

Which one should you use?
-------------------------
* :func:`split_softmax`: the *oracle* test. It needs the relevant span and rewrites the attention
  pattern directly: the mass on the span goes from π to π^τ. Use it to prove that more attention on
  the gold document helps, and to rank how much each set of heads can help.
* :func:`pasta`: PASTA (Zhang et al. 2024), the published span-steering baseline: attention outside
  the span is multiplied by a coefficient (0.01) and each row renormalised. Same span machinery as
  split softmax (:mod:`focuslens.intervene.edits`), a different map of π (odds × 1/coefficient).
* :func:`inject_vectors`: the *deployable* intervention. It needs no span at inference time: it adds
  ``alpha * u`` to the post-RoPE query of chosen heads, which acts as a key-dependent logit bias
  ``alpha * u·k_j / sqrt(d)``. This is what :class:`focuslens.directions.FocusDirections` applies.

Hook sites (TransformerLens names; ``b`` batch, ``p`` positions, ``H`` query heads, ``G`` KV heads):
``hook_pattern`` ``[b, H, q, k]`` (post-softmax, edits propagate); ``hook_rot_q`` ``[b, p, H, d]`` and
``hook_rot_k`` ``[b, p, G, d]`` (post-RoPE, rotary models only); ``hook_q``/``hook_k`` (pre-RoPE on
rotary models; on models with learned absolute positions such as GPT-2 they are already
"post-position", so they are the sites used there).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from jaxtyping import Float
from torch import Tensor

from ..core.hooks import HookHandle
from ..core.models import HookedModel
from ..core.prompts import SpanLike
from .edits import pasta_pattern, split_softmax_pattern  # noqa: F401  (the pattern maths, importable from here too)
from .handles import ComposedHandle, remove_all
from .span_specs import Pasta, SplitSoftmax
from .specs import Compose, InterventionSpec
from .vector_specs import InjectSite, InjectVectors

__all__ = ["split_softmax", "pasta", "inject_vectors", "compose", "ComposedHandle", "InjectSite"]


# --------------------------------------------------------------------------------------------------
# Composition
# --------------------------------------------------------------------------------------------------


def compose(*handles: HookHandle | InterventionSpec, label: str = "composed", model: HookedModel | None = None,
            example: Any = None) -> ComposedHandle:
    """Bundle already-attached handles so that one ``remove()`` / ``with`` block removes them all.

    Never leaves hooks behind when it refuses: given something that is not a :class:`HookHandle`,
    or handles of two different models, it **removes every handle it was given** and then raises
    (``TypeError`` / ``ValueError``), because the caller has no composed handle to clean up with.

    Specs may be given too (``compose(handle, SplitSoftmax(heads, 0.3, span=span), model=model)``): they
    are attached here, together, as the spec :class:`~focuslens.intervene.specs.Compose` (``model``: the
    handles' model when omitted; ``example``: for specs that take their span from it); if one of them
    is refused when attached (an unknown head, α·u overflowing the model's dtype), every handle given is
    removed too.

    No function can help when an *argument* fails while Python evaluates it: in
    ``compose(split_softmax(...), inject_vectors(..., alpha=nan))`` the first handle is attached before
    the second call raises and ``compose`` never runs. Give specs instead, which attach nothing until
    composed: ``compose(SplitSoftmax(heads, tau, span=span), InjectVectors(vecs, alpha=a), model=model)``
    or ``(SplitSoftmax(heads, tau) + InjectVectors(vecs)).attach(model, example)``.

    Example:
        >>> with compose(split_softmax(model, heads, span, 0.3), inject_vectors(model, vecs)):
        ...     out = model.generate(tokens[None], max_new_tokens=5, verbose=False)
    """
    for h in handles:
        if not isinstance(h, (HookHandle, InterventionSpec)):
            remove_all(handles)
            raise TypeError(
                f"compose() takes HookHandle objects (or intervention specs), got {type(h).__name__}; the handles "
                "given were removed."
            )
    attached = [h for h in handles if isinstance(h, HookHandle)]
    specs = [h for h in handles if isinstance(h, InterventionSpec)]
    if specs:
        target = model if model is not None else (attached[0].model if attached else None)
        try:
            if target is None:
                raise ValueError("compose() of specs needs model= (there is no handle to take it from).")
            attached.append(Compose(*specs).attach(target, example))
        except BaseException:
            remove_all(attached)
            raise
    return ComposedHandle(attached, label=label)


# --------------------------------------------------------------------------------------------------
# Query / key vector injection
# --------------------------------------------------------------------------------------------------


def inject_vectors(
    model: HookedModel,
    vectors: Mapping[tuple[int, int], Float[Tensor, "d_head"] | Float[Tensor, "batch d_head"]],
    *,
    alpha: float = 1.0,
    site: InjectSite = "query",
    pre_rope: bool = False,
) -> HookHandle:
    """Add ``alpha * u`` to the query (or key) vector of chosen heads at every position.

    For each ``(layer, head) -> u`` in ``vectors`` the hooked model computes, at every position t of
    the prompt and of every generated token (with or without the KV cache),

        q̃_t = RoPE_t(q_t) + alpha · u        (site="query", the default; docs/method.md §3)

    so the head's attention logits gain the query-independent, key-dependent bias
    ``alpha · u·k_j / sqrt(d_head)``. This is a *focus direction* when ``u`` is learned.

    Args:
        model: a hooked model (TransformerBridge).
        vectors: ``(layer, head) -> Tensor[d_head]``; or, for a batch whose rows need different
            vectors (``alpha="auto"`` picks each prompt's own magnitude), ``Tensor[batch, d_head]``
            for every head (row i of the forward pass gets row i; a batch of another size raises).
            Left padding needs nothing more: a pad position's query or key only changes pad
            positions, whose keys every real row masks. For ``site="query"`` ``head`` is a query head;
            for ``site="key"`` it is a **KV head** (``0..n_kv_heads-1``): under grouped-query
            attention a key vector therefore changes the keys seen by *every query head of that
            group* (``group_size`` heads). A key vector alone has (up to rounding) **no effect on
            the attention pattern**: it adds ``alpha·q_t·u`` to every logit of row t, a constant in
            j that the softmax cancels (docs/method.md §3; together with a query vector the extra term
            ``alpha²·u_q·u_k`` is constant too). Offered for completeness and for tests.
        alpha: scale; may be negative (pushes attention away). ``alpha == 0`` attaches hooks that
            return their input unchanged, an exact identity.
        site: ``"query"`` (default) or ``"key"``.
        pre_rope: add before the rotary embedding (``hook_q``/``hook_k``) instead of after it
            (``hook_rot_q``/``hook_rot_k``). Only when asked: pre-RoPE, the vector is rotated with
            the position, which turns it into a relative-position term, a *different* method.
            Models without rotary embeddings (GPT-2: learned absolute positions, added to the
            residual stream before attention) have no post-RoPE site; there ``hook_q``/``hook_k``
            already are "after positions", so they are used whatever ``pre_rope`` says.

    Returns:
        A :class:`HookHandle`; ``with inject_vectors(...):`` removes the hooks on exit.

    Raises:
        ValueError: unknown head / KV head, float or bool keys, a vector that is not ``[d_head]`` or
            not finite, an empty mapping, an unknown ``site``, an ``alpha`` that is a bool or not a finite
            number, or ``alpha * u`` not finite in the model's dtype (the checks of :class:`InjectVectors`).

    Example:
        >>> u = {(17, 3): torch.randn(64) * 0.1}
        >>> with inject_vectors(model, u, alpha=0.3):
        ...     out = model.generate(tokens[None], max_new_tokens=10, do_sample=False, verbose=False)
    """
    return InjectVectors(vectors, alpha=alpha, site=site, pre_rope=pre_rope).attach(model)


# --------------------------------------------------------------------------------------------------
# Split softmax
# --------------------------------------------------------------------------------------------------


def split_softmax(
    model: HookedModel,
    heads: Iterable[Sequence[int]],
    span: SpanLike | Sequence[SpanLike],
    tau: float,
    *,
    seq_len: int | None = None,
    offsets: Sequence[int] | None = None,
) -> HookHandle:
    """Reweight the attention of chosen heads so that their mass on ``span`` becomes π^τ.

    ``docs/method.md`` §3. For each listed ``(layer, head)`` and every query row t that can see the span,
    with π_t the row's attention mass on the span C:

        A'_{t,j} = A_{t,j} · π_t^τ / π_t             (j ∈ C)
        A'_{t,j} = A_{t,j} · (1 − π_t^τ)/(1 − π_t)     (j ∉ C)

    Rows still sum to 1 and proportions inside C and outside C are kept. ``tau = 1`` is the identity;
    ``tau < 1`` moves attention onto C (π^τ > π); ``tau > 1`` moves it away. The edit is made on
    ``hook_pattern`` (post-softmax, before the value product), only in the listed heads' slices:
    every other head's pattern is passed through bit-for-bit.

    It acts in a plain forward pass, at the prefill of ``model.generate`` (pattern ``[b, H, P, P]``)
    and at every decoding step with the KV cache (``[b, H, 1, P+i]``; on a sliding-window layer the
    cache holds only the last keys, and the hook reads the sequence length from the call): ``span``
    is in **absolute key positions**, and the absolute position of a query row is ``total − q_len + row``.

    Two modes:

    * ``offsets=None`` (default): unpadded sequences; the same span for every batch element.
    * ``offsets=[o_0, ..., o_{b-1}]``: a **left-padded batch** (:func:`focuslens.core.generation.greedy_generate_batch`),
      ``o_i`` pad tokens before row i's prompt. ``span`` is then one span (or list of spans) per row,
      in that row's *unpadded* positions; each is shifted by its row's offset. Pad key columns are
      already masked (zero attention), so they count neither in π nor in ρ; pad query rows are never
      edited. Each row gets what it would get alone, up to float rounding.

    Args:
        model: a hooked model.
        heads: ``(layer, head)`` query heads. Under grouped-query attention each query head is
            edited on its own (its pattern is its own even though it shares keys).
        span: the relevant context C: a :class:`Span`, a ``slice``, a ``(start, end)`` pair, or a
            list of them (their union), half-open token ranges; with ``offsets`` a list of those, one per row.
        tau: exponent, must be > 0.
        seq_len: optional (padded) prompt length, to check the spans now instead of at the first forward.
        offsets: left-pad tokens of each batch row (see above).

    Returns:
        A :class:`HookHandle` (``.remove()``; context manager).

    Raises:
        ValueError: ``tau <= 0``, not finite or a bool, unknown, duplicate, float or bool heads, an empty
            head list (the checks of :class:`SplitSoftmax`), an empty span, a span list that does not match ``offsets``, (at the first forward pass) a
            span that reaches past the sequence, or a batch of another size than ``offsets``.

    Example:
        >>> r = render(example, model.tokenizer)
        >>> with split_softmax(model, top20, r.relevant, tau=0.2):
        ...     out = model.generate(r.prompt.tokens[None], max_new_tokens=20, do_sample=False,
        ...                          verbose=False)
    """
    spec = SplitSoftmax(heads, tau, span=span if offsets is None else "relevant")
    return spec.attach_spans(model, None if offsets is None else span, seq_len=seq_len, offsets=offsets)


def pasta(
    model: HookedModel,
    heads: Iterable[Sequence[int]],
    span: SpanLike | Sequence[SpanLike],
    coefficient: float = 0.01,
    *,
    seq_len: int | None = None,
    offsets: Sequence[int] | None = None,
) -> HookHandle:
    """PASTA attention steering (Zhang et al. 2024) on chosen heads: attention outside ``span`` × ``coefficient``.

    For each listed head and every query row that can see the span, ``A'_j = A_j / Z`` on the span C
    and ``coefficient · A_j / Z`` outside it, ``Z = π + coefficient·(1 − π)`` (:func:`pasta_pattern`;
    equal to PASTA's ``+log(coefficient)`` on the pre-softmax scores outside C). Where split softmax
    sets the mass on C to a chosen π^τ, PASTA scales the odds of C by ``1/coefficient``: the new mass
    is ``π / (π + coefficient·(1 − π))``. The same span machinery as :func:`split_softmax` (prefill,
    KV-cache steps, sliding windows, ``offsets`` for a left-padded batch, other heads bit for bit).

    Args:
        coefficient: > 0; PASTA's default 0.01; ``1`` is the identity.
        heads, span, seq_len, offsets: as :func:`split_softmax`.

    Example:
        >>> with pasta(model, top20, r.relevant, 0.01):
        ...     ids, text = greedy_generate(model, r.tokens)
    """
    spec = Pasta(heads, coefficient=coefficient, span=span if offsets is None else "relevant")
    return spec.attach_spans(model, None if offsets is None else span, seq_len=seq_len, offsets=offsets)
