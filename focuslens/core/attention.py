"""Attention maths, written once: query/key sites, the scale, masks, soft-capping, KV expansion, row softmax.

Why this module exists
----------------------
Several parts of focuslens recompute a head's attention from cached queries and keys instead of
storing ``[heads, N, N]`` patterns: the one-pass contextual scores (``focuslens.score``, q/k route), the
focus-direction objectives (cached and live), magnitude control's sink probe, and the fused and
nnsight backends. When each wrote its own softmax they disagreed (three mask constants, three
attention scales, no sliding window in the directions code: on Gemma-3 the directions objective saw
attention that the model never computes). Here is the one definition:

    logits_{t,j} = cap · tanh(scale · q_t·k_j / cap)     (soft-capping only where the model has it)
    A_{t,j}      = softmax_j over visible j of logits_{t,j}
    visible(t,j) = j ≤ t  and  t − j < window (sliding-window layers)  and  key j not padding

computed in float32, with invisible entries exactly 0 and a row with no visible key all zeros.

Which route is exact? (:func:`qk_route`)
-----------------------------------------
The recomputation equals ``hook_pattern`` when the hooked q/k tensors are the ones that enter the
dot product: ``hook_rot_q``/``hook_rot_k`` on rotary TransformerLens-bridge models (after QK-norm and
RoPE; checked on Gemma-3 with QK-norm and a sliding window), ``hook_q``/``hook_k`` on learned-position
models. Attention sinks, ALiBi, cross-attention and active dropout are refused with a reason; callers
then fall back to reading ``hook_pattern`` (scoring) or raise (the cached directions objective).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .models import HookedModel, hook_name, model_info

__all__ = [
    "LayerAttention",
    "layer_attention",
    "qk_route",
    "require_qk_route",
    "query_site",
    "key_site",
    "attention_scale",
    "visible_keys",
    "attention_logits",
    "row_softmax",
    "attention_probs",
    "expand_kv",
    "soft_cap",
    "module_attention",
]


@dataclass(frozen=True)
class LayerAttention:
    """What it takes to recompute one layer's attention pattern from its hooked q and k.

    Attributes:
        layer: the block index.
        q_hook, k_hook: full hook names of the query and key that enter the dot product.
        scale: the factor on ``q·k`` before the softmax (``1/sqrt(d_head)`` unless the model says
            otherwise, e.g. Gemma's ``query_pre_attn_scalar``).
        sliding_window: keys further back than this are invisible (``None``: full causal).
        softcap: ``attn_logit_softcapping`` (Gemma-2), ``None`` when absent.
        qk_norm: the model normalises q and k (the hooked tensors are already normalised).
        exact: whether recomputing from ``q_hook``/``k_hook`` reproduces ``hook_pattern``.
        why: when not exact, the reason.
    """

    layer: int
    q_hook: str
    k_hook: str
    scale: float
    sliding_window: int | None = None
    softcap: float | None = None
    qk_norm: bool = False
    exact: bool = True
    why: str = ""


def query_site(model: HookedModel) -> str:
    """``"hook_rot_q"`` on rotary models (post-RoPE, the paper's site), else ``"hook_q"``."""
    return "hook_rot_q" if model_info(model).rotary else "hook_q"


def key_site(model: HookedModel) -> str:
    """``"hook_rot_k"`` on rotary models, else ``"hook_k"`` (un-expanded under GQA)."""
    return "hook_rot_k" if model_info(model).rotary else "hook_k"


def _hf_attention(model: HookedModel, layer: int) -> tuple[Any, Any]:
    """``(bridge attention component, wrapped HF attention module)``; either may be None."""
    try:
        attn = model.blocks[layer].attn
    except (AttributeError, IndexError, TypeError):
        return None, None
    for name in ("original_component", "_original_component"):
        comp = getattr(attn, name, None)
        if comp is not None:
            return attn, comp
    return attn, None


def attention_scale(model: HookedModel, layer: int = 0) -> float:
    """The factor the model multiplies ``q·k`` by before the softmax (``1/sqrt(d_head)`` usually).

    Read from the wrapped Hugging Face attention module (``scaling``), because some models (Gemma)
    use another constant; then TransformerLens' ``cfg.attn_scale`` (a legacy ``HookedTransformer``
    divides by it) with ``scale_attn_by_inverse_layer_idx``; then ``d_head ** -0.5``.
    """
    _, hf = _hf_attention(model, layer)
    s = getattr(hf, "scaling", None) if hf is not None else None
    cfg = model.cfg
    if isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0:
        scale = float(s)
    elif not getattr(cfg, "use_attn_scale", True) or (hf is not None and getattr(hf, "scale_attn_weights", True) is False):
        scale = 1.0
    else:
        a = getattr(cfg, "attn_scale", None)
        scale = 1.0 / float(a) if isinstance(a, (int, float)) and a > 0 else model_info(model).d_head ** -0.5
    if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) or getattr(hf, "scale_attn_by_inverse_layer_idx", False):
        scale /= float(layer + 1)
    return scale


def layer_attention(model: HookedModel, layer: int) -> LayerAttention:
    """The :class:`LayerAttention` of one layer (sites, scale, window, soft-cap, exactness)."""
    info = model_info(model)
    attn, hf = _hf_attention(model, layer)
    qs, ks = query_site(model), key_site(model)
    q_hook, k_hook = hook_name(layer, qs), hook_name(layer, ks)
    scale = attention_scale(model, layer)
    window = getattr(hf, "sliding_window", None) if hf is not None else None
    window = int(window) if isinstance(window, int) and not isinstance(window, bool) and window > 0 else None
    cap = getattr(hf, "attn_logit_softcapping", None) if hf is not None else None
    cap = float(cap) if isinstance(cap, (int, float)) and cap > 0 else None
    subs = getattr(attn, "submodules", {}) or {}
    qk_norm = any(n in subs for n in ("q_norm", "k_norm")) or (hf is not None and hasattr(hf, "q_norm"))
    if window is None and hf is None:  # legacy HookedTransformer: per-layer window in cfg
        wins = getattr(model.cfg, "window_size", None)
        types = getattr(model.cfg, "attn_types", None)
        if wins and types and types[layer] == "local":
            window = int(wins)
    why = ""
    hd = model.hook_dict
    if q_hook not in hd or k_hook not in hd:
        why = f"layer {layer}: missing hook {q_hook} or {k_hook}"
    elif attn is not None and getattr(attn, "training", False) and float(getattr(hf, "attention_dropout", 0.0) or 0.0) > 0:
        why = "attention dropout is active (model in training mode)"
    elif hf is not None and getattr(hf, "sinks", None) is not None:
        why = f"layer {layer}: attention has learned sinks"
    elif hf is not None and (not getattr(hf, "is_causal", True) or getattr(attn, "is_cross_attention", False)):
        why = f"layer {layer}: not causal self-attention"
    elif getattr(model.cfg, "positional_embedding_type", "") == "alibi":
        why = f"layer {layer}: ALiBi position biases"
    elif hf is not None:
        try:
            from transformer_lens.model_bridge.generalized_components.joint_qkv_attention import (
                JointQKVAttentionBridge,
            )
            from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
                PositionEmbeddingsAttentionBridge,
            )
        except ImportError:  # pragma: no cover - TL 4 bridge without these classes
            why = "unknown TransformerLens bridge attention classes"
        else:
            if type(attn) is PositionEmbeddingsAttentionBridge:
                if not info.rotary:
                    why = f"layer {layer}: position-embedding attention without rotary config"
                elif qk_norm and getattr(model.cfg, "qk_norm_after_rope", False):
                    why = f"layer {layer}: QK-norm after RoPE (hook_rot_q/hook_rot_k are pre-norm)"
            elif type(attn) is JointQKVAttentionBridge:
                if info.rotary:
                    why = f"layer {layer}: fused rotary attention (no post-RoPE hooks)"
            else:
                why = f"layer {layer}: {type(attn).__name__} is not a plain attention (ALiBi, fused rotary...)"
    return LayerAttention(layer, q_hook, k_hook, scale, window, cap, bool(qk_norm), not why, why)


def qk_route(model: HookedModel) -> tuple[list[LayerAttention] | None, str]:
    """Every layer's :class:`LayerAttention` if all are exact, else ``(None, the first reason)``."""
    plan = [layer_attention(model, l) for l in range(model_info(model).n_layers)]
    bad = next((p for p in plan if not p.exact), None)
    return (None, bad.why) if bad is not None else (plan, "")


def require_qk_route(
    model: HookedModel, layers: Sequence[int], *, what: str, hint: str = ""
) -> dict[int, LayerAttention]:
    """The exact :class:`LayerAttention` of ``layers``, or a ``ValueError`` naming ``what`` needs it.

    ``hint`` (optional) is appended to the message: what the caller can use instead.
    """
    out = {}
    for l in sorted(set(layers)):
        la = layer_attention(model, l)
        if not la.exact:
            raise ValueError(
                f"{what} recomputes attention from the hooked queries and keys, which is not exact on this "
                f"model ({la.why}).{' ' + hint if hint else ''}"
            )
        out[l] = la
    return out


def expand_kv(x: Tensor, n_heads: int, *, head_dim: int = 2) -> Tensor:
    """Expand grouped-query K/V heads to query heads (``repeat_interleave``, HF/TL order).

    ``x`` is ``[batch, pos, n_kv_heads, d_head]`` (``head_dim=2``); query head ``h`` uses KV head
    ``h // (n_heads // n_kv_heads)``.
    """
    n_kv = x.shape[head_dim]
    if n_kv == n_heads:
        return x
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads cannot share {n_kv} KV heads evenly.")
    return x.repeat_interleave(n_heads // n_kv, dim=head_dim)


def visible_keys(
    query_pos: Int[Tensor, "R"] | Sequence[int],
    n_keys: int,
    *,
    sliding_window: int | None = None,
    key_valid: Bool[Tensor, "... N"] | None = None,
) -> Bool[Tensor, "... R N"]:
    """Which keys each query row may attend to: causal, within the window, not padding.

    Args:
        query_pos: ``[R]`` absolute position of each query row (``t``).
        n_keys: ``N``, keys at positions ``0..N-1``.
        sliding_window: a key ``j`` is visible only if ``t − j < sliding_window`` (HF's rule).
        key_valid: ``[..., N]`` False on padding keys (broadcast over leading dims).

    Returns:
        ``[R, N]`` (or ``[..., R, N]`` with ``key_valid``) bool.
    """
    t = torch.as_tensor(query_pos, dtype=torch.long).reshape(-1, 1)
    j = torch.arange(n_keys, device=t.device).reshape(1, -1)
    vis = j <= t
    if sliding_window is not None:
        vis = vis & (t - j < int(sliding_window))
    if key_valid is not None:
        vis = vis & key_valid.to(device=vis.device, dtype=torch.bool)[..., None, :]
    return vis


def attention_logits(
    q: Float[Tensor, "... R d"],
    k: Float[Tensor, "... N d"],
    *,
    scale: float | Tensor,
    softcap: float | None = None,
    bias: Float[Tensor, "... R N"] | Float[Tensor, "... 1 N"] | None = None,
) -> Float[Tensor, "... R N"]:
    """``softcap(scale · q·kᵀ + bias)`` in float32 (soft-capping as the model does, ``cap·tanh(x/cap)``).

    ``bias`` enters before the cap because a focus direction's ``α·scale·u·k_j`` is part of the dot
    product (it changes the query). Unmasked: combine with :func:`visible_keys` in :func:`row_softmax`.
    """
    lg = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if bias is not None:
        lg = lg + bias
    return soft_cap(lg, softcap)


def soft_cap(logits: Tensor, softcap: float | None, *, inplace: bool = False) -> Tensor:
    """Gemma-2's logit soft-capping ``cap·tanh(x/cap)``; the identity when ``softcap`` is None.

    ``inplace`` overwrites ``logits`` (the fused backend's workspace; no autograd)."""
    if softcap is None:
        return logits
    if inplace:
        return logits.div_(softcap).tanh_().mul_(softcap)
    return torch.tanh(logits / softcap) * softcap


def row_softmax(
    logits: Float[Tensor, "... R N"], visible: Bool[Tensor, "... R N"] | None, *, inplace: bool = False
) -> Float[Tensor, "... R N"]:
    """Softmax over the visible keys of each row, in float32; invisible entries exactly 0.

    A row with no visible key (a padding row) is all zeros instead of NaN, so that padded batches can
    be averaged with a row mask. This is the only attention softmax focuslens computes: the scoring
    q/k route, the directions objectives, the sink probe and both backends call it.

    Args:
        logits: ``[..., R, N]`` scaled (and soft-capped) logits; values at invisible entries are
            ignored (any value, ``-inf`` included).
        visible: ``[..., R, N]`` bool (broadcastable), from :func:`visible_keys`. ``None`` when the
            logits already carry ``-inf`` at every invisible entry and every row has a visible key
            (a training loop that masks once and then only adds finite biases): no masking pass.
        inplace: overwrite ``logits`` (which must be float32 and own its memory) instead of
            allocating: the fused backend computes its row blocks inside one reused workspace, because
            per-layer temporaries fragment the CPU heap. No autograd on this path.
    """
    if visible is None:  # the caller's logits already hold -inf at every invisible entry, no row empty
        return torch.softmax(logits.float(), dim=-1)
    has_key = visible.any(-1, keepdim=True)
    if inplace:
        if logits.dtype != torch.float32:
            raise ValueError(f"row_softmax(inplace=True) needs float32 logits, got {logits.dtype}.")
        lg = logits.masked_fill_(~visible, float("-inf"))
        top = lg.amax(dim=-1, keepdim=True).masked_fill_(~has_key, 0.0)  # empty rows: exp(-inf) = 0
        lg.sub_(top).exp_()
        return lg.div_(lg.sum(dim=-1, keepdim=True).clamp_min_(torch.finfo(torch.float32).tiny))
    if bool(has_key.all()):  # the common case: one masking pass and the fused softmax kernel
        return torch.softmax(torch.where(visible, logits.float(), float("-inf")), dim=-1)
    fill = torch.where(has_key, float("-inf"), 0.0)  # [..., R, 1]: empty rows get finite logits
    return torch.softmax(torch.where(visible, logits.float(), fill), dim=-1) * has_key


def attention_probs(
    q: Float[Tensor, "... R d"],
    k: Float[Tensor, "... N d"],
    la: "LayerAttention",
    query_pos: Int[Tensor, "R"] | Sequence[int],
    *,
    key_valid: Bool[Tensor, "... N"] | None = None,
    bias: Float[Tensor, "... R N"] | Float[Tensor, "... 1 N"] | None = None,
    scale: float | Tensor | None = None,
) -> Float[Tensor, "... R N"]:
    """The attention pattern of rows ``query_pos`` recomputed from post-position q and k.

    ``logits = softcap(scale·q·kᵀ + bias)``, masked by :func:`visible_keys` (causal, ``la``'s sliding
    window, ``key_valid``), then :func:`row_softmax`. ``q`` and ``k`` must have the same head layout
    (expand GQA keys with :func:`expand_kv` first). ``bias`` (optional) is added to the scaled logits
    before soft-capping — a focus direction's ``α·scale·u·k_j`` — because it acts on the query, i.e.
    inside the dot product. ``scale`` overrides ``la.scale`` (e.g. a per-head ``[..., 1, 1]`` tensor).
    """
    lg = attention_logits(q, k, scale=la.scale if scale is None else scale, softcap=la.softcap, bias=bias)
    vis = visible_keys(query_pos, k.shape[-2], sliding_window=la.sliding_window, key_valid=key_valid)
    return row_softmax(lg, vis.to(lg.device))


def module_attention(
    module: Any,
    *,
    layer: int,
    head_dim: int | None = None,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> LayerAttention:
    """A :class:`LayerAttention` for a raw Hugging Face attention module (fused and nnsight backends).

    Those backends see the module itself, not TransformerLens hooks (``q_hook``/``k_hook`` are empty).
    The keyword values, when given, are what transformers passed to the attention function (they win:
    a model may set them per call); otherwise the module's ``scaling``, ``sliding_window`` and
    ``attn_logit_softcapping`` are read, with ``head_dim ** -0.5`` as the last resort for the scale.
    ``exact`` is False (with the reason) for learned attention sinks and non-causal attention, which
    the recomputation in :func:`attention_probs` does not model.
    """
    s = scaling if scaling is not None else getattr(module, "scaling", None)
    if not (isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0):
        hd = head_dim if head_dim is not None else getattr(module, "head_dim", None)
        if hd is None:
            raise ValueError(f"layer {layer}: the attention module has no `scaling` and no head_dim was given.")
        s = int(hd) ** -0.5
    w = sliding_window if sliding_window is not None else getattr(module, "sliding_window", None)
    w = int(w) if isinstance(w, int) and not isinstance(w, bool) and w > 0 else None
    cap = softcap if softcap is not None else getattr(module, "attn_logit_softcapping", None)
    cap = float(cap) if isinstance(cap, (int, float)) and not isinstance(cap, bool) and cap > 0 else None
    why = ""
    if getattr(module, "sinks", None) is not None:
        why = f"layer {layer}: attention has learned sinks"
    elif not getattr(module, "is_causal", True):
        why = f"layer {layer}: not causal self-attention"
    return LayerAttention(layer, "", "", float(s), w, cap, hasattr(module, "q_norm"), not why, why)

