"""Focus-direction objectives: the attention mass on the relevant span, from cached q/k or live.

Every mass here is computed by :mod:`focuslens.attention` (per-layer scale, causal + sliding-window
masks, soft-capping, row softmax), the same definition scoring and the backends use, so it equals the
mass read from ``hook_pattern``; the tests check it on GQA, learned-position, and sliding-window +
QK-norm (Gemma-3) models. Models where recomputing attention from q/k is not exact (learned sinks,
ALiBi...) are refused by :func:`cache_qk` with the reason.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..attention import (LayerAttention, attention_logits, attention_probs, expand_kv, layer_attention,
                         require_qk_route, row_softmax, soft_cap, visible_keys)
from ..hooks import attach_hooks
from ..models import Head, HookedModel, check_heads, model_info
from .artefact import FocusDirections
from .data import DirectionExample

__all__ = ["QKCache", "cache_qk", "attention_mass", "heldout_attention"]

_HINT = "Train with objective='likelihood' (the live NLL objective), or use another model."


@dataclass
class QKCache:
    """Frozen-model queries (response rows) and keys (all positions) of the selected heads.

    ``logits0[i]`` is ``[S, R_i, N_i]``: ``scale_s · q_t·k_j`` for the selected heads and response rows,
    before soft-capping, and ``-inf`` where key j is invisible to row t (causal, and outside the
    sliding window on sliding-window layers); ``visible[i]`` is the same mask as bool. ``keys[i]`` is
    ``[U, N_i, d]`` for the U distinct ``(layer, kv_head)`` pairs; ``kv_index[s]`` says which one head
    s uses (GQA). ``queries[i]`` is ``[S, R_i, d]``. ``head_scale[s]`` is head s's layer scale
    (:func:`~focuslens.attention.attention_scale`); ``scale`` is that one float when every selected
    layer shares it (the usual case) and the ``[S]`` tensor otherwise. ``softcap`` is the layers'
    logit soft-cap (None: none). ``layers`` maps each selected layer to its
    :class:`~focuslens.attention.LayerAttention`.
    """

    heads: list[Head]
    kv_pairs: list[tuple[int, int]]
    kv_index: Int[Tensor, "S"]
    scale: float | Float[Tensor, "S"]
    queries: list[Tensor]
    keys: list[Tensor]
    logits0: list[Tensor]
    relevant: list[Tensor]  # [N_i] bool
    sink: list[Tensor]  # [N_i] bool: position 0
    visible: list[Tensor] = field(default_factory=list)  # [S, R_i, N_i] bool
    head_scale: Float[Tensor, "S"] | None = None
    softcap: float | None = None
    layers: dict[int, LayerAttention] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.logits0)


def _layer_plan(model: HookedModel, heads: list[Head], *, what: str) -> tuple[dict[int, LayerAttention], Tensor, float | Tensor, float | None]:
    """Exact per-layer attention of the heads' layers, per-head scale ``[S]``, ``scale``, soft-cap."""
    layers = require_qk_route(model, [l for l, _ in heads], what=what, hint=_HINT)
    head_scale = torch.tensor([layers[l].scale for l, _ in heads], dtype=torch.float32)
    caps = {layers[l].softcap for l in layers}
    if len(caps) > 1:
        raise NotImplementedError(f"{what}: the selected layers have different logit soft-caps {sorted(map(str, caps))}.")
    uniform = bool((head_scale == head_scale[0]).all())
    return layers, head_scale, (float(head_scale[0]) if uniform else head_scale), caps.pop()


def cache_qk(
    model: HookedModel,
    examples: Sequence[DirectionExample],
    heads: Sequence[Sequence[int]],
    *,
    progress: bool = False,
) -> QKCache:
    """One frozen forward pass per example; keep only what the attention objective needs.

    The forward pass stops after the last selected layer (nothing downstream is needed).

    Raises:
        ValueError: the model's attention cannot be recomputed exactly from hooked q/k on the selected
            layers (:func:`focuslens.attention.require_qk_route` gives the reason).
    """
    heads = check_heads(model, heads)
    info = model_info(model)
    layers, head_scale, scale, softcap = _layer_plan(model, heads, what="The cached attention objective (cache_qk)")
    kv_pairs = sorted({(l, info.kv_head(h)) for l, h in heads})
    kv_index = torch.tensor([kv_pairs.index((l, info.kv_head(h))) for l, h in heads])
    last = max(layers)
    out = QKCache(list(heads), kv_pairs, kv_index, scale, [], [], [], [], [], [], head_scale, softcap, layers)
    windows = [layers[l].sliding_window for l, _ in heads]

    class _Stop(Exception):
        pass

    it = examples
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(examples, desc="caching q/k", leave=False)
    for ex in it:
        store: dict[str, Tensor] = {}

        def make_grab(name):  # keyed by the requested name: hook.name may be an alias (GPT-2)
            def grab(x, hook):
                store[name] = x[0].detach()  # [pos, H or G, d]
                if name == layers[last].k_hook:
                    raise _Stop()
                return x

            return grab

        hooks = []
        for l in sorted(layers):
            hooks += [(layers[l].q_hook, make_grab(layers[l].q_hook)), (layers[l].k_hook, make_grab(layers[l].k_hook))]
        r = ex.prompt.response
        with attach_hooks(model, hooks, label="focus directions: cache q/k"), torch.no_grad():
            try:
                model(ex.prompt.tokens[None])
            except _Stop:
                pass
        n = r.end
        q = torch.stack([store[layers[l].q_hook][r.start:r.end, h] for l, h in heads]).float()  # [S, R, d]
        k = torch.stack([store[layers[l].k_hook][:n, g] for l, g in kv_pairs]).float()  # [U, N, d]
        if q.shape[-1] != info.d_head:
            raise RuntimeError(f"Unexpected query shape {tuple(q.shape)} at {layers[heads[0][0]].q_hook}.")
        rows = torch.arange(r.start, r.end)
        vis = torch.stack([visible_keys(rows, n, sliding_window=w) for w in windows])  # [S, R, N]
        lg = attention_logits(q, k[kv_index], scale=head_scale[:, None, None]).masked_fill(~vis, float("-inf"))
        rel = torch.zeros(n, dtype=torch.bool)
        rel[ex.relevant.slice] = True
        sink = torch.zeros(n, dtype=torch.bool)
        sink[0] = True
        out.queries.append(q)
        out.keys.append(k)
        out.logits0.append(lg)
        out.visible.append(vis)
        out.relevant.append(rel)
        out.sink.append(sink)
    return out


def _scale_column(scale: float | Tensor, s: int) -> float | Tensor:
    """``scale`` as something that multiplies ``[S, ...]``: a float, or an ``[S, 1]`` tensor."""
    if isinstance(scale, Tensor) and scale.numel() > 1:
        if scale.numel() != s:
            raise ValueError(f"scale has {scale.numel()} entries for {s} heads.")
        return scale.reshape(s, 1)
    return float(scale)


def attention_mass(
    logits0: Float[Tensor, "S R N"],
    keys: Float[Tensor, "S N d"],
    relevant: Float[Tensor, "N"] | Tensor,
    u_q: Float[Tensor, "S d"] | None,
    *,
    scale: float | Float[Tensor, "S"],
    queries: Float[Tensor, "S R d"] | None = None,
    u_k: Float[Tensor, "S d"] | None = None,
    visible: Bool[Tensor, "S R N"] | None = None,
    softcap: float | None = None,
) -> Float[Tensor, "S"]:
    """Mean over response rows of the attention mass on the ``relevant`` columns, per head.

    ``row_softmax(softcap(logits0 + scale·u_q·k_j))`` summed over j ∈ C, averaged over rows (the
    :mod:`focuslens.attention` definition). With ``u_k`` (the authors' key-side vector) the logits
    become ``scale·(q_t+u_q)·(k_j+u_k)`` — needs ``queries`` — and the result is the same up to
    rounding: the extra terms are constant in j.

    Args:
        logits0: ``[S, R, N]`` unmodified scaled logits (:attr:`QKCache.logits0`: ``-inf`` where
            invisible).
        scale: one float, or ``[S]`` per head (:attr:`QKCache.head_scale`).
        visible: ``[S, R, N]`` visibility (:attr:`QKCache.visible`); default: the finite entries of
            ``logits0``.
        softcap: the layers' logit soft-cap (:attr:`QKCache.softcap`).
    """
    sc = _scale_column(scale, logits0.shape[0])
    lg = logits0
    if u_q is not None:
        lg = lg + (torch.einsum("sd,snd->sn", u_q, keys) * sc)[:, None, :]
    if u_k is not None:
        if queries is None:
            raise ValueError("u_k needs the raw queries.")
        qq = queries + (u_q[:, None, :] if u_q is not None else 0)
        lg = lg + (torch.einsum("srd,sd->sr", qq, u_k) * sc)[:, :, None]
    vis = visible if visible is not None else logits0 > float("-inf")
    p = row_softmax(soft_cap(lg, softcap), vis)
    return (p * relevant.to(p.dtype)[None, None, :]).sum(-1).mean(-1)


def _pad_batch(cache: QKCache, idx: Sequence[int], column: str) -> tuple[Tensor, ...]:
    """Pad examples ``idx`` into one batch: logits0 ``[B,S,R,N]``, per-head keys ``[S,B,N,d]`` (GQA
    expanded; head-major so that the bias ``K·u`` is one batched matmul with no copy), column mask
    ``[B,N]``, row mask ``[B,R]``, visibility ``[B,S,R,N]``, per-head scale ``[S]`` and the soft-cap.
    Built once per chunk and reused every step.

    Padding rows see key 0 (logit 0) and are weighted 0 by the row mask: no row is empty, so
    :func:`~focuslens.attention.row_softmax` takes its one-pass path on every training step."""
    n_max = max(cache.logits0[i].shape[-1] for i in idx)
    r_max = max(cache.logits0[i].shape[1] for i in idx)
    S, d = len(cache.heads), cache.keys[0].shape[-1]
    B = len(idx)
    lg = torch.full((B, S, r_max, n_max), float("-inf"))
    vis = torch.zeros(B, S, r_max, n_max, dtype=torch.bool)
    K = torch.zeros(S, B, n_max, d)
    cmask = torch.zeros(B, n_max)
    rmask = torch.zeros(B, r_max)
    cols = cache.relevant if column == "relevant" else cache.sink
    for b, i in enumerate(idx):
        _, r, n = cache.logits0[i].shape
        lg[b, :, :r, :n] = cache.logits0[i]
        vis[b, :, :r, :n] = cache.visible[i] if cache.visible else cache.logits0[i] > float("-inf")
        lg[b, :, r:, 0] = 0.0
        vis[b, :, r:, 0] = True
        K[:, b, :n] = cache.keys[i][cache.kv_index]
        cmask[b, :n] = cols[i].float()
        rmask[b, :r] = 1.0
    head_scale = cache.head_scale if cache.head_scale is not None else torch.full((S,), float(cache.scale))
    return lg, K, cmask, rmask, vis, head_scale, cache.softcap


def _mass_from_batch(batch: tuple[Tensor, ...], u: Tensor, scale: float | Tensor | None = None) -> Tensor:
    """Per-head mass ``[S]`` of a :func:`_pad_batch` batch under query vectors ``u`` (``[S, d]``).

    The batch carries each head's own scale; ``scale`` (accepted for older callers) must agree with it.
    """
    lg, K, cmask, rmask, vis, head_scale, softcap = batch
    S, B, N, d = K.shape
    if scale is not None and not torch.allclose(torch.as_tensor(scale, dtype=torch.float32).expand(S), head_scale):
        raise ValueError(f"scale {scale} disagrees with the batch's per-head scale {head_scale.tolist()}.")
    # [S, B·N, d] @ [S, d, 1]: 3-4× faster than the einsum over a [B, S, N, d] layout (which copies K);
    # the per-head scale goes on u ([S, d]), not on the [S, B, N] product
    su = u.to(K.dtype) * head_scale.to(K.dtype)[:, None]
    bias = torch.bmm(K.view(S, B * N, d), su[:, :, None]).view(S, B, N).permute(1, 0, 2)
    if softcap is None:  # lg holds -inf at invisible entries and finite bias keeps it so: no re-masking
        p = row_softmax(lg + bias[:, :, None, :], None)
    else:  # soft-capping maps -inf to -cap: mask again after it
        p = row_softmax(soft_cap(lg + bias[:, :, None, :], softcap), vis)
    mass = (p * cmask[:, None, None, :]).sum(-1)  # [B, S, R]
    per = (mass * rmask[:, None, :]).sum(-1) / rmask.sum(-1)[:, None]  # [B, S]
    return per.mean(0)


def _batched_mass(cache: QKCache, idx: Sequence[int], u: Tensor, *, column: str = "relevant") -> Tensor:
    """Per-head mass ``[S]`` averaged over examples ``idx`` (padded into one batch)."""
    return _mass_from_batch(_pad_batch(cache, idx, column), u)


def heldout_attention(cache: QKCache, directions: FocusDirections | Tensor | None, *, alpha: float = 1.0,
                      chunk: int = 64, column: Literal["relevant", "sink"] = "relevant") -> Float[Tensor, "S"]:
    """Mean response-row attention mass on the relevant span (or the sink), per head, under ``α·u``."""
    S, d = len(cache.heads), cache.keys[0].shape[-1]
    if directions is None:
        u = torch.zeros(S, d)
    elif isinstance(directions, FocusDirections):
        u = directions.select(cache.heads).vectors.float()
    else:
        u = torch.as_tensor(directions).float()
    tot = torch.zeros(S)
    with torch.no_grad():
        for a in range(0, len(cache), chunk):
            idx = list(range(a, min(a + chunk, len(cache))))
            tot += _batched_mass(cache, idx, alpha * u, column=column) * len(idx)
    return tot / len(cache)


def _project(u: Tensor, max_norm: Tensor | None) -> None:
    if max_norm is None:
        return
    with torch.no_grad():
        n = u.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        u.mul_(torch.clamp(max_norm[:, None] / n, max=1.0))


def _live_forward(model, ex: DirectionExample, heads: list[Head], u: Tensor, alpha: float, *,
                  want_attention: bool, scale: float | None = None) -> tuple[Tensor, Tensor | None]:
    """NLL of the response tokens (mean) and the selected heads' mean mass on C, with α·u injected.

    The mass is recomputed (with gradients) from the live, steered post-RoPE q and k by
    :func:`~focuslens.attention.attention_probs`, with each layer's own scale, window and soft-cap;
    ``scale`` is ignored (kept for older callers). ``want_attention`` needs an exact q/k route.
    """
    info = model_info(model)
    by_layer: dict[int, list[int]] = defaultdict(list)
    for i, (l, h) in enumerate(heads):
        by_layer[l].append(i)
    if want_attention:
        layers = require_qk_route(model, list(by_layer), what="The live attention objective (objective='both')",
                                  hint="Use objective='likelihood' on this model.")
    else:  # only the query site is needed
        layers = {l: layer_attention(model, l) for l in by_layer}
    stash: dict[str, Tensor] = {}
    hooks = []
    r = ex.prompt.response
    for l, rows in by_layer.items():
        hidx = torch.tensor([heads[i][1] for i in rows])
        ridx = torch.tensor(rows)
        la = layers[l]

        def add(x, hook, hidx=hidx, ridx=ridx, name=la.q_hook):
            delta = torch.zeros(x.shape[-2], x.shape[-1], dtype=x.dtype, device=x.device)
            delta = delta.index_put((hidx.to(x.device),), (alpha * u[ridx]).to(x.dtype))
            y = x + delta
            if want_attention:
                stash[name] = y
            return y

        hooks.append((la.q_hook, add))
        if want_attention:
            def keep(x, hook, name=la.k_hook):
                stash[name] = x
                return x

            hooks.append((la.k_hook, keep))
    with attach_hooks(model, hooks, label="focus directions: live training"):
        logits = model(ex.prompt.tokens[None])  # [1, pos, vocab]
    tgt = ex.prompt.tokens[r.start:r.end].to(logits.device)
    lp = torch.log_softmax(logits[0, r.start - 1:r.end - 1].float(), dim=-1)
    nll = -lp.gather(-1, tgt[:, None]).mean()
    if not want_attention:
        return nll, None
    masses: list[Tensor | None] = [None] * len(heads)  # in ``heads`` order
    n = r.end
    qpos = torch.arange(r.start, r.end)
    for l, rows in by_layer.items():
        la = layers[l]
        hidx = [heads[i][1] for i in rows]
        q = stash[la.q_hook][0, r.start:r.end, hidx].transpose(0, 1)  # [n, R, d]
        k = expand_kv(stash[la.k_hook][0, :n], info.n_heads, head_dim=1)[:, hidx].transpose(0, 1)  # [n, N, d]
        p = attention_probs(q, k, la, qpos)  # [n, R, N]
        m = p[..., ex.relevant.slice].sum(-1).mean(-1)  # [n]
        for j, i in enumerate(rows):
            masses[i] = m[j]
    return nll, torch.stack(masses)  # type: ignore[arg-type]
