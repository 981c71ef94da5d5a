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

Every function here returns a :class:`focuslens.hooks.HookHandle` (``.remove()``; usable as a
context manager). Handles compose: nest ``with`` blocks, or bundle several with :func:`compose`.
These are the *eager* shortcuts (hooks attach when called); to describe an intervention before it is
applied (per example in an evaluation, with a content identity for stored results, all-or-nothing
composition) use the specs of :mod:`focuslens.specs`, which attach through these functions.

Which one should you use?
-------------------------
* :func:`split_softmax`: the *oracle* test. It needs the relevant span and rewrites the attention
  pattern directly: the mass on the span goes from π to π^τ. Use it to prove that more attention on
  the gold document helps, and to rank how much each set of heads can help.
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

from .hooks import HookHandle, attach_hooks
from .models import HookedModel, check_heads, hook_name, model_info
from .prompts import SpanLike, normalise_spans

__all__ = [
    "split_softmax",
    "split_softmax_pattern",
    "inject_vectors",
    "compose",
    "ComposedHandle",
    "InjectSite",
]

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
    (:mod:`focuslens.specs`).

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


def _group_by_layer(heads: Iterable[tuple[int, int]]) -> dict[int, list[int]]:
    by_layer: dict[int, list[int]] = defaultdict(list)
    for layer, head in heads:
        by_layer[layer].append(head)
    return {l: sorted(hs) for l, hs in sorted(by_layer.items())}


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
    vectors: Mapping[tuple[int, int], Float[Tensor, "d_head"]],
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
        vectors: ``(layer, head) -> Tensor[d_head]``. For ``site="query"`` ``head`` is a query head;
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
    for key, u in vectors.items():
        try:
            layer, head = (int(x) for x in key)
        except (TypeError, ValueError):
            raise ValueError(f"vectors keys must be (layer, head) pairs of ints, got {key!r}.") from None
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
        if u.shape != (info.d_head,):
            raise ValueError(
                f"Vector for ({layer}, {head}) has shape {tuple(u.shape)}; expected ({info.d_head},) "
                "= [d_head]."
            )
        if not torch.isfinite(u).all():
            raise ValueError(f"Vector for ({layer}, {head}) contains NaN or inf.")
        by_layer[layer][head] = u

    hooks = []
    for layer in sorted(by_layer):
        heads = sorted(by_layer[layer])
        idx = torch.tensor(heads, dtype=torch.long)
        stack = torch.stack([by_layer[layer][h] for h in heads])  # [n_sel, d_head]
        hooks.append((hook_name(layer, hook_site), _make_add_hook(idx, stack, alpha_f)))
    label = f"inject_vectors({site}, alpha={alpha_f:g}, {len(vectors)} heads, {hook_site})"
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
        out = x.clone()
        out[:, :, i, :] = x[:, :, i, :] + add  # broadcast over batch and positions
        return out

    return hook


# --------------------------------------------------------------------------------------------------
# Split softmax
# --------------------------------------------------------------------------------------------------


def split_softmax_pattern(
    pattern: Float[Tensor, "... q k"],
    key_mask: torch.Tensor,
    tau: float,
    *,
    query_positions: torch.Tensor | None = None,
    min_query: int = 0,
) -> Float[Tensor, "... q k"]:
    """Apply METHOD.md §3 to attention rows: move the mass on ``key_mask`` from π to π^τ.

    For each row with π = Σ_{j∈C} A_j and ρ = Σ_{j∉C} A_j (ρ = 1 − π up to rounding), s = π + ρ:

        A'_j = A_j · p^τ / p            for j ∈ C,     p = π / s
        A'_j = A_j · (1 − p^τ) / (1 − p)  for j ∉ C,     1 − p = ρ / s

    which keeps the row sum and the proportions inside C and inside not-C. ρ is summed directly (not
    taken as ``1 − π``, which loses all precision when π is close to 1), and the per-row factors are
    computed in float64 with ``1 − p^τ = −expm1(τ·log p)``. Guards: rows with π = 0 (the query cannot
    see the span, e.g. t < span start under the causal mask) or ρ = 0 (nothing outside C) are returned
    unchanged, as are rows whose absolute ``query_positions`` are ``< min_query``.

    Args:
        pattern: ``[..., q, k]`` post-softmax attention rows.
        key_mask: ``[k]`` bool, True on the relevant key positions C.
        tau: exponent > 0; 1 is the identity, < 1 raises the mass on C.
        query_positions: ``[q]`` absolute position of each row (for the ``min_query`` guard).
        min_query: rows at absolute positions below this are untouched.

    Returns:
        The edited pattern (a new tensor, same dtype as ``pattern``).
    """
    m = key_mask.to(device=pattern.device, dtype=torch.bool)
    mf = m.to(pattern.dtype)
    pi = (pattern @ mf).double()  # [..., q]
    rho = (pattern @ (1 - mf)).double()
    total = pi + rho
    ok = (pi > 0) & (rho > 0)
    if query_positions is not None:
        ok = ok & (query_positions.to(pattern.device) >= min_query)
    safe_total = torch.where(ok, total, torch.ones_like(total))
    logp = torch.log(torch.where(ok, pi, 0.5 * safe_total) / safe_total)
    scale_c = torch.exp((tau - 1.0) * logp)  # p^τ / p
    scale_r = -torch.expm1(tau * logp) * safe_total / torch.where(ok, rho, safe_total)  # (1 − p^τ)/(1 − p)
    one = torch.ones_like(scale_c)
    scale_c = torch.where(ok, scale_c, one).to(pattern.dtype).unsqueeze(-1)
    scale_r = torch.where(ok, scale_r, one).to(pattern.dtype).unsqueeze(-1)
    return pattern * torch.where(m, scale_c, scale_r)


def split_softmax(
    model: HookedModel,
    heads: Iterable[Sequence[int]],
    span: SpanLike | Sequence[SpanLike],
    tau: float,
    *,
    seq_len: int | None = None,
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
    and at every decoding step with the KV cache (``[b, H, 1, P+i]``): ``span`` is in **absolute key
    positions**, and the absolute position of a query row is ``k_len − q_len + row``. It assumes
    unpadded sequences (no left padding); the same span is used for every batch element.

    Args:
        model: a hooked model.
        heads: ``(layer, head)`` query heads. Under grouped-query attention each query head is
            edited on its own (its pattern is its own even though it shares keys).
        span: the relevant context C: a :class:`Span`, a ``slice``, a ``(start, end)`` pair, or a
            list of them (their union), half-open token ranges.
        tau: exponent, must be > 0.
        seq_len: optional prompt length, to check the spans now instead of at the first forward.

    Returns:
        A :class:`HookHandle` (``.remove()``; context manager).

    Raises:
        ValueError: ``tau <= 0`` or not finite, unknown or duplicate heads, an empty head list, an
            empty span, or (at the first forward pass) a span that reaches past the sequence.

    Example:
        >>> r = render(example, model.tokenizer)
        >>> with split_softmax(model, top20, r.relevant, tau=0.2):
        ...     out = model.generate(r.prompt.tokens[None], max_new_tokens=20, do_sample=False,
        ...                          verbose=False)
    """
    try:
        tau_f = float(tau)
    except (TypeError, ValueError):
        raise ValueError(f"tau must be a positive number, got {tau!r}.") from None
    if not (math.isfinite(tau_f) and tau_f > 0):
        raise ValueError(
            f"tau must be > 0 and finite, got {tau!r}: the mass on the span becomes π^τ, so τ = 1 is "
            "the identity, 0 < τ < 1 raises attention on the span and τ > 1 lowers it."
        )
    head_list = check_heads(model, heads)
    if not head_list:
        raise ValueError("split_softmax needs at least one (layer, head); got an empty list.")
    spans = normalise_spans(span, seq_len=seq_len, name="split_softmax span")
    min_start = min(s.start for s in spans)
    max_end = max(s.end for s in spans)
    by_layer = _group_by_layer(head_list)

    def make_hook(layer: int, heads_here: list[int]):
        idx_cpu = torch.tensor(heads_here, dtype=torch.long)
        state: dict[str, Tensor] = {}

        def mask_for(k_len: int, device) -> Tensor:
            buf = state.get("mask")
            if buf is None or buf.shape[0] < k_len or buf.device != torch.device(device):
                buf = torch.zeros(max(2 * k_len, max_end), dtype=torch.bool, device=device)
                for s in spans:
                    buf[s.start:s.end] = True
                state["mask"] = buf
                state["idx"] = idx_cpu.to(device)
            return buf[:k_len]

        def hook(pattern: Float[Tensor, "batch head q k"], hook=None):
            # pattern: [batch, head, q_pos, k_pos]; query row r is at absolute position k_len - q_len + r
            q_len, k_len = pattern.shape[-2], pattern.shape[-1]
            if max_end > k_len:
                raise ValueError(
                    f"split_softmax span(s) {spans} reach past the sequence of {k_len} key "
                    f"positions at layer {layer}: spans are absolute token positions in the prompt."
                )
            if tau_f == 1.0:
                return pattern
            mask = mask_for(k_len, pattern.device)
            idx = state["idx"]
            first = k_len - q_len
            qpos = None if first >= min_start else torch.arange(first, k_len, device=pattern.device)
            new = split_softmax_pattern(
                pattern.index_select(1, idx), mask, tau_f, query_positions=qpos, min_query=min_start
            )
            return pattern.index_copy(1, idx, new)  # a new tensor; other heads copied bit for bit

        return hook

    hooks = [(hook_name(l, "hook_pattern"), make_hook(l, hs)) for l, hs in by_layer.items()]
    label = f"split_softmax(tau={tau_f:g}, {len(head_list)} heads, spans={spans})"
    handle = attach_hooks(model, hooks, label=label)
    handle.hook_names = [n for n, _ in hooks]
    return handle
