"""The attention function the fused engine registers with transformers, and the edits it applies.

Transformers calls :func:`_focuslens_attention` in every layer (while a :class:`~focuslens.engine.fused.FusedModel`
context is active) with the post-RoPE query, key and value: it injects query vectors, runs the fused
SDPA output, recomputes the edited heads row block by row block with the specs' own maths (span edits:
split softmax, PASTA, sink redistribution; a spec's row edit: positional calibration; a score edit
before the softmax: temperature), overwrites ablated heads' outputs, and records the response rows of a
scoring pass — all with :mod:`focuslens.core.attention`'s scale, masks and row softmax.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..core.attention import LayerAttention, module_attention, row_softmax, soft_cap, visible_keys
from ..core.prompts import Span
from ..intervene.edits import SpanLayout
from ..intervene.vector_specs import refuse_non_finite_edit, refuse_non_finite_output

#: Name under which the focuslens attention function is registered while a context is active.
ATTN_IMPL = "focuslens_sdpa"

_REG_LOCK = threading.Lock()
_REG_COUNT = 0
# attention module -> (weak ref to its FusedModel, layer index)
_OWNERS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[Any, int]]" = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------------------------------
# Registration of the attention function (refcounted, removed when the last context exits)
# --------------------------------------------------------------------------------------------------


def _register() -> None:
    global _REG_COUNT
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    with _REG_LOCK:
        if _REG_COUNT == 0:
            AttentionInterface.register(ATTN_IMPL, _focuslens_attention)
            # Without a mask function registered under the same name transformers would build no mask at
            # all for a custom implementation; SDPA's mask keeps padding and sliding windows exact.
            AttentionMaskInterface.register(ATTN_IMPL, sdpa_mask)
        _REG_COUNT += 1


def _unregister() -> None:
    global _REG_COUNT
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    with _REG_LOCK:
        _REG_COUNT -= 1
        if _REG_COUNT == 0:
            AttentionInterface._global_mapping.pop(ATTN_IMPL, None)
            AttentionMaskInterface._global_mapping.pop(ATTN_IMPL, None)


def is_registered() -> bool:
    """Whether the focuslens attention function is currently registered in transformers."""
    from transformers import AttentionInterface

    return ATTN_IMPL in AttentionInterface._global_mapping


# --------------------------------------------------------------------------------------------------
# Active edits and recorders
# --------------------------------------------------------------------------------------------------


@dataclass
class _SpanEdit:
    """A post-softmax pattern edit on some heads around spans: split softmax or PASTA.

    ``edit(pattern, key_mask, query_positions=, min_query=)`` is the spec's own maths
    (:func:`focuslens.intervene.edits.split_softmax_pattern` / ``pasta_pattern``), applied to the
    explicit fp32 rows of ``heads_by_layer``; ``layout`` says where the spans are (one union for every
    row, or each row's own spans shifted by its left padding) with the key-mask rule of the eager hook
    (:class:`focuslens.intervene.edits.SpanLayout`).
    """

    heads_by_layer: dict[int, list[int]]
    edit: Callable[..., Tensor]
    layout: SpanLayout

    def key_mask(self, n_keys: int, batch: int, device: torch.device) -> tuple[Tensor, int | Tensor]:
        """``(key mask [k] or [b, k], min_query int or [b])`` for keys at absolute positions ``0..n_keys-1``."""
        rows = self.layout.rows
        if rows is not None and batch != len(rows):
            raise ValueError(
                f"the span edit was attached for a batch of {len(rows)} rows but the forward pass has "
                f"{batch}: attach it with the prompts of this batch."
            )
        return self.layout.key_mask(0, n_keys, device)

    def apply(self, pattern: Float[Tensor, "b n q k"], query_pos: Int[Tensor, " q"], layer: int) -> Tensor:
        mask, min_query = self.key_mask(pattern.shape[-1], pattern.shape[0], pattern.device)
        return self.edit(pattern, mask, query_positions=query_pos.to(pattern.device), min_query=min_query)


@dataclass
class _RowEdit:
    """A post-softmax edit of some heads with the spec's own rule (:meth:`FusedModel.pattern_edit`):
    ``apply(pattern [b, n, r, k], query_pos [r], layer)`` on the layer's heads of ``heads_by_layer`` (in
    that order), keys at absolute positions ``0..k-1``."""

    heads_by_layer: dict[int, list[int]]
    apply: Callable[[Tensor, Tensor, int], Tensor]


@dataclass
class _ScoreEdit:
    """A pre-softmax edit of some heads' scores (:meth:`FusedModel.score_edit`): ``apply(scores [b, n, r, k],
    visible, layer)`` with the scores scaled (and soft-capped) as ``hook_attn_scores`` holds them and ``visible``
    (bool, broadcastable) the keys each row sees (causal, window, padding)."""

    heads_by_layer: dict[int, list[int]]
    apply: Callable[[Tensor, Tensor, int], Tensor]


@dataclass
class _Injection:
    # layer -> (head indices [n], vectors [n, d] or [b, n, d] (one per batch row), fp32 on CPU; moved lazily)
    by_layer: dict[int, tuple[list[int], Tensor]]
    alpha: float


@dataclass
class _Ablation:
    # layer -> (head indices [n], fill [n, d] (mean ablation) or None (zero)): the heads' output before o_proj
    by_layer: dict[int, tuple[list[int], Tensor | None]]


@dataclass
class _Recorder:
    rows: Span  # absolute query positions whose patterns are reduced
    columns: Tensor  # [n_layers, n_heads, N] fp32: Σ over response rows of each key column's attention
    seen: set  # layers visited (sanity check: every layer must report once)
    buffers: dict = field(default_factory=dict)  # device -> flat fp32 workspace, reused by every layer

    def workspace(self, device: torch.device, numel: int) -> Tensor:
        buf = self.buffers.get(device)
        if buf is None or buf.numel() < numel:
            buf = self.buffers[device] = torch.empty(numel, dtype=torch.float32, device=device)
        return buf


def _edit_rows(
    pattern: Float[Tensor, "b h q k"], edit: "_SpanEdit | _RowEdit", query_pos: Int[Tensor, " q"], layer: int
) -> Float[Tensor, "b h q k"]:
    """Apply a span edit (or a spec's own row edit) to explicit rows at absolute positions ``query_pos``.

    The key mask and ``min_query`` guard are those of :func:`focuslens.intervene.edits.attach_span_edit`
    (rows before the span, with no mass on it or none outside it, unchanged), and the maths is the
    spec's own edit function, so both engines make exactly the same edit.
    """
    return edit.apply(pattern, query_pos, layer)


def _score_editor(score_edits: Sequence[_ScoreEdit], layer: int,
                  order: Sequence[int]) -> Callable[[Tensor, Tensor], Tensor] | None:
    """The score edits of ``layer`` as one function of the explicit scores of heads ``order`` (None: none)."""
    active = [(e, e.heads_by_layer[layer]) for e in score_edits if layer in e.heads_by_layer]
    if not active:
        return None
    pos_of = {h: i for i, h in enumerate(order)}

    def run(scores: Tensor, vis: Tensor) -> Tensor:
        for e, hs in active:
            idx = torch.tensor([pos_of[h] for h in hs], device=scores.device)
            scores = scores.index_copy(1, idx, e.apply(scores.index_select(1, idx), vis, layer))
        return scores

    return run


def _visible(
    la: LayerAttention, query_pos: Int[Tensor, " r"], n_keys: int, mask: Tensor | None, row_idx: Tensor,
    device: torch.device,
) -> Tensor:
    """:func:`focuslens.core.attention.visible_keys` (causal + the layer's window) and transformers' mask.

    ``mask`` (bool, True = attend, or additive float with ``finfo.min`` on blocked entries) carries
    padding; rows are selected with ``row_idx`` (indices into the query block)."""
    vis = visible_keys(query_pos.to(device), n_keys, sliding_window=la.sliding_window)  # [r, k]
    if mask is not None:
        m = mask[..., row_idx.to(mask.device), :] if mask.shape[-2] != 1 else mask
        m = m[..., :n_keys].to(device)
        if m.dtype != torch.bool:
            m = m > torch.finfo(m.dtype).min / 2
        vis = vis & m
    return vis


def _explicit_rows(
    query: Float[Tensor, "b h r d"],
    key: Float[Tensor, "b g k d"],
    q_heads: Sequence[int] | None,
    group: int,
    row_pos: Int[Tensor, " r"],
    mask: Tensor | None,
    la: LayerAttention | float,
    q_offset: int,
    workspace: Tensor | None = None,
    score_edit: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Float[Tensor, "b h r k"]:
    """Post-softmax attention rows (fp32) of the given query heads (all when ``q_heads`` is None).

    The maths is :mod:`focuslens.core.attention`'s: ``la.scale``, soft-cap, causal + sliding-window
    visibility of absolute query positions ``q_offset + row_pos`` (and the given mask's padding), and
    :func:`~focuslens.core.attention.row_softmax`. ``row_pos`` holds the rows' indices into the *query*
    block (``q_offset`` = cached keys before this block). A float ``la`` is a plain causal layer with
    that scale. With ``workspace`` (a flat fp32 buffer of at least ``b·h·r·k`` elements, all heads
    only) the rows are computed inside it with no new large allocation: per-layer temporaries of a few
    MB would otherwise fragment the CPU heap (glibc) and raise the process's peak RSS well above the
    live memory. ``score_edit(scores, visible)`` (:func:`_score_editor`) edits the scaled scores before the
    softmax, where the bridge's ``hook_attn_scores`` hooks do.
    """
    if not isinstance(la, LayerAttention):
        la = LayerAttention(-1, "", "", float(la))
    b, _, r, d = query.shape
    kv = key.shape[2]
    qf = query.float()
    kf = key.float()
    if q_heads is None:
        g = kf.shape[1]
        # [b, G, group·r, d] @ [b, G, d, k]: no expanded keys under GQA (query head h uses KV h // group)
        a, bt = qf.reshape(b, g, group * r, d), kf.transpose(-1, -2)
        if workspace is not None:
            scores = torch.matmul(a, bt, out=workspace[: b * g * group * r * kv].view(b, g, group * r, kv))
        else:
            scores = a @ bt
        scores = scores.view(b, g * group, r, kv)
    else:
        kv_idx = torch.tensor([h // group for h in q_heads], device=key.device)
        scores = qf @ kf.index_select(1, kv_idx).transpose(-1, -2)  # [b, n, r, k]
    # in place from here on: the row block is the largest tensor this backend adds
    scores = soft_cap(scores.mul_(la.scale), la.softcap, inplace=True)
    vis = _visible(la, row_pos + q_offset, kv, mask, row_pos, scores.device)
    if score_edit is not None:
        scores = score_edit(scores, vis)
    return row_softmax(scores, vis, inplace=True)


def _inject(query: Float[Tensor, "b h q d"], injections: Sequence[_Injection], layer: int) -> Float[Tensor, "b h q d"]:
    """``alpha · u`` added to the selected heads' post-RoPE queries (α·u in float64, rounded once in the
    query's dtype: the arithmetic of the eager ``hook_rot_q`` hook); a new tensor when anything is added."""
    q_len = query.shape[2]
    for inj in injections:
        entry = inj.by_layer.get(layer)
        if entry is None or inj.alpha == 0.0:
            continue
        heads, vecs = entry
        idx = torch.tensor(heads, device=query.device)
        add = (inj.alpha * vecs.to(device=query.device, dtype=torch.float64)).to(query.dtype)  # [n, d] / [b, n, d]
        if add.dim() == 3:
            if add.shape[0] != query.shape[0]:
                raise ValueError(
                    f"inject_vectors was given vectors for a batch of {add.shape[0]} rows but the forward pass "
                    f"has {query.shape[0]}: attach it with the prompts of this batch."
                )
            add = add[:, :, None, :].expand(-1, -1, q_len, -1)
        else:
            add = add[None, :, None, :].expand(query.shape[0], -1, q_len, -1)
        before = query
        query = query.clone()
        query.index_add_(1, idx, add)
        edited = query.index_select(1, idx)  # [b, n, q, d]
        if not bool(torch.isfinite(edited).all()):  # q + α·u overflows: the bridge's hook_rot_q refusal
            refuse_non_finite_edit(before.index_select(1, idx).transpose(1, 2), edited.transpose(1, 2), add,
                                   layer=layer, heads=heads, alpha=inj.alpha)
    return query


def _check_outputs(out: Float[Tensor, "b q h d"], injections: Sequence[_Injection], layer: int) -> None:
    """The injected heads' attention outputs must be finite (the bridge's ``hook_z`` check): a finite query
    of 3e37 still overflows ``q·k`` and would give NaN logits without an error."""
    for inj in injections:
        entry = inj.by_layer.get(layer)
        if entry is None or inj.alpha == 0.0:
            continue
        heads, vecs = entry
        if not bool(torch.isfinite(out.index_select(2, torch.tensor(heads, device=out.device))).all()):
            refuse_non_finite_output(out, layer=layer, heads=heads, alpha=inj.alpha, big_u=float(vecs.abs().max()))


def _ablate(out: Float[Tensor, "b q h d"], ablations: Sequence[_Ablation], layer: int) -> Float[Tensor, "b q h d"]:
    """The ablated heads' output slices (``hook_z``) set to 0 or their mean at every position."""
    for abl in ablations:
        entry = abl.by_layer.get(layer)
        if entry is None:
            continue
        heads, fill = entry
        out = out.clone()
        idx = torch.tensor(heads, device=out.device)
        out[:, :, idx] = 0 if fill is None else fill.to(out.device, out.dtype)
    return out


def _focuslens_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """The registered attention function: SDPA plus focuslens edits and response-row reductions.

    Shapes (transformers' attention-function contract): ``query [b, H, q, d]`` post-RoPE,
    ``key``/``value`` ``[b, G, k, d]`` (after the KV-cache update), returns ``([b, q, H, d], None)``.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    owner = _OWNERS.get(module)
    fm = owner[0]() if owner is not None else None
    if fm is None or not fm._active_depth:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    layer = owner[1]
    la = module_attention(module, layer=layer, head_dim=query.shape[-1], scaling=scaling,
                          sliding_window=kwargs.get("sliding_window"), softcap=kwargs.get("softcap"))
    n_heads = query.shape[1]
    group = n_heads // key.shape[1]
    q_len, kv_len = query.shape[2], key.shape[2]
    # absolute (left-padded) position of query row 0: keys are positions 0..kv_len-1 (the engine refuses
    # sliding-window caches, whose keys are only the last window)
    q_offset = kv_len - q_len

    # 1. query vectors, post-RoPE, every position
    query = _inject(query, fm._injections, layer)

    # 2. the fused output for all heads
    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    edits = [(e, e.heads_by_layer[layer]) for e in fm._span_edits if layer in e.heads_by_layer]
    scored = {h for e in fm._score_edits for h in e.heads_by_layer.get(layer, ())}  # heads with edited scores
    rec = fm._recorder
    if (edits or scored or rec is not None) and not la.exact:
        raise ValueError(f"The fused backend recomputes attention rows explicitly, which is not exact here ({la.why}).")

    # 3. edited heads (split softmax, PASTA, a spec's row or score edit): explicit rows, overwriting their
    # output slices
    if edits or scored:
        heads = sorted({h for _, hs in edits for h in hs} | scored)
        pos_of = {h: i for i, h in enumerate(heads)}
        score_edit = _score_editor(fm._score_edits, layer, heads)
        kv_idx = torch.tensor([h // group for h in heads], device=value.device)
        v_sel = value.float().index_select(1, kv_idx)  # [b, n, k, d]
        q_sel = query.index_select(1, torch.tensor(heads, device=query.device))
        out = out.clone()
        for start in range(0, q_len, fm.row_block):
            stop = min(q_len, start + fm.row_block)
            rows = torch.arange(start, stop, device=query.device)
            # causal: the block's rows see no key after its last row, so those columns are not computed
            # (their attention is exactly 0); keys are absolute positions 0..n_keys-1 either way
            n_keys = kv_len if la.sliding_window is not None else q_offset + stop
            mask_k = attention_mask[..., :n_keys] if attention_mask is not None else None
            pat = _explicit_rows(q_sel[:, :, start:stop], key[:, :, :n_keys], heads, group, rows, mask_k, la,
                                 q_offset, score_edit=score_edit)
            pat = _apply_edits(pat, edits, pos_of, rows + q_offset, layer)
            z = (pat.to(v_sel.device) @ v_sel[:, :, :n_keys]).transpose(1, 2)  # [b, r, n, d]
            out[:, start:stop, heads, :] = z.to(out.dtype).to(out.device)

    # 3a. the injected heads' outputs (hook_z) are finite, or the pass stops with the bridge's error
    _check_outputs(out, fm._injections, layer)

    # 3b. ablated heads: their output (hook_z) set to 0 or a mean, at every position
    out = _ablate(out, fm._ablations, layer)

    # 4. response-row reductions for scoring
    if rec is not None:
        lo = max(rec.rows.start - q_offset, 0)
        hi = min(rec.rows.end - q_offset, q_len)
        if hi > lo:
            rows = torch.arange(lo, hi, device=query.device)
            work = rec.workspace(query.device, query.shape[0] * n_heads * (hi - lo) * kv_len)
            pat = _explicit_rows(query[:, :, lo:hi], key, None, group, rows, attention_mask, la, q_offset, work,
                                 score_edit=_score_editor(fm._score_edits, layer, range(n_heads)))  # [b, H, r, k]
            if edits:
                idx = torch.tensor(heads, device=pat.device)
                sub = _apply_edits(pat.index_select(1, idx), edits, pos_of, rows + q_offset, layer)
                pat.index_copy_(1, idx, sub)
            row_sums = pat.sum(dim=(0, 2))  # [H, k]: Σ over response rows (and the batch of 1)
            rec.columns[layer, :, :kv_len] += row_sums.to(device=rec.columns.device, dtype=torch.float32)
            rec.seen.add(layer)
    return out, None


def _chunked_forward(forward: Any, chunk: int) -> Any:
    """``forward`` applied to ``[..., chunk, d]`` slices of a ``[..., N, d]`` input, written into one output."""

    def run(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if args or kwargs or not isinstance(x, Tensor) or x.dim() < 2 or x.shape[-2] <= chunk:
            return forward(x, *args, **kwargs)
        n = x.shape[-2]
        first = forward(x[..., :chunk, :])
        out = first.new_empty(*x.shape[:-2], n, first.shape[-1])
        out[..., :chunk, :] = first
        del first
        for a in range(chunk, n, chunk):
            out[..., a:a + chunk, :] = forward(x[..., a:a + chunk, :])
        return out

    return run


def _apply_edits(pat: Tensor, edits: list, pos_of: dict[int, int], query_pos: Tensor, layer: int) -> Tensor:
    """Apply span and row edits (split softmax, PASTA, ...) in order; ``pat`` is ``[b, n, r, k]`` over the heads in
    ``pos_of``, rows at absolute positions ``query_pos`` of ``layer``."""
    for edit, hs in edits:
        order = [pos_of[h] for h in hs]
        if order == list(range(pat.shape[1])):  # the edit covers every head here: no gather / scatter copies
            pat = _edit_rows(pat, edit, query_pos, layer)
            continue
        idx = torch.tensor(order, device=pat.device)
        sub = _edit_rows(pat.index_select(1, idx), edit, query_pos, layer)
        pat = pat.index_copy(1, idx, sub)
    return pat
