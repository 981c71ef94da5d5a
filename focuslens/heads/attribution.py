"""Attribution patching (AtP) and AtP*'s exact-softmax fix: every head's patching effect from one backward.

Why this module exists
----------------------
Exact activation patching (:func:`focuslens.heads.patching.patch_heads`) needs one forward pass per head
(and per position). Attribution patching (Nanda 2023, "Attribution patching: activation patching
at industrial scale") replaces each of those runs by the first-order Taylor term of the metric
around the corrupted run:

    m(patch a ← a_clean) − m_corrupt  ≈  (a_clean − a_corrupt) · ∂m/∂a |_corrupted

summed over positions and ``d_head`` (and over query/key positions for the attention pattern).
All heads of all layers and all sites come from one clean forward (cached), one corrupted forward
and one backward — three forward-equivalents instead of ``layers × heads`` forwards.

Where it is wrong, and AtP*'s fixes (Kramár et al. 2024, "AtP*: An efficient and scalable method for
localizing LLM behaviour to components"):

* **Queries and keys act through a softmax**, which saturates: a key that would win the softmax
  after patching can have a tiny gradient now. AtP*'s **QK fix** (implemented, ``qk_fix=True``,
  default) recomputes the patched attention pattern *exactly* and stays linear only after it:

      effect_q(head h) ≈ Σ_{t,j} (A'_{tj} − A_{tj}) · ∂m/∂A_{tj},   A' = softmax(q_clean k_corruptᵀ)

  (``k`` the same with ``q_corrupt k_cleanᵀ``, summed over the query heads that share the KV head).
  Per key position ``j`` only column ``j`` of the logits moves, by ``Δ_tj``, so every row has the
  closed form ``A'_{ti} = A_{ti}/D_{tj}`` (``i ≠ j``), ``A'_{tj} = A_{tj}e^{Δ_tj}/D_{tj}``,
  ``D_{tj} = 1 + A_{tj}(e^{Δ_tj} − 1)``: all keys of a head in ``O(pos²)``. The recomputation uses
  :func:`focuslens.core.attention.attention_probs` (scale, sliding window, soft-capping as the model has
  them) and needs the exact q/k route of :func:`focuslens.core.attention.require_qk_route`.
* **Cancellation** between a head's direct and indirect effects (AtP*'s **GradDrop**) is *not*
  implemented here: it costs one backward per layer and gives an upper bound for ranking only.
  Use exact patching on the top-ranked heads to confirm (``docs/patching.md``).

The metric contract is :func:`~focuslens.heads.patching.patch_heads`'s: ``logits [b, pos, d_vocab] ->
scalar`` (here it must be a differentiable torch scalar). The return contract is the same too: a
``[layer, head]`` (or ``[layer, pos, head]``) tensor of the *estimated metric of the patched
corrupted run*, ``m_corrupt + effect``, with KV heads for ``k``/``v`` and NaN for layers not asked
for, so attribution and exact patching can be compared entry by entry.

Side effects: none. Parameters' ``requires_grad`` is switched off during the backward (no weight
gradients are computed or accumulated) and restored, hooks are removed also after an exception.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..core.attention import (
    attention_logits,
    attention_probs,
    expand_kv,
    require_qk_route,
    visible_keys,
)
from ..core.hooks import attach_hooks
from ..core.models import HookedModel, hook_name, model_info
from .patching import _HOOK, PatchSite, _as_batch, _checked_layers

__all__ = ["attribution_patch_heads", "attribution_patch_sites"]


def _params_frozen(model: HookedModel):
    """Context: every parameter's ``requires_grad`` off, restored afterwards (also after an error)."""

    class _Frozen:
        def __enter__(self):
            self.saved = [(p, p.requires_grad) for p in model.parameters()]
            for p, _ in self.saved:
                p.requires_grad_(False)

        def __exit__(self, *exc):
            for p, flag in self.saved:
                p.requires_grad_(flag)

    return _Frozen()


def attribution_patch_sites(
    model: HookedModel,
    corrupted_tokens: Int[Tensor, "batch pos"],
    clean_tokens: Int[Tensor, "batch pos"],
    metric: Callable[[Float[Tensor, "batch pos d_vocab"]], Tensor],
    *,
    sites: Sequence[PatchSite] = ("z", "q", "k", "v", "pattern"),
    per_position: bool = False,
    layers: Iterable[int] | None = None,
    qk_fix: bool = True,
) -> dict[str, Tensor]:
    """Attribution-patching estimates for several sites at once, from one clean forward, one corrupted
    forward and one backward: ``{site: [layer, head]}`` (or ``[layer, pos, head]``).

    Args:
        model: a hooked model.
        corrupted_tokens, clean_tokens: ``[pos]`` or ``[batch, pos]`` ids of equal shape
            (position-aligned, e.g. from :func:`~focuslens.heads.patching.make_corrupted_pair`).
        metric: ``logits [batch, pos, d_vocab] -> scalar tensor``, differentiable.
        sites: any of ``"z"``, ``"q"``, ``"k"``, ``"v"``, ``"pattern"`` (the sites of
            :func:`~focuslens.heads.patching.patch_heads`; ``k``/``v`` per KV head under GQA).
        per_position: one estimate per position (the query row for ``"q"`` and ``"pattern"``, the key
            position for ``"k"``), ``[layer, pos, head]``; patching one position at a time.
        layers: restrict to these layers (others NaN).
        qk_fix: AtP*'s exact softmax for ``"q"``/``"k"`` (default); ``False`` for plain AtP (the
            gradient at ``hook_q``/``hook_k``).

    Returns:
        ``{site: estimate}``, estimate = ``m_corrupt + (a_clean − a_corrupt)·∂m/∂a`` (AtP) or the
        AtP* form for q/k: directly comparable with ``patch_heads``' patched metric.

    Raises:
        ValueError: unknown site/layer, shapes differ, a metric that is not a differentiable scalar,
            or ``qk_fix`` on a model whose attention cannot be recomputed exactly.
    """
    info = model_info(model)
    sites, corrupted, clean, layer_list = _checked_inputs(info, sites, corrupted_tokens, clean_tokens, layers)
    fixed = [s for s in sites if qk_fix and s in ("q", "k")]
    plans = (
        require_qk_route(model, layer_list, what="attribution with qk_fix=True", hint="Pass qk_fix=False for plain AtP.")
        if fixed
        else {}
    )
    grad_names, value_names = _hooked_names(layer_list, sites, fixed, plans)
    with torch.no_grad():
        _, cache = model.run_with_cache(clean, names_filter=lambda n: n in value_names)
    clean_acts = {n: cache[n].detach().clone() for n in value_names}
    del cache
    corrupt_acts, grad, m_corrupt = _corrupted_backward(model, corrupted, metric, grad_names, value_names)

    n_pos = corrupted.shape[1]
    out: dict[str, Tensor] = {}
    for s in sites:
        slots = info.n_kv_heads if s in ("k", "v") else info.n_heads
        res = torch.full((info.n_layers, n_pos, slots) if per_position else (info.n_layers, slots), float("nan"))
        for l in layer_list:
            if s in fixed:
                eff = _qk_fixed_effect(
                    model, s, plans[l], clean_acts, corrupt_acts, grad[hook_name(l, "hook_pattern")], per_position
                )
                res[l] = eff.cpu() + m_corrupt
                continue
            eff = _linear_effect(s, hook_name(l, _HOOK[s]), clean_acts, corrupt_acts, grad)
            res[l] = eff.cpu() + m_corrupt if per_position else eff.sum(0).cpu() + m_corrupt
        out[s] = res
    return out


def _checked_inputs(
    info, sites: Sequence[PatchSite], corrupted_tokens: Tensor, clean_tokens: Tensor, layers: Iterable[int] | None
) -> tuple[list[PatchSite], Tensor, Tensor, list[int]]:
    """The sites (deduplicated), both token batches and the layers, validated as ``attribution_patch_sites`` states."""
    sites = list(dict.fromkeys(sites))
    bad = [s for s in sites if s not in _HOOK]
    if bad or not sites:
        raise ValueError(f"Unknown site(s) {bad or sites}; use any of {sorted(_HOOK)}.")
    corrupted = _as_batch(corrupted_tokens, "corrupted_tokens")
    clean = _as_batch(clean_tokens, "clean_tokens")
    if clean.shape != corrupted.shape:
        raise ValueError(
            f"Clean {tuple(clean.shape)} and corrupted {tuple(corrupted.shape)} token tensors must have the same "
            "shape: attribution compares activations position by position (make_corrupted_pair builds such pairs)."
        )
    return sites, corrupted, clean, _checked_layers(info, layers)


def _hooked_names(layer_list: list[int], sites: list[PatchSite], fixed: list[PatchSite], plans) -> tuple[set[str], set[str]]:
    """Hook names whose gradient we need (a zero "delta" leaf is added there) and whose values we need."""
    grad_names: set[str] = set()
    value_names: set[str] = set()
    for l in layer_list:
        for s in sites:
            if s in fixed:
                grad_names.add(hook_name(l, "hook_pattern"))
                value_names.update({plans[l].q_hook, plans[l].k_hook})
            else:
                grad_names.add(hook_name(l, _HOOK[s]))
                value_names.add(hook_name(l, _HOOK[s]))
    return grad_names, value_names


def _corrupted_backward(
    model: HookedModel, corrupted: Tensor, metric: Callable, grad_names: set[str], value_names: set[str]
) -> tuple[dict[str, Tensor], dict[str, Tensor], float]:
    """One corrupted forward (activations kept) and one backward of the metric to the hooked activations:
    ``(corrupted activations, gradients, metric of the corrupted run)``."""
    names = sorted(grad_names | value_names)
    corrupt_acts: dict[str, Tensor] = {}
    deltas: dict[str, Tensor] = {}

    def make(name: str):
        def hook(x: Tensor, hook=None):
            if name in value_names:
                corrupt_acts[name] = x.detach().clone()
            if name in grad_names:
                d = torch.zeros_like(x, requires_grad=True)
                deltas[name] = d
                return x + d
            return x

        return hook

    with _params_frozen(model), torch.enable_grad():
        with attach_hooks(model, [(n, make(n)) for n in names], label="attribution patching"):
            logits = model(corrupted)
        m = metric(logits)
        if not isinstance(m, Tensor) or m.numel() != 1 or not m.requires_grad:
            raise ValueError(
                "metric must return a differentiable scalar torch tensor computed from the logits "
                f"(got {type(m).__name__}{'' if not isinstance(m, Tensor) else ' of shape ' + str(tuple(m.shape))}); "
                "e.g. logit_diff_metric, or (logits[:, -1, good] - logits[:, -1, bad]).mean()."
            )
        order = sorted(deltas)
        grads = torch.autograd.grad(m, [deltas[n] for n in order], allow_unused=True)
    m_corrupt = float(m.detach())
    grad = {n: (g if g is not None else torch.zeros_like(deltas[n])).detach() for n, g in zip(order, grads)}
    del logits, m
    deltas.clear()
    return corrupt_acts, grad, m_corrupt


def _linear_effect(
    site: str, name: str, clean_acts: dict[str, Tensor], corrupt_acts: dict[str, Tensor], grad: dict[str, Tensor]
) -> Tensor:
    """Plain AtP at one hook: ``(a_clean − a_corrupt)·∂m/∂a`` summed to ``[pos, slot]`` (query rows for the pattern)."""
    prod = (clean_acts[name].float() - corrupt_acts[name].float()) * grad[name].float()
    if site == "pattern":  # [b, head, q_pos, k_pos] -> [q_pos, head]
        return prod.sum((0, 3)).transpose(0, 1)
    return prod.sum((0, 3))  # [b, pos, slot, d] -> [pos, slot]

def _qk_fixed_effect(
    model: HookedModel,
    site: str,
    la,
    clean: dict[str, Tensor],
    corrupt: dict[str, Tensor],
    g: Float[Tensor, "batch head q_pos k_pos"],
    per_position: bool,
) -> Float[Tensor, "pos slot"] | Float[Tensor, slot]:
    """AtP*'s QK fix at one layer: ``Σ (A' − A)·∂m/∂A`` with ``A'`` the exactly recomputed pattern.

    Returns ``[pos, slot]`` with ``per_position`` (per query row for ``q``, slot = query head; per key
    position for ``k``, slot = KV head), else ``[slot]`` for the all-position patch.
    """
    info = model_info(model)
    H, G = info.n_heads, info.n_kv_heads
    # [b, pos, heads, d] -> [b, heads, pos, d]; keys expanded to query heads (GQA)
    qx = corrupt[la.q_hook].float().transpose(1, 2)
    kx = expand_kv(corrupt[la.k_hook].float(), H).transpose(1, 2)
    n_pos = qx.shape[-2]
    rows = torch.arange(n_pos)
    g = g.float()
    a = attention_probs(qx, kx, la, rows)  # [b, H, q, k]: the corrupted pattern, recomputed

    def by_kv(x: Tensor) -> Tensor:  # [..., H] -> [..., G]: a KV head's effect sums its query heads
        return x.reshape(*x.shape[:-1], G, H // G).sum(-1)

    if site == "q":
        qc = clean[la.q_hook].float().transpose(1, 2)
        a_new = attention_probs(qc, kx, la, rows)  # row t = the pattern with query t patched
        per_row = ((a_new - a) * g).sum(-1).sum(0).transpose(0, 1)  # [q_pos, H]; additive over rows
        return per_row if per_position else per_row.sum(0)
    kc = expand_kv(clean[la.k_hook].float(), H).transpose(1, 2)
    if not per_position:
        a_new = attention_probs(qx, kc, la, rows)  # every key patched at once
        return by_kv(((a_new - a) * g).sum((0, 2, 3)))
    vis = visible_keys(rows, n_pos, sliding_window=la.sliding_window).to(a.device)  # [q, k]
    s_old = attention_logits(qx, kx, scale=la.scale, softcap=la.softcap)
    s_new = attention_logits(qx, kc, scale=la.scale, softcap=la.softcap)
    # Key j alone patched: column j of the logits moves by delta[t, j], the row renormalises by D[t, j].
    # In log space, so that a key with underflowing weight that the patch makes win is not lost.
    neg = torch.tensor(float("-inf"), device=a.device)
    delta = torch.where(vis, s_new - s_old, 0.0)
    log_a = torch.where(vis, s_old - torch.logsumexp(torch.where(vis, s_old, neg), -1, keepdim=True), neg)
    log_d = torch.logaddexp(torch.log1p(-log_a.exp().clamp(max=1.0)), log_a + delta)  # log(1 + A(e^Δ − 1))
    inv_d = torch.exp(-log_d)
    row_dot = (a * g).sum(-1, keepdim=True)  # [b, H, q, 1]: Σ_i A_ti g_ti
    eff = row_dot * (inv_d - 1) + g * (torch.exp(log_a + delta - log_d) - a * inv_d)  # [b, H, t, j]
    eff = torch.where(vis & (delta != 0), eff, 0.0)  # an unmoved logit changes nothing (exactly)
    return by_kv(eff.sum(2).sum(0).transpose(0, 1))  # [k_pos, G]


def attribution_patch_heads(
    model: HookedModel,
    corrupted_tokens: Int[Tensor, "batch pos"],
    clean_tokens: Int[Tensor, "batch pos"],
    metric: Callable[[Float[Tensor, "batch pos d_vocab"]], Tensor],
    *,
    site: PatchSite = "z",
    per_position: bool = False,
    layers: Iterable[int] | None = None,
    qk_fix: bool = True,
) -> Float[Tensor, "layer head"] | Float[Tensor, "layer pos head"]:
    """Attribution patching of one site: the first-order estimate of :func:`~focuslens.heads.patching.patch_heads`.

    Same arguments and return contract as ``patch_heads`` (estimated patched metric, ``[layer, head]``,
    KV heads for ``k``/``v``, ``[layer, pos, head]`` with ``per_position``), at the cost of three
    forward-equivalents for all heads. See :func:`attribution_patch_sites` (several sites at once).

    Example:
        >>> clean, corrupt = make_corrupted_pair(model, example)
        >>> metric = logit_diff_metric(model, clean.answers[0], corrupt.answers[0])
        >>> est = attribution_patch_heads(model, corrupt.tokens, clean.tokens, metric, site="z")
        >>> top = (est - metric(model(corrupt.tokens[None]))).abs().flatten().topk(20)  # then patch those
    """
    return attribution_patch_sites(
        model, corrupted_tokens, clean_tokens, metric, sites=[site], per_position=per_position, layers=layers,
        qk_fix=qk_fix,
    )[site]
