"""Attention-pattern edits around a span: split softmax and PASTA maths, and the hooks that apply them.

Why this module exists
----------------------
Split softmax (``docs/method.md`` §3) and PASTA (Zhang et al. 2024) both rewrite chosen heads' post-softmax
rows around a span C from the row's mass on it, π. They share everything but the two per-row factors:
which key columns are C at the prefill and at every KV-cache step (also on a sliding-window layer,
whose cache holds only the last keys), which rows may be edited (those that can see C), and, for a
left-padded batch, each row's own span shifted by its padding (``offsets``). That machinery is
written once here (:func:`attach_span_edit`); the specs :class:`~focuslens.intervene.span_specs.SplitSoftmax`
and :class:`~focuslens.intervene.span_specs.Pasta` attach through it, and the eager
:func:`~focuslens.intervene.eager.split_softmax` / :func:`~focuslens.intervene.eager.pasta` are sugar over them.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Iterable, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..core.attention import layer_attention
from ..core.hooks import HookHandle, attach_hooks
from ..core.models import HookedModel, hook_name
from ..core.checks import check_heads
from ..core.prompts import Span, normalise_spans

__all__ = ["split_softmax_pattern", "pasta_pattern", "attach_span_edit", "SpanLayout"]


def _group_by_layer(heads: Iterable[tuple[int, int]]) -> dict[int, list[int]]:
    by_layer: dict[int, list[int]] = defaultdict(list)
    for layer, head in heads:
        by_layer[layer].append(head)
    return {l: sorted(hs) for l, hs in sorted(by_layer.items())}



def _span_masses(
    pattern: Tensor,
    key_mask: Tensor,
    query_positions: Tensor | None,
    min_query: int | Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(m, π, ρ, ok)`` of :func:`split_softmax_pattern` and :func:`pasta_pattern` (one definition).

    ``key_mask`` ``[k]`` (one span for every row; the arithmetic of the original single-example
    path) or ``[b, k]`` (one per batch row; ``pattern`` is then ``[b, ..., q, k]``). π, ρ and ``ok``
    are ``[..., q]`` float64 / bool; ``m`` is the key mask broadcastable against ``pattern``.
    """
    if key_mask.dim() == 1:
        m = key_mask.to(device=pattern.device, dtype=torch.bool)
        mf = m.to(pattern.dtype)
        pi = (pattern @ mf).double()  # [..., q]
        rho = (pattern @ (1 - mf)).double()
    elif key_mask.dim() == 2:
        b, k = key_mask.shape
        if pattern.dim() < 3 or pattern.shape[0] != b or pattern.shape[-1] != k:
            raise ValueError(
                f"a per-row key mask [{b}, {k}] needs a pattern [{b}, ..., q, {k}]; got {tuple(pattern.shape)}."
            )
        lead = [1] * (pattern.dim() - 3)
        m2 = key_mask.to(device=pattern.device, dtype=torch.bool)
        mf = m2.to(pattern.dtype).view(b, *lead, k, 1)  # a column per row: pattern @ it is a batched matmul
        pi = (pattern @ mf).squeeze(-1).double()
        rho = (pattern @ (1 - mf)).squeeze(-1).double()
        m = m2.view(b, *lead, 1, k)
    else:
        raise ValueError(f"key_mask must be [k] or [batch, k], got shape {tuple(key_mask.shape)}.")
    ok = (pi > 0) & (rho > 0)
    if query_positions is not None:
        qp = query_positions.to(pattern.device)
        if isinstance(min_query, Tensor) and min_query.dim() > 0:
            mq = min_query.to(pattern.device)
            cmp = (qp if qp.dim() == 2 else qp[None]) >= mq[:, None]  # [b, q]
            ok = ok & cmp.view(cmp.shape[0], *([1] * (ok.dim() - 2)), cmp.shape[1])
        else:
            ok = ok & (qp >= min_query)
    return m, pi, rho, ok


def _apply_scales(pattern: Tensor, m: Tensor, ok: Tensor, scale_c: Tensor, scale_r: Tensor) -> Tensor:
    one = torch.ones_like(scale_c)
    scale_c = torch.where(ok, scale_c, one).to(pattern.dtype).unsqueeze(-1)
    scale_r = torch.where(ok, scale_r, one).to(pattern.dtype).unsqueeze(-1)
    return pattern * torch.where(m, scale_c, scale_r)


def split_softmax_pattern(
    pattern: Float[Tensor, "... q k"],
    key_mask: Bool[Tensor, "k"] | Bool[Tensor, "batch k"],
    tau: float,
    *,
    query_positions: Int[Tensor, "q"] | Int[Tensor, "batch q"] | None = None,
    min_query: int | Int[Tensor, "batch"] = 0,
) -> Float[Tensor, "... q k"]:
    """Apply split softmax (``docs/method.md`` §3) to attention rows: move the mass on ``key_mask`` from π to π^τ.

    For each row with π = Σ_{j∈C} A_j and ρ = Σ_{j∉C} A_j (ρ = 1 − π up to rounding), s = π + ρ:

        A'_j = A_j · p^τ / p            for j ∈ C,     p = π / s
        A'_j = A_j · (1 − p^τ) / (1 − p)  for j ∉ C,     1 − p = ρ / s

    which keeps the row sum and the proportions inside C and inside not-C. ρ is summed directly (not
    taken as ``1 − π``, which loses all precision when π is close to 1), and the per-row factors are
    computed in float64 with ``1 − p^τ = −expm1(τ·log p)``. Guards: rows with π = 0 (the query cannot
    see the span, e.g. t < span start under the causal mask) or ρ = 0 (nothing outside C) are returned
    unchanged, as are rows whose absolute ``query_positions`` are ``< min_query``.

    Args:
        pattern: ``[..., q, k]`` post-softmax attention rows (``[b, ..., q, k]`` with a per-row mask).
        key_mask: ``[k]`` bool, True on the relevant key positions C; or ``[b, k]``, one mask per
            batch row (a batch of different prompts, each with its own span).
        tau: exponent > 0; 1 is the identity, < 1 raises the mass on C.
        query_positions: ``[q]`` (or ``[b, q]``) absolute position of each row (for the guard).
        min_query: rows at absolute positions below this are untouched; an int, or ``[b]`` (one per
            batch row: under left padding each row's span starts at its own padded position).

    Returns:
        The edited pattern (a new tensor, same dtype as ``pattern``). With a ``[k]`` mask and an int
        ``min_query`` the arithmetic is exactly that of the single-example path.
    """
    m, pi, rho, ok = _span_masses(pattern, key_mask, query_positions, min_query)
    total = pi + rho
    safe_total = torch.where(ok, total, torch.ones_like(total))
    logp = torch.log(torch.where(ok, pi, 0.5 * safe_total) / safe_total)
    scale_c = torch.exp((tau - 1.0) * logp)  # p^τ / p
    scale_r = -torch.expm1(tau * logp) * safe_total / torch.where(ok, rho, safe_total)  # (1 − p^τ)/(1 − p)
    return _apply_scales(pattern, m, ok, scale_c, scale_r)


def pasta_pattern(
    pattern: Float[Tensor, "... q k"],
    key_mask: Bool[Tensor, "k"] | Bool[Tensor, "batch k"],
    coefficient: float,
    *,
    query_positions: Int[Tensor, "q"] | Int[Tensor, "batch q"] | None = None,
    min_query: int | Int[Tensor, "batch"] = 0,
) -> Float[Tensor, "... q k"]:
    """PASTA (Zhang et al. 2024): scale the attention *outside* ``key_mask`` by ``coefficient`` and renormalise.

    For each row with π = Σ_{j∈C} A_j, ρ = Σ_{j∉C} A_j, s = π + ρ (= 1 up to rounding) and
    Z = π + coefficient·ρ:

        A'_j = A_j · s / Z                  for j ∈ C
        A'_j = coefficient · A_j · s / Z    for j ∉ C

    The PASTA implementation adds ``log(coefficient)`` to the pre-softmax scores outside C instead;
    that is the same pattern: with scores x_j, A_j = e^{x_j} / Σ_i e^{x_i}, and

        softmax(x + log(c)·[j∉C])_j = e^{x_j} c^{[j∉C]} / (Σ_{i∈C} e^{x_i} + c Σ_{i∉C} e^{x_i})
                                    = A_j c^{[j∉C]} / (π + c·ρ),

    dividing numerator and denominator by Σ_i e^{x_i}. Editing the post-softmax pattern lets PASTA
    share split softmax's span machinery (per-row masks, KV-cache steps, padding). The same guards
    as :func:`split_softmax_pattern`: rows with π = 0 (the query cannot see the span) or ρ = 0, and
    rows before ``min_query``, are returned unchanged. ``coefficient = 1`` is the identity; < 1
    emphasises C (their default 0.01), > 1 de-emphasises it. Factors are computed in float64.

    Args: as :func:`split_softmax_pattern`, with ``coefficient`` > 0 instead of τ.
    """
    m, pi, rho, ok = _span_masses(pattern, key_mask, query_positions, min_query)
    total = pi + rho
    z = pi + coefficient * rho
    safe_z = torch.where(ok, z, torch.ones_like(z))
    scale_c = total / safe_z
    scale_r = coefficient * total / safe_z
    return _apply_scales(pattern, m, ok, scale_c, scale_r)


class _Clock:
    """The sequence length so far (cached + new tokens), read before every call of the model.

    On a sliding-window layer the KV cache keeps only the last ``window`` keys, so at a decoding step
    the pattern's key columns are the *last* ``k_len`` positions, not ``0..k_len-1``: the hook needs
    the absolute length, which only the call itself knows (``past_key_values.get_seq_length()``,
    the layers' cumulative length, plus the new tokens). ``None`` when unknown (a string input, a
    legacy cache, which keeps every key): then ``k_len`` is the length.
    """

    def __init__(self) -> None:
        self.total: int | None = None

    def __call__(self, args: tuple, kwargs: dict) -> None:
        toks = args[0] if args else kwargs.get("input", kwargs.get("tokens"))
        cache = kwargs.get("past_key_values")
        self.total = None
        if not isinstance(toks, Tensor) or "past_kv_cache" in kwargs:
            return
        if cache is None:
            self.total = int(toks.shape[-1])
        elif hasattr(cache, "get_seq_length"):
            self.total = int(cache.get_seq_length()) + int(toks.shape[-1])

    def after(self) -> None:
        """After the call: forget it (a later pass that bypasses the model's ``__call__`` sees ``None``)."""
        self.total = None


def _row_spans(span: Any, offsets: Sequence[int], *, seq_len: int | None, name: str) -> list[list[Span]]:
    if not isinstance(span, (list, tuple)) or len(span) != len(offsets):
        raise ValueError(
            f"{name}: with offsets= (a left-padded batch of {len(offsets)} rows) give one span (or list of "
            f"spans) per row, in each row's unpadded positions; got {type(span).__name__} "
            f"{'of length ' + str(len(span)) if isinstance(span, (list, tuple)) else ''}."
        )
    out = []
    for b, (sp, off) in enumerate(zip(span, offsets)):
        if isinstance(off, bool) or not isinstance(off, int) or off < 0:
            raise ValueError(f"{name}: offsets[{b}] must be an int >= 0 (left-pad tokens of row {b}), got {off!r}.")
        out.append(normalise_spans(sp, seq_len=None if seq_len is None else seq_len - off, name=f"{name}[row {b}]"))
    return out


class SpanLayout:
    """Where the span is, in absolute (padded) key positions: one set for every row, or one per row.

    ``offsets=None``: ``spans`` (a list of :class:`Span`, their union) for every batch row. Else a
    left-padded batch: ``rows[b]`` is row b's spans in its unpadded positions, and ``starts``/``ends``
    ``[b, n]`` the same shifted by the row's padding (``(0, 0)`` is no span), ``row_min`` ``[b]`` the first
    padded position of each row's span.
    """

    def __init__(self, span: Any, *, offsets: Sequence[int] | None, seq_len: int | None, what: str):
        self.offsets = None if offsets is None else list(offsets)
        self.rows: list[list[Span]] | None = None
        self._on: dict[torch.device, Any] = {}  # key_mask's tensors per device
        if self.offsets is None:
            self.spans: Any = normalise_spans(span, seq_len=seq_len, name=f"{what} span")
            self.min_start = min(s.start for s in self.spans)
            self.max_end = max(s.end for s in self.spans)
            return
        if not self.offsets:
            raise ValueError(f"{what}: offsets is empty; a batch has at least one row.")
        rows = _row_spans(span, self.offsets, seq_len=seq_len, name=f"{what} span")
        n_s = max(len(r) for r in rows)
        self.starts = torch.zeros(len(rows), n_s, dtype=torch.long)  # padded positions; (0, 0) is no span
        self.ends = torch.zeros(len(rows), n_s, dtype=torch.long)
        for b, (r, off) in enumerate(zip(rows, self.offsets)):
            for j, s in enumerate(r):
                self.starts[b, j], self.ends[b, j] = s.start + off, s.end + off
        self.row_min = torch.tensor([min(s.start for s in r) + off for r, off in zip(rows, self.offsets)])
        self.max_end = int(self.ends.max())
        self.rows = self.spans = rows

    def key_mask(self, first_key: int, total: int, device: torch.device | str) -> tuple[Tensor, int | Tensor]:
        """``(key mask, min_query)`` for key columns at absolute positions ``first_key .. total-1``.

        One span set: a ``[k]`` mask and the int ``min_start``; a batch: a ``[b, k]`` mask (each row its
        own shifted spans) and ``row_min`` ``[b]``. The rule both engines edit by: the eager
        ``hook_pattern`` hook (:func:`attach_span_edit`) and the fused engine
        (:meth:`focuslens.engine.FusedModel.span_edit`).
        """
        device = torch.device(device)
        cached = self._on.get(device)
        if self.rows is None:
            if cached is None or cached.shape[0] < total:  # one buffer per device, grown for decoding steps
                cached = torch.zeros(max(2 * total, self.max_end), dtype=torch.bool, device=device)
                for s in self.spans:
                    cached[s.start:s.end] = True
                self._on[device] = cached
            return cached[first_key:total], self.min_start
        if cached is None:
            cached = self._on[device] = (self.starts.to(device), self.ends.to(device), self.row_min.to(device))
        st, en, row_min = cached
        pos = torch.arange(first_key, total, device=device)
        return ((pos >= st[..., None]) & (pos < en[..., None])).any(1), row_min


def attach_span_edit(
    model: HookedModel,
    heads: Iterable[Sequence[int]],
    span: Any,
    *,
    edit: Callable[..., Tensor],
    identity: bool,
    offsets: Sequence[int] | None,
    seq_len: int | None,
    label: str,
    what: str,
) -> HookHandle:
    """Attach ``edit(pattern_of_heads, key_mask, query_positions=, min_query=)`` on ``hook_pattern``.

    The one piece of span machinery behind :class:`~focuslens.intervene.span_specs.SplitSoftmax` and
    :class:`~focuslens.intervene.span_specs.Pasta` (and so the eager ``split_softmax`` / ``pasta``): which
    key columns are the span at the prefill (``[b, H, P, P]``) and at every cached step (``[b, H, 1, P+i]``,
    or the last ``window`` keys on a sliding-window layer), which rows may be edited, and, for a
    left-padded batch (``offsets``), each row's own span shifted by its padding. Other heads are
    copied bit for bit. ``heads`` are checked against the model (:func:`~focuslens.core.checks.check_heads`).
    """
    by_layer = _group_by_layer(check_heads(model, heads, what=what))
    sliding = any(layer_attention(model, l).sliding_window is not None for l in by_layer)
    clock = _Clock() if sliding else None
    lay = SpanLayout(span, offsets=offsets, seq_len=seq_len, what=what)
    hooks = [(hook_name(l, "hook_pattern"), _pattern_hook(l, hs, lay, edit=edit, identity=identity, clock=clock,
                                                          what=what))
             for l, hs in by_layer.items()]
    handle = attach_hooks(model, hooks, label=label, pre_forward=[clock] if clock is not None else [])
    handle.hook_names = [n for n, _ in hooks]
    return handle


def _pattern_hook(layer: int, heads_here: list[int], lay: SpanLayout, *, edit: Callable[..., Tensor],
                  identity: bool, clock: "_Clock | None", what: str):
    """The ``hook_pattern`` hook of one layer: ``edit`` on ``heads_here``, the other heads passed through."""
    idx_cpu = torch.tensor(heads_here, dtype=torch.long)
    state: dict[str, Any] = {}
    rows, spans, max_end = lay.rows, lay.spans, lay.max_end

    def hook(pattern: Float[Tensor, "batch head q k"], hook=None):
        # pattern: [batch, head, q_pos, k_pos]; key column c is at absolute position total - k_len + c
        # (total = k_len except on a sliding-window layer's cached steps); query row r at total - q_len + r.
        q_len, k_len = pattern.shape[-2], pattern.shape[-1]
        total = k_len
        if clock is not None and clock.total is not None and clock.total >= k_len:
            total = clock.total
        if max_end > total:
            raise ValueError(
                f"{what} span(s) {spans} reach past the sequence of {total} positions at layer "
                f"{layer}: spans are absolute token positions in the prompt."
            )
        if rows is not None and pattern.shape[0] != len(rows):
            raise ValueError(
                f"{what} was attached for a batch of {len(rows)} rows (offsets={lay.offsets}) but the "
                f"forward pass has {pattern.shape[0]}: attach it with the prompts of this batch."
            )
        if identity:
            return pattern
        if state.get("device") != pattern.device:
            state["idx"] = idx_cpu.to(pattern.device)
            state["device"] = pattern.device
        first_key = total - k_len
        first = total - q_len
        mask, mq = lay.key_mask(first_key, total, pattern.device)  # [k] or [b, k] (each row its own spans)
        if rows is None:
            qpos = None if first >= lay.min_start else torch.arange(first, total, device=pattern.device)
        else:
            qpos = torch.arange(first, total, device=pattern.device)
        new = edit(pattern.index_select(1, state["idx"]), mask, query_positions=qpos, min_query=mq)
        return pattern.index_copy(1, state["idx"], new)  # a new tensor; other heads copied bit for bit

    return hook
