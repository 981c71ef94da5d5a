"""Batched activation patching: many patched runs in one forward pass, exactly equal to one-by-one.

Why this module exists
----------------------
:func:`focuslens.heads.patching.patch_heads` asks one question per (layer, head[, position]): "what does the
metric become if this one activation is copied from the clean run?". Asked one forward pass at a
time, a 30-layer model with 9 heads and a few hundred tokens needs hundreds of full passes. Three
facts make most of that work redundant, and all three are exploited here without changing any number
(beyond float32 rounding, ~1e-7 on the tiny test models):

1. **One batch row per patched run.** The corrupted prompt is repeated ``n`` times along the batch;
   row ``j`` gets job ``j``'s head (and position) copied from the clean cache by one masked
   ``torch.where`` at the site hook. Rows never interact (no padding, no cross-row attention), so row
   ``j`` computes exactly the run of job ``j``. Batching amortises the per-forward overhead (hook
   dispatch, kernel launches) and gives the matrix multiplies more rows.
2. **The prefix below the patched layer is shared.** A patch at layer ``l`` cannot change anything
   before it, so every run of a chunk (all jobs of one layer) is identical up to
   ``blocks.{l}.hook_resid_pre``. The corrupted prompt enters with batch 1, and a hook at that point
   expands the residual stream to the ``n`` rows: layers ``0..l-1`` run once per chunk instead of
   once per job. (Only for a single corrupted prompt: with ``b > 1`` prompts the model's attention
   mask is built for ``b`` rows, so the input itself is repeated instead.)
3. **The positions before the first difference are shared.** Clean and corrupted prompts agree up
   to the corrupted span, so every patched activation equals the corrupted one before the first
   position ``t0`` where they differ (checked on the activations, not assumed), and by causality
   nothing before ``t0`` can change in any layer. The corrupted prefix ``0..t0-1`` runs once into a
   Hugging Face KV cache (the TransformerLens 4 bridge's ``past_key_values``), its cache is repeated
   to the chunk's rows for layers ``l..`` (layers below stay batch 1), and each chunk runs only
   positions ``t0..``; the metric receives the corrupted run's prefix logits concatenated in front,
   i.e. the full ``[b, pos, d_vocab]``. Per-position jobs before ``t0`` (and all jobs of a layer
   where clean equals corrupted) copy equal values: their metric is the corrupted one, no forward.
   Sliding-window caches (Gemma-3) hold only the last keys; the pattern site's key axis is aligned
   to them.

The metric keeps the contract of :func:`~focuslens.heads.patching.patch_heads`: it is called once per
patched run, on that run's own logits ``[b, pos, d_vocab]`` (``b`` = prompts in the corrupted batch),
and returns a scalar. So any metric that works one-by-one gives the same numbers batched.

Memory: a chunk holds ``n·b`` rows of logits (``pos × d_vocab`` floats each, the largest tensor) and
one layer's activations. :func:`default_batch_size` sizes chunks to a budget (1 GiB by default).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..core.hooks import attach_hooks
from ..core.models import HookedModel, hook_name, model_info

__all__ = ["default_batch_size", "run_patch_jobs"]

_GIB = 1 << 30


def default_batch_size(
    model: HookedModel, n_pos: int, *, n_prompts: int = 1, budget_bytes: int = _GIB, max_rows: int = 64
) -> int:
    """Patched runs per forward pass that fit ``budget_bytes`` (at least 1, at most ``max_rows``).

    Per run the estimate is ``4 bytes · b · pos · (d_vocab + 12·d_model + 2·n_heads·pos)``: the
    float32 logits, a layer's residual/MLP temporaries, and an attention pattern plus its scores.
    """
    info = model_info(model)
    d_vocab = int(getattr(model.cfg, "d_vocab", 0) or 0)
    per_row = 4 * n_prompts * n_pos * (d_vocab + 12 * info.d_model + 2 * info.n_heads * n_pos)
    return int(max(1, min(max_rows, budget_bytes // max(per_row, 1))))


def _masked_setter(site: str, clean: Tensor, mask: Tensor, n: int, t0: int = 0):
    """Hook: rows of job ``j`` take ``clean`` where ``mask[j]`` is True, the corrupted value elsewhere.

    ``clean`` is the clean activation ``[b, pos, slot, d]`` (z/q/k/v) or ``[b, head, q_pos, k_pos]``
    (pattern); the hooked tensor is ``[n·b, ...]`` with job-major rows (row ``j·b + i`` = prompt ``i``
    of job ``j``); ``mask`` is ``[n, 1, ...]`` broadcastable to ``[n, b, ...]``. With a shared
    position prefix the hook sees only positions ``t0..`` (query rows ``t0..`` for the pattern, whose
    key axis is what the KV cache holds: the last ``k_pos`` keys).
    """
    b = clean.shape[0]
    if site == "pattern":
        clean, mask = clean[:, :, t0:], mask[:, :, :, t0:]
    else:
        clean, mask = clean[:, t0:], mask[:, :, t0:]

    def hook(x: Tensor, hook=None):
        if x.shape[0] != n * b:
            raise RuntimeError(
                f"batched patching expected {n * b} rows at the {site} hook, got {x.shape[0]}: "
                "this model does not keep one batch row per patched run; use method='loop'."
            )
        src = clean[..., -x.shape[-1]:] if site == "pattern" else clean  # sliding-window caches hold fewer keys
        xs = x.reshape(n, b, *x.shape[1:])
        out = torch.where(mask.to(x.device), src.to(x.device, x.dtype)[None], xs)
        return out.reshape(x.shape)

    return hook


def _expander(n: int):
    """Hook at ``hook_resid_pre``: the shared batch-1 residual stream becomes ``n`` identical rows."""

    def hook(x: Float[Tensor, "1 pos d_model"], hook=None):
        return x.expand(n, *x.shape[1:]).contiguous()

    return hook


def _job_mask(site: str, jobs: Sequence[tuple[int, int | None, int]], shape: torch.Size) -> Tensor:
    """``[n, 1, ...]`` bool mask over one site activation of shape ``[b, ...]``: True where job ``j`` patches."""
    n = len(jobs)
    if site == "pattern":  # [b, head, q_pos, k_pos]: a head, optionally one query row
        mask = torch.zeros(n, 1, shape[1], shape[2], 1, dtype=torch.bool)
        for j, (_, p, h) in enumerate(jobs):
            if p is None:
                mask[j, 0, h] = True
            else:
                mask[j, 0, h, p] = True
    else:  # [b, pos, slot, d]: a head (KV head for k/v), optionally one position
        mask = torch.zeros(n, 1, shape[1], shape[2], 1, dtype=torch.bool)
        for j, (_, p, h) in enumerate(jobs):
            if p is None:
                mask[j, 0, :, h] = True
            else:
                mask[j, 0, p, h] = True
    return mask


def _kv_layers(cache) -> list | None:
    """The per-layer key/value holders of a Hugging Face cache (``.keys``/``.values``), or None."""
    layers = getattr(cache, "layers", None)
    if not layers or not all(hasattr(c, "keys") and isinstance(getattr(c, "keys", None), Tensor) for c in layers):
        return None
    return list(layers)


def _supports_kv(model: HookedModel) -> bool:
    """Whether ``model`` takes a Hugging Face KV cache (the TransformerLens 4 bridge does)."""
    import inspect

    try:
        return "past_key_values" in inspect.signature(model.forward).parameters and hasattr(model, "original_model")
    except (TypeError, ValueError):
        return False


def _first_difference(site: str, clean: Tensor, corrupt: Tensor) -> int:
    """First position (query row for the pattern) where the clean and corrupted activations differ."""
    diff = (clean != corrupt).any(dim=1).any(dim=-1) if site == "pattern" else (clean != corrupt).any(dim=-1).any(dim=-1)
    rows = diff.any(dim=0).nonzero()  # diff: [b, pos]
    return int(rows[0]) if len(rows) else clean.shape[2 if site == "pattern" else 1]


def run_patch_jobs(
    model: HookedModel,
    corrupted: Int[Tensor, "batch pos"],
    cache: dict[str, Tensor],
    metric: Callable[[Float[Tensor, "batch pos d_vocab"]], Tensor | float],
    *,
    site: str,
    hook: str,
    jobs: Sequence[tuple[int, int | None, int]],
    batch_size: int,
    progress: bool = False,
) -> list[float]:
    """The metric of each patched run ``(layer, pos or None, slot)``, computed ``batch_size`` runs at a time.

    Jobs are grouped by layer (one chunk never mixes layers, so the prefix below the layer is shared);
    the returned list follows the order of ``jobs``. With one corrupted prompt on a model that takes
    a KV cache, the positions before the first one where any patched activation differs from the
    corrupted one (``t0``) are computed once too: patching cannot change them (the copied values are
    equal there, and attention is causal), so each chunk runs only positions ``t0..`` on top of the
    corrupted prefix's KV cache, and the metric gets the corrupted prefix logits concatenated in
    front. Per-position jobs before ``t0`` copy equal values: their metric is the corrupted one.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive number of runs per forward pass, got {batch_size}.")
    b, n_pos = corrupted.shape
    share_prefix = b == 1
    layers = sorted({l for l, _, _ in jobs})
    clean_by_layer = _clean_by_layer(cache, hook, layers, b)
    values: list[float] = [float("nan")] * len(jobs)
    resid_names = set(model.hook_dict)
    t0, kv_prefix, prefix_logits = 0, None, None
    with torch.no_grad():
        if share_prefix and _supports_kv(model) and all(f"blocks.{l}.hook_resid_pre" in resid_names for l in layers):
            t0, kv_prefix, prefix_logits = _shared_prefix(
                model, corrupted, metric, site, hook, jobs, layers, clean_by_layer, values
            )
    todo = [i for i, v in enumerate(values) if math.isnan(v)]  # still to run
    by_layer: dict[int, list[int]] = {}
    for i in todo:
        by_layer.setdefault(jobs[i][0], []).append(i)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=f"patching {site} (batched)", unit="run")
    try:
        with torch.no_grad():
            for l in sorted(by_layer):
                idx = by_layer[l]
                for start in range(0, len(idx), batch_size):
                    chunk = idx[start : start + batch_size]
                    logits = _patched_chunk_logits(
                        model, corrupted, site, hook, l, clean_by_layer[l], [jobs[i] for i in chunk],
                        t0=t0, kv_prefix=kv_prefix, prefix_logits=prefix_logits,
                        share_prefix=share_prefix and f"blocks.{l}.hook_resid_pre" in resid_names,
                    )
                    for j, i in enumerate(chunk):
                        values[i] = float(metric(logits[j * b : (j + 1) * b]))
                    del logits
                    if bar is not None:
                        bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return values


def _clean_by_layer(cache: dict[str, Tensor], hook: str, layers: list[int], b: int) -> dict[int, Tensor]:
    """Each layer's clean activation, one prompt broadcast to the ``b`` corrupted prompts."""
    clean_by_layer: dict[int, Tensor] = {}
    for l in layers:
        name = hook_name(l, hook)
        clean = cache[name]
        if clean.shape[0] != b:
            if clean.shape[0] != 1:
                raise ValueError(f"The clean cache at {name} has {clean.shape[0]} prompts but the corrupted batch has {b}.")
            clean = clean.expand(b, *clean.shape[1:])
        clean_by_layer[l] = clean
    return clean_by_layer


def _shared_prefix(
    model: HookedModel, corrupted: Tensor, metric: Callable, site: str, hook: str,
    jobs: Sequence[tuple[int, int | None, int]], layers: list[int], clean_by_layer: dict[int, Tensor],
    values: list[float],
) -> tuple[int, object, Tensor | None]:
    """One corrupted run: fill ``values`` for the jobs that patch equal values (the corrupted metric)
    and return ``(t0, KV cache of positions < t0, their logits)`` (``(0, None, None)`` without a usable cache)."""
    n_pos = corrupted.shape[1]
    names = {hook_name(l, hook) for l in layers}
    logits_c, corrupt_cache = model.run_with_cache(corrupted, names_filter=lambda n: n in names)
    first = {l: _first_difference(site, clean_by_layer[l], corrupt_cache[hook_name(l, hook)]) for l in layers}
    del corrupt_cache
    base = float(metric(logits_c))
    for i, (l, _, _) in enumerate(jobs):
        if first[l] == n_pos:  # clean == corrupted at this layer: every patch there is the identity
            values[i] = base
    t0 = min([t for t in first.values() if t < n_pos] or [n_pos - 1])
    kv_prefix, prefix_logits = None, None
    if t0 > 0:
        prefix_logits, kv_prefix = model(corrupted[:, :t0], return_type="logits_and_cache")
        prefix_logits = logits_c[:, :t0]  # the full run's own values (equal up to rounding)
        if _kv_layers(kv_prefix) is None:
            t0, kv_prefix, prefix_logits = 0, None, None
    del logits_c
    for i, (_, p, _) in enumerate(jobs):
        if p is not None and p < t0:
            values[i] = base
    return t0, kv_prefix, prefix_logits


def _patched_chunk_logits(
    model: HookedModel, corrupted: Tensor, site: str, hook: str, l: int, clean: Tensor,
    chunk_jobs: list[tuple[int, int | None, int]], *, t0: int, kv_prefix, prefix_logits: Tensor | None,
    share_prefix: bool,
) -> Tensor:
    """Logits ``[n·b, pos, d_vocab]`` of ``n`` patched runs at layer ``l`` in one forward pass (run ``j``
    in rows ``j·b .. (j+1)·b``); with ``share_prefix`` a batch-1 prefix below layer ``l`` and before ``t0``."""
    import copy

    n = len(chunk_jobs)
    mask = _job_mask(site, chunk_jobs, clean.shape)
    hooks = [(hook_name(l, hook), _masked_setter(site, clean, mask, n, t0))]
    kw = {}
    if share_prefix:
        hooks.insert(0, (f"blocks.{l}.hook_resid_pre", _expander(n)))
        tokens = corrupted[:, t0:]
        if kv_prefix is not None:
            kv = copy.deepcopy(kv_prefix)
            for li, layer_kv in enumerate(_kv_layers(kv)):
                if li >= l:  # layers from l on see n rows; below, the shared batch-1 row
                    layer_kv.keys = layer_kv.keys.repeat(n, *([1] * (layer_kv.keys.dim() - 1)))
                    layer_kv.values = layer_kv.values.repeat(n, *([1] * (layer_kv.values.dim() - 1)))
            kw["past_key_values"] = kv
    else:
        tokens = corrupted.repeat(n, 1)
    with attach_hooks(model, hooks, label=f"batched patch {site} L{l} x{n}"):
        logits = model(tokens, **kw)  # [n·b, pos - t0, d_vocab]
    if prefix_logits is not None:
        logits = torch.cat([prefix_logits.expand(n, -1, -1), logits], dim=1)
    return logits
