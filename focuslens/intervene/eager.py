"""Interventions on single attention heads: split softmax, query/key vector injection, composition.

Why this module exists
----------------------
Contextual scoring (METHOD.md §2) says *which* heads look at the relevant document. Interventions say
whether that attention *matters*: move more of a head's attention onto the relevant span and see
whether the answer improves (split softmax, METHOD.md §3), or bias a head's queries with a fixed
vector (focus directions, METHOD.md §4). Both must be exact (the neutral setting is a bit-for-bit
identity, heads not listed are untouched), must act during ``model.generate`` with the KV cache as
well as in a single forward pass, and must leave the model clean when they are removed, even when an
exception interrupts them.

Every function here returns a :class:`focuslens.core.hooks.HookHandle` (``.remove()``; usable as a
context manager). Handles compose: nest ``with`` blocks, or bundle several with :func:`compose`.
These are the *eager* shortcuts (hooks attach when called); to describe an intervention before it is
applied (per example in an evaluation, with a content identity for stored results, all-or-nothing
composition) use the specs of :mod:`focuslens.intervene.specs`, which attach through these functions.

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

import math
from collections import defaultdict
from typing import Iterable, Literal, Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from ..core.hooks import HookHandle, attach_hooks
from ..core.models import HookedModel, hook_name, model_info
from ..core.checks import is_index as _is_index, check_heads
from .edits import _check_strength, _span_edit_hooks, pasta_pattern, split_softmax_pattern
from ..core.prompts import SpanLike

__all__ = ["split_softmax", "pasta", "inject_vectors", "compose", "ComposedHandle", "InjectSite"]

InjectSite = Literal["query", "key"]


# --------------------------------------------------------------------------------------------------
# Composition
# --------------------------------------------------------------------------------------------------


class ComposedHandle(HookHandle):
    """Several handles removed as one (each removes only its own hooks).

    Removal is exception-safe: every member is removed even if one of them raises, and the first
    error is re-raised afterwards.
    """

    def __init__(self, handles: Sequence[HookHandle], *, label: str = "composed"):
        models = {id(h.model) for h in handles}
        if len(models) > 1:
            # Refusing must not leak: the handles given are already attached, and the caller gets no
            # object through which to remove them.
            _remove_all(handles)
            raise ValueError(
                "compose(): all handles must belong to the same model; the handles given were removed."
            )
        self.model = handles[0].model if handles else None
        self.label = label
        self.members: list[HookHandle] = list(handles)
        self._handles = []  # the members own the hooks

    @property
    def active(self) -> bool:
        return any(h.active for h in self.members)

    @property
    def n_hooks(self) -> int:
        return sum(h.n_hooks for h in self.members)

    def remove(self) -> None:
        first: BaseException | None = None
        for h in reversed(self.members):
            try:
                h.remove()
            except BaseException as e:  # keep removing the others
                first = first or e
        if first is not None:
            raise first

    def __repr__(self) -> str:
        return f"<ComposedHandle {self.label}: {len(self.members)} handles, {self.n_hooks} hooks>"


def _remove_all(handles: Iterable[object]) -> None:
    """Remove every :class:`HookHandle` among ``handles`` (others ignored), whatever fails."""
    for h in reversed(list(handles)):
        if isinstance(h, HookHandle):
            try:
                h.remove()
            except Exception:  # keep removing; the refusal is the error to report
                pass


def compose(*handles: HookHandle, label: str = "composed") -> ComposedHandle:
    """Bundle already-attached handles so that one ``remove()`` / ``with`` block removes them all.

    Never leaves hooks behind when it refuses: given something that is not a :class:`HookHandle`,
    or handles of two different models, it **removes every handle it was given** and then raises
    (``TypeError`` / ``ValueError``), because the caller has no composed handle to clean up with.

    It cannot help when an *argument* fails: in ``compose(split_softmax(...), inject_vectors(...,
    alpha=nan))`` the first handle is attached before the second call raises and ``compose`` never
    runs. Describe the interventions as specs instead, which attach all-or-nothing:
    ``(SplitSoftmax(heads, tau) + InjectVectors(vecs)).attach(model, example)``
    (:mod:`focuslens.intervene.specs`).

    Example:
        >>> with compose(split_softmax(model, heads, span, 0.3), inject_vectors(model, vecs)):
        ...     out = model.generate(tokens[None], max_new_tokens=5, verbose=False)
    """
    for h in handles:
        if not isinstance(h, HookHandle):
            _remove_all(handles)
            raise TypeError(
                f"compose() takes HookHandle objects, got {type(h).__name__}; the handles given were removed."
            )
    return ComposedHandle(handles, label=label)


# --------------------------------------------------------------------------------------------------
# Query / key vector injection
# --------------------------------------------------------------------------------------------------


def _inject_site(model: HookedModel, site: InjectSite, pre_rope: bool) -> str:
    rotary = model_info(model).rotary
    if site not in ("query", "key"):
        raise ValueError(f"site must be 'query' or 'key', got {site!r}.")
    letter = "q" if site == "query" else "k"
    if rotary and not pre_rope:
        return f"hook_rot_{letter}"
    return f"hook_{letter}"


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

        q̃_t = RoPE_t(q_t) + alpha · u        (site="query", the default; METHOD.md §4)

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
            j that the softmax cancels (METHOD.md §4; together with a query vector the extra term
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
        ValueError: unknown head / KV head, a vector that is not ``[d_head]`` or not finite, an
            empty mapping, or an unknown ``site``.

    Example:
        >>> u = {(17, 3): torch.randn(64) * 0.1}
        >>> with inject_vectors(model, u, alpha=0.3):
        ...     out = model.generate(tokens[None], max_new_tokens=10, do_sample=False, verbose=False)
    """
    info = model_info(model)
    hook_site = _inject_site(model, site, pre_rope)
    if not isinstance(vectors, Mapping) or len(vectors) == 0:
        raise ValueError(
            "inject_vectors needs a non-empty mapping {(layer, head): Tensor[d_head]}."
        )
    try:
        alpha_f = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"alpha must be a real number, got {alpha!r}.") from None
    if not math.isfinite(alpha_f):
        raise ValueError(f"alpha must be finite, got {alpha!r}.")
    n_slots = info.n_heads if site == "query" else info.n_kv_heads
    what = "query head" if site == "query" else "KV head"
    by_layer: dict[int, dict[int, Tensor]] = defaultdict(dict)
    rows: tuple[int, ...] | None = None
    for key, u in vectors.items():
        if not (isinstance(key, tuple) and len(key) == 2 and all(_is_index(x) for x in key)):
            raise ValueError(
                f"vectors keys must be (layer, head) pairs of ints, got {key!r} (floats are not truncated)."
            )
        layer, head = int(key[0]), int(key[1])
        if not (0 <= layer < info.n_layers and 0 <= head < n_slots):
            extra = (
                f" (site='key' vectors are keyed by KV head; this model has {info.n_kv_heads} KV "
                f"heads shared by {info.n_heads} query heads)" if site == "key" else ""
            )
            raise ValueError(
                f"Unknown {what} (layer={layer}, head={head}): this model has layers "
                f"0..{info.n_layers - 1} and {what}s 0..{n_slots - 1}{extra}."
            )
        u = torch.as_tensor(u).detach()
        if u.shape != (info.d_head,) and not (u.dim() == 2 and u.shape[1] == info.d_head and u.shape[0] >= 1):
            raise ValueError(
                f"Vector for ({layer}, {head}) has shape {tuple(u.shape)}; expected ({info.d_head},) "
                f"= [d_head] (or [batch, {info.d_head}], one per batch row)."
            )
        if rows is None:
            rows = tuple(u.shape[:-1])
        elif tuple(u.shape[:-1]) != rows:
            raise ValueError(
                f"Vector for ({layer}, {head}) has shape {tuple(u.shape)}, other vectors have "
                f"{rows + (info.d_head,)}: give every head [d_head], or every head [batch, d_head]."
            )
        if not torch.isfinite(u).all():
            raise ValueError(f"Vector for ({layer}, {head}) contains NaN or inf.")
        by_layer[layer][head] = u

    hooks = []
    for layer in sorted(by_layer):
        heads = sorted(by_layer[layer])
        idx = torch.tensor(heads, dtype=torch.long)
        stack = torch.stack([by_layer[layer][h] for h in heads], dim=-2)  # [n_sel, d] or [batch, n_sel, d]
        hooks.append((hook_name(layer, hook_site), _make_add_hook(idx, stack, alpha_f)))
    per_row = f", batch of {rows[0]}" if rows else ""
    label = f"inject_vectors({site}, alpha={alpha_f:g}, {len(vectors)} heads, {hook_site}{per_row})"
    handle = attach_hooks(model, hooks, label=label)
    handle.hook_names = [n for n, _ in hooks]
    return handle


def _make_add_hook(idx: Tensor, stack: Tensor, alpha: float):
    cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    def hook(x: Float[Tensor, "batch pos head d_head"], hook=None):
        if alpha == 0.0:
            return x  # exact identity, no arithmetic at all
        key = (x.device, x.dtype)
        if key not in cache:
            cache[key] = (idx.to(x.device), (alpha * stack.to(torch.float64)).to(x.device, x.dtype))
        i, add = cache[key]
        if add.dim() == 3:  # one vector per batch row: [batch, n_sel, d] -> [batch, 1, n_sel, d]
            if x.shape[0] != add.shape[0]:
                raise ValueError(
                    f"inject_vectors was given vectors for a batch of {add.shape[0]} rows but the forward "
                    f"pass has {x.shape[0]}: attach it with the prompts of this batch."
                )
            add = add[:, None]
        out = x.clone()
        out[:, :, i, :] = x[:, :, i, :] + add  # broadcast over batch and positions
        return out

    return hook


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

    METHOD.md §3. For each listed ``(layer, head)`` and every query row t that can see the span,
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
        ValueError: ``tau <= 0`` or not finite, unknown or duplicate heads, an empty head list, an
            empty span, a span list that does not match ``offsets``, (at the first forward pass) a
            span that reaches past the sequence, or a batch of another size than ``offsets``.

    Example:
        >>> r = render(example, model.tokenizer)
        >>> with split_softmax(model, top20, r.relevant, tau=0.2):
        ...     out = model.generate(r.prompt.tokens[None], max_new_tokens=20, do_sample=False,
        ...                          verbose=False)
    """
    tau_f = _check_strength(tau, name="tau", what="split_softmax")

    def edit(p, mask, *, query_positions, min_query):
        return split_softmax_pattern(p, mask, tau_f, query_positions=query_positions, min_query=min_query)

    heads = check_heads(model, heads)
    n = len(heads)
    return _span_edit_hooks(
        model, heads, span, edit=edit, identity=tau_f == 1.0, offsets=offsets, seq_len=seq_len,
        label=f"split_softmax(tau={tau_f:g}, {n} heads{', batch of ' + str(len(offsets)) if offsets is not None else ''})",
        what="split_softmax",
    )


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
    c = _check_strength(coefficient, name="coefficient", what="pasta")

    def edit(p, mask, *, query_positions, min_query):
        return pasta_pattern(p, mask, c, query_positions=query_positions, min_query=min_query)

    heads = check_heads(model, heads)
    n = len(heads)
    return _span_edit_hooks(
        model, heads, span, edit=edit, identity=c == 1.0, offsets=offsets, seq_len=seq_len,
        label=f"pasta(coefficient={c:g}, {n} heads{', batch of ' + str(len(offsets)) if offsets is not None else ''})",
        what="pasta",
    )
