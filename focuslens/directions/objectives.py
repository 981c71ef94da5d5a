"""Focus-direction objectives: the attention mass on the relevant span, from cached q/k or live.

Every mass here is computed by :mod:`focuslens.core.attention` (per-layer scale, causal + sliding-window
masks, soft-capping, row softmax), the same definition scoring and the backends use, so it equals the
mass read from ``hook_pattern``; the tests check it on GQA, learned-position, and sliding-window +
QK-norm (Gemma-3) models. Models where recomputing attention from q/k is not exact (learned sinks,
ALiBi...) are refused by :func:`cache_qk` with the reason.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..core.attention import (LayerAttention, attention_logits, attention_probs, expand_kv, layer_attention,
                         require_qk_route, row_softmax, soft_cap, visible_keys)
from ..core.hooks import attach_hooks
from ..core.forward import run_until
from ..core.models import HookedModel, model_info, warn_if_slow_dtype
from ..core.checks import Head, check_heads
from ..core.errors import UsageError
from .artefact import FocusDirections
from .config import CachePrecision
from .data import DirectionExample, _check_direction_examples

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
    (:func:`~focuslens.core.attention.attention_scale`); ``scale`` is that one float when every selected
    layer shares it (the usual case) and the ``[S]`` tensor otherwise. ``softcap`` is the layers'
    logit soft-cap (None: none). ``layers`` maps each selected layer to its
    :class:`~focuslens.core.attention.LayerAttention`.
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

    def __repr__(self) -> str:
        """One line: examples, heads and layers cached (not the tensors)."""
        mb = sum(t.numel() * t.element_size() for ts in (self.queries, self.keys, self.logits0) for t in ts) / 2**20
        return (f"QKCache({len(self)} examples, {len(self.heads)} heads on {len(self.kv_pairs)} KV heads, "
                f"layers {sorted({l for l, _ in self.heads})[:8]}, {mb:.1f} MiB)")


def _layer_plan(model: HookedModel, heads: list[Head], *, what: str) -> tuple[dict[int, LayerAttention], Tensor, float | Tensor, float | None]:
    """Exact per-layer attention of the heads' layers, per-head scale ``[S]``, ``scale``, soft-cap."""
    layers = require_qk_route(model, [l for l, _ in heads], what=what, hint=_HINT)
    head_scale = torch.tensor([layers[l].scale for l, _ in heads], dtype=torch.float32)
    caps = {layers[l].softcap for l in layers}
    if len(caps) > 1:
        raise NotImplementedError(f"{what}: the selected layers have different logit soft-caps {sorted(map(str, caps))}.")
    uniform = bool((head_scale == head_scale[0]).all())
    return layers, head_scale, (float(head_scale[0]) if uniform else head_scale), caps.pop()


def _length_buckets(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Example indices grouped for batched forwards: sorted by length, ``batch_size`` at a time, so a
    batch pads only to the longest of similar lengths (≤ a few % waste on one task's prompts)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[a:a + batch_size] for a in range(0, len(order), batch_size)]


def _pad_right(seqs: Sequence[Tensor], pad_id: int) -> tuple[Int[Tensor, "B P"], Int[Tensor, "B P"] | None]:
    """``[B, P]`` tokens right-padded with ``pad_id`` and the ``[B, P]`` attention mask (1 = real);
    the mask is None when no sequence is padded (batch of one, or equal lengths).

    Right padding keeps every real token's position, and with causal attention a real row never sees
    a later (padding) key, so the real rows' activations equal the unpadded pass; the mask is passed
    anyway so that no backend guesses padding from the token values (BOS often equals the pad id)."""
    P = max(int(t.shape[-1]) for t in seqs)
    toks = torch.full((len(seqs), P), int(pad_id), dtype=torch.long)
    mask = torch.zeros(len(seqs), P, dtype=torch.long)
    for b, t in enumerate(seqs):
        toks[b, : t.shape[-1]] = t
        mask[b, : t.shape[-1]] = 1
    return toks, (None if bool(mask.all()) else mask)


def cache_qk(
    model: HookedModel,
    examples: Sequence[DirectionExample],
    heads: Sequence[Sequence[int]],
    *,
    progress: bool = False,
    batch_size: int = 8,
    precision: CachePrecision = "model",
) -> QKCache:
    """Frozen forward passes over the examples; keep only what the attention objective needs.

    Each pass stops right after the last selected layer's key hook (:func:`~focuslens.core.forward.run_until`:
    nothing downstream is computed). Examples are run ``batch_size`` at a time, grouped by length and
    right-padded (padding is masked and, being after every real token, never visible to a real row:
    the cache equals the one-by-one cache up to float rounding of the batched matmuls, ≤ 1e-5 — tested).
    ``batch_size=1`` is one unpadded pass per example. The cache keeps the examples' order.
    ``precision="bfloat16"`` runs the passes under ``torch.autocast(dtype=torch.bfloat16)`` when the
    model is float32 (2.2–2.6× faster on AMX CPUs and GPUs, several times *slower* on CPUs without
    AMX / AVX-512 BF16, which get a ``RuntimeWarning``; q/k then carry bfloat16 rounding); the
    cached tensors are float32 either way.

    Raises:
        ValueError: the model's attention cannot be recomputed exactly from hooked q/k on the selected
            layers (:func:`focuslens.core.attention.require_qk_route` gives the reason); ``batch_size`` < 1.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1 (examples per frozen forward pass), got {batch_size!r}.")
    _check_direction_examples(examples)  # a TaskExample, a RenderedExample, a lone example: named, not a KeyError
    if len(examples) == 0:
        raise UsageError("cache_qk: examples is empty; give at least one DirectionExample (make_direction_examples).")
    if precision not in ("model", "bfloat16"):
        raise ValueError(f"precision must be 'model' or 'bfloat16'; got {precision!r}.")
    heads = check_heads(model, heads)
    autocast = _cache_autocast(model, precision)
    info = model_info(model)
    layers, head_scale, scale, softcap = _layer_plan(model, heads, what="The cached attention objective (cache_qk)")
    kv_pairs = sorted({(l, info.kv_head(h)) for l, h in heads})
    kv_index = torch.tensor([kv_pairs.index((l, info.kv_head(h))) for l, h in heads])
    out = QKCache(list(heads), kv_pairs, kv_index, scale, [], [], [], [], [], [], head_scale, softcap, layers)
    windows = [layers[l].sliding_window for l, _ in heads]
    names = [s for l in sorted(layers) for s in (layers[l].q_hook, layers[l].k_hook)]
    tok = getattr(model, "tokenizer", None)
    pad_id = next((int(x) for x in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None))
                   if x is not None), 0)
    slots: list[tuple[Tensor, ...] | None] = [None] * len(examples)
    groups = _length_buckets([len(ex.prompt) for ex in examples], batch_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(examples), desc="caching q/k", leave=False)
    for group in groups:
        toks, mask = _pad_right([examples[i].prompt.tokens for i in group], pad_id)
        with autocast:
            store = run_until(model, toks, names=names, attention_mask=mask)
        for b, i in enumerate(group):
            slots[i] = _cached_example(store, b, examples[i], out, layers, windows, info.d_head)
        del store
        if bar is not None:
            bar.update(len(group))
    if bar is not None:
        bar.close()
    for q, k, lg, vis, rel, sink in slots:  # type: ignore[misc]
        out.queries.append(q)
        out.keys.append(k)
        out.logits0.append(lg)
        out.visible.append(vis)
        out.relevant.append(rel)
        out.sink.append(sink)
    return out


def _cache_autocast(model: HookedModel, precision: CachePrecision):
    """The context of :func:`cache_qk`'s frozen passes: bfloat16 autocast for a float32 model when asked
    (with a warning where bfloat16 is slow), else nothing."""
    param = next(model.parameters())
    use_bf16 = precision == "bfloat16" and param.dtype == torch.float32
    if use_bf16:
        warn_if_slow_dtype(torch.bfloat16, param.device, what="cache_qk(precision='bfloat16')",
                           fix="use precision='model' (TrainConfig(cache_precision='model'))")
    return (torch.autocast(device_type=param.device.type, dtype=torch.bfloat16)
            if use_bf16 else contextlib.nullcontext())


def _cached_example(store: dict[str, Tensor], b: int, ex: DirectionExample, out: QKCache, layers: dict,
                    windows: list, d_head: int) -> tuple[Tensor, ...]:
    """Row ``b`` of a frozen pass: ``(q, k, logits0, visible, relevant, sink)`` of one example, as cached."""
    heads, kv_pairs, head_scale = out.heads, out.kv_pairs, out.head_scale
    r = ex.prompt.response
    n = r.end
    q = torch.stack([store[layers[l].q_hook][b, r.start:r.end, h] for l, h in heads]).float()  # [S, R, d]
    k = torch.stack([store[layers[l].k_hook][b, :n, g] for l, g in kv_pairs]).float()  # [U, N, d]
    if q.shape[-1] != d_head:
        raise RuntimeError(f"Unexpected query shape {tuple(q.shape)} at {layers[heads[0][0]].q_hook}.")
    rows = torch.arange(r.start, r.end)
    vis = torch.stack([visible_keys(rows, n, sliding_window=w) for w in windows])  # [S, R, N]
    lg = attention_logits(q, k[out.kv_index], scale=head_scale[:, None, None]).masked_fill(~vis, float("-inf"))
    rel = torch.zeros(n, dtype=torch.bool)
    rel[ex.relevant.slice] = True
    sink = torch.zeros(n, dtype=torch.bool)
    sink[0] = True
    return q, k, lg, vis, rel, sink


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
    :mod:`focuslens.core.attention` definition). With ``u_k`` (the authors' key-side vector) the logits
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


@dataclass
class _Batch:
    """Examples padded into one batch (:func:`_pad_batch`), built once and reused every training step.

    ``lg`` ``[B,S,R,N]`` unmodified logits (-inf where invisible);
    ``E`` ``[B,S,R,N]`` = ``exp(lg − rowmax)`` — the factorised path (no soft-cap): softmax of
    ``lg + b`` is ``E·exp(b) / Σ E·exp(b)`` because the bias ``b_j = scale·u·k_j`` is the same for
    every row, so a step needs no exponential of the big tensor, only two matrix-vector products;
    ``K`` per-head keys (GQA expanded), ``[S,d,B·N]`` on the factorised path (the bias ``u·K`` is one
    batched ``[S,1,d] @ [S,d,B·N]`` product; it is memory-bound and this layout reads K 2-3× faster,
    forward and backward) and ``[S,B,N,d]`` on the reference path (``[S,B·N,d] @ [S,d,1]``, the
    previous layout: the reference path is the previous code, operation for operation);
    ``cmask`` ``[B,N]`` column mask, ``rmask`` ``[B,R]`` row mask, ``vis`` ``[B,S,R,N]`` visibility
    (soft-cap path only), ``head_scale`` ``[S]``, ``softcap``.
    """

    lg: Tensor
    E: Tensor | None
    K: Tensor
    cmask: Tensor
    rmask: Tensor
    vis: Tensor | None
    head_scale: Tensor
    softcap: float | None


def _pad_batch(cache: QKCache, idx: Sequence[int], column: str, *, factorised: bool = True) -> _Batch:
    """Pad examples ``idx`` into one :class:`_Batch`.

    Padding rows see key 0 (logit 0) and are weighted 0 by the row mask: no row is empty, so
    :func:`~focuslens.core.attention.row_softmax` takes its one-pass path on every training step.
    ``factorised=False`` (or a soft-capped model, where the bias does not factor out) keeps the
    reference path: the full softmax of ``lg + b`` every step."""
    n_max = max(cache.logits0[i].shape[-1] for i in idx)
    r_max = max(cache.logits0[i].shape[1] for i in idx)
    S, d = len(cache.heads), cache.keys[0].shape[-1]
    B = len(idx)
    lg = torch.full((B, S, r_max, n_max), float("-inf"))
    K = torch.zeros(S, B, n_max, d)
    cmask = torch.zeros(B, n_max)
    rmask = torch.zeros(B, r_max)
    cols = cache.relevant if column == "relevant" else cache.sink
    for b, i in enumerate(idx):
        _, r, n = cache.logits0[i].shape
        lg[b, :, :r, :n] = cache.logits0[i]
        lg[b, :, r:, 0] = 0.0
        K[:, b, :n] = cache.keys[i][cache.kv_index]
        cmask[b, :n] = cols[i].float()
        rmask[b, :r] = 1.0
    head_scale = cache.head_scale if cache.head_scale is not None else torch.full((S,), float(cache.scale))
    if factorised and cache.softcap is None:
        E = (lg - lg.amax(-1, keepdim=True)).exp_()  # every row has a visible key: the max is finite
        Kt = K.view(S, B * n_max, d).transpose(1, 2).contiguous()
        return _Batch(lg, E, Kt, cmask, rmask, None, head_scale, None)
    vis = torch.zeros(B, S, r_max, n_max, dtype=torch.bool)
    for b, i in enumerate(idx):
        _, r, n = cache.logits0[i].shape
        vis[b, :, :r, :n] = cache.visible[i] if cache.visible else cache.logits0[i] > float("-inf")
        vis[b, :, r:, 0] = True
    return _Batch(lg, None, K, cmask, rmask, vis, head_scale, cache.softcap)


def _mass_from_batch(batch: _Batch, u: Tensor, scale: float | Tensor | None = None) -> Tensor:
    """Per-head mass ``[S]`` of a :func:`_pad_batch` batch under query vectors ``u`` (``[S, d]``).

    The batch carries each head's own scale; ``scale`` (accepted for older callers) must agree with it.
    Both paths compute the :mod:`focuslens.core.attention` row softmax (equal to ~1e-6, tested).
    """
    K, head_scale = batch.K, batch.head_scale
    B, N = batch.cmask.shape
    S = K.shape[0]
    if scale is not None and not torch.allclose(torch.as_tensor(scale, dtype=torch.float32).expand(S), head_scale):
        raise ValueError(f"scale {scale} disagrees with the batch's per-head scale {head_scale.tolist()}.")
    # the per-head scale goes on u ([S, d]), not on the [S, B, N] product
    su = u.to(K.dtype) * head_scale.to(K.dtype)[:, None]
    if batch.E is not None:  # K is [S, d, B·N]
        bias = torch.bmm(su[:, None, :], K).view(S, B, N).permute(1, 0, 2)  # [B, S, N]
        mass = _factorised_mass(batch, bias)
        if mass is not None:
            return mass
    else:  # K is [S, B, N, d]
        bias = torch.bmm(K.view(S, B * N, -1), su[:, :, None]).view(S, B, N).permute(1, 0, 2)
    if batch.softcap is None:  # lg holds -inf at invisible entries and finite bias keeps it so: no re-masking
        p = row_softmax(batch.lg + bias[:, :, None, :], None)
    else:  # soft-capping maps -inf to -cap: mask again after it
        p = row_softmax(soft_cap(batch.lg + bias[:, :, None, :], batch.softcap), batch.vis)
    mass = (p * batch.cmask[:, None, None, :]).sum(-1)  # [B, S, R]
    per = (mass * batch.rmask[:, None, :]).sum(-1) / batch.rmask.sum(-1)[:, None]  # [B, S]
    return per.mean(0)


def _factorised_mass(batch: _Batch, bias: Tensor) -> Tensor | None:
    """The row-softmax mass on the columns from ``E`` and ``w = exp(b − max b)``: per row
    ``Σ_{j∈C} E_tj·w_j / Σ_j E_tj·w_j`` as one ``[B·S, R, N] @ [B·S, N, 2]`` product (autograd
    through it is two more). None when a row's denominator underflows (only for bias ranges ≳ 80
    nats, far beyond the norm cap): the caller then takes the reference path on ``lg``."""
    E = batch.E
    B, S, R, N = E.shape
    w = (bias - bias.amax(-1, keepdim=True)).exp()  # [B, S, N]
    W2 = torch.stack([w * batch.cmask[:, None, :], w], dim=-1)  # [B, S, N, 2]
    nd = torch.bmm(E.view(B * S, R, N), W2.view(B * S, N, 2)).view(B, S, R, 2)
    den = nd[..., 1]
    if not bool((den > torch.finfo(den.dtype).tiny).all()):
        return None
    mass = nd[..., 0] / den  # [B, S, R]
    per = (mass * batch.rmask[:, None, :]).sum(-1) / batch.rmask.sum(-1)[:, None]  # [B, S]
    return per.mean(0)


def _batched_mass(cache: QKCache, idx: Sequence[int], u: Tensor, *, column: str = "relevant",
                  factorised: bool = True) -> Tensor:
    """Per-head mass ``[S]`` averaged over examples ``idx`` (padded into one batch)."""
    return _mass_from_batch(_pad_batch(cache, idx, column, factorised=factorised), u)


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
    :func:`~focuslens.core.attention.attention_probs`, with each layer's own scale, window and soft-cap;
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
