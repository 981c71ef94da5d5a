"""Training focus directions: the batched and per-layer attention objective, and the live objectives.

Every setting lives in one frozen :class:`TrainConfig`; :func:`train_focus_directions` takes it (or
its field names as keywords, the historical form). The live objectives can checkpoint after every
epoch; a checkpoint is keyed by the *content* of what produced it (see :class:`_Checkpoint`) and is
stored without pickle: tensors in safetensors, everything else in JSON.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core.attention import attention_scale, query_site
from ..core.io import content_hash
from ..core.models import HookedModel, model_info
from ..core.checks import check_heads
from .artefact import FocusDirections
from .data import DirectionExample, _check_direction_examples
from .objectives import (
    QKCache,
    _live_forward,
    _mass_from_batch,
    _pad_batch,
    _project,
    attention_mass,
    cache_qk,
    heldout_attention,
)
from .checkpoint import _Checkpoint, _identity, _LiveState, _restore
from .config import TrainConfig

__all__ = ["train_focus_directions"]


# --------------------------------------------------------------------------------------------------
# The entry point


def _resolve_max_norm(max_norm, cache: QKCache | None, S: int) -> Tensor | None:
    if max_norm is None:
        return None
    if max_norm == "query":
        if cache is None:
            raise ValueError("max_norm='query' needs cached queries; give a number instead.")
        return torch.stack([q.norm(dim=-1).mean(-1) for q in cache.queries]).mean(0)  # [S]
    return torch.full((S,), float(max_norm))


def _make_config(config: TrainConfig | None, overrides: dict[str, Any]) -> TrainConfig:
    if config is not None and not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}.")
    names = TrainConfig.field_names()
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise TypeError(f"train_focus_directions() got unexpected keyword argument(s) {', '.join(unknown)}; "
                        f"the training settings are: {', '.join(names)} (plus heads, config, val_examples, "
                        f"checkpoint_dir, progress, caches).")
    return dataclasses.replace(config, **overrides) if config is not None else TrainConfig(**overrides)


def train_focus_directions(
    model: HookedModel,
    examples: Sequence[DirectionExample],
    *,
    heads: Sequence[Sequence[int]],
    config: TrainConfig | None = None,
    val_examples: Sequence[DirectionExample] | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    caches: tuple[QKCache, QKCache | None] | None = None,
    cache_batch_size: int = 8,
    _factorised: bool = True,
    **overrides: Any,
) -> FocusDirections:
    """Learn one query vector per head; return :class:`FocusDirections` (heads in the order given).

    Args:
        heads: ``(layer, head)`` pairs, e.g. the top-k contextual heads (rank order is kept, so
            ``.top(k)`` of the result is the top-k subset) or all heads of chosen layers.
        config: the training settings (:class:`TrainConfig`; default ``TrainConfig()``).
        **overrides: :class:`TrainConfig` field names overriding ``config`` (``objective=``,
            ``lr=``, ``seed=``, ...): the historical keyword form keeps working. Any other keyword
            is a TypeError.
        val_examples: held-out examples for early stopping (best validation objective is kept) and
            for the before/after report in ``.training``.
        checkpoint_dir: live objectives only: the state is written there after every epoch and a
            rerun resumes from it — only if everything that determines the result is equal (model,
            heads, resolved config except ``epochs``, training and validation data). Otherwise a
            ValueError says what differs. The attention objectives ignore it. A legacy pickle
            ``state.pt`` there is never loaded (a warning says so).
        caches: precomputed ``(train_cache, val_cache)`` from :func:`cache_qk`.
        cache_batch_size: examples per frozen forward pass when caching q/k (:func:`cache_qk`'s
            ``batch_size``; grouped by length, right-padded; 1: one unpadded pass per example). It
            changes the cached tensors only by float rounding (≤ 1e-5), so it is not part of the
            run's identity.
        _factorised: benchmark switch only (``benchmarks/bench_directions.py --compare``): False
            runs the batched optimiser's reference path (the full softmax of the big logit tensor
            every step) instead of the factorised one; same result to ~1e-6.

    ``.training`` of the result records what was trained: the resolved config (``config``) and its
    used fields at the top level, ``identity`` (the content hash of the run) and, when resumed,
    ``resumed_from_epoch``.
    """
    _check_direction_examples(examples)
    if val_examples is not None:
        _check_direction_examples(val_examples, "val_examples")
    cfg = _make_config(config, overrides).resolved()
    heads = check_heads(model, heads)
    if not examples:
        raise ValueError("No training examples: build them with "
                         "focuslens.directions.make_direction_examples(model, examples).")
    info = model_info(model)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    tr, va = _qk_caches(model, examples, val_examples, heads, cfg, caches,
                        progress=progress, cache_batch_size=cache_batch_size)
    t_cache = time.time() - t0
    limit = _resolve_max_norm(cfg.max_norm, tr, len(heads))
    g = torch.Generator().manual_seed(cfg.seed)
    u0 = torch.randn(len(heads), info.d_head, generator=g) * cfg.init_std
    ident = _identity(model, heads, cfg, examples, val_examples, limit)
    summary = _training_summary(cfg, ident, examples, val_examples)
    if cfg.objective == "attention":
        if cfg.method == "batched":
            u, hist = _train_batched(tr, va, u0, cfg, limit, progress=progress, factorised=_factorised)
        else:
            u, hist = _train_per_layer(tr, u0, cfg, limit, progress=progress)
    else:
        ck = _Checkpoint(Path(checkpoint_dir), ident) if checkpoint_dir is not None else None
        u, hist, resumed = _train_live(model, examples, val_examples, heads, u0, cfg, limit,
                                       checkpoint=ck, progress=progress)
        if resumed:
            summary["resumed_from_epoch"] = resumed
    summary["train_seconds"] = round(time.time() - t0, 2)
    summary["cache_seconds"] = round(t_cache, 2)  # the frozen forward passes (0 with caches=)
    summary["history"] = hist
    if va is not None:
        summary.update(_heldout_report(va, u, cfg.alpha))
    return FocusDirections(heads=list(heads), vectors=u.detach().clone(), fingerprint=info.fingerprint(),
                           model_name=info.name, site=query_site(model), alpha=cfg.alpha, objective=cfg.objective,
                           training=summary)


def _qk_caches(
    model: HookedModel, examples: Sequence[DirectionExample], val_examples: Sequence[DirectionExample] | None,
    heads: list, cfg: TrainConfig, caches: tuple[QKCache, QKCache | None] | None, *, progress: bool,
    cache_batch_size: int,
) -> tuple[QKCache | None, QKCache | None]:
    """``(train, validation)`` q/k caches: the given ones (checked to match the heads), built when the
    attention objective or ``max_norm="query"`` needs them, else ``(None, None)``."""
    if caches is None and (cfg.objective == "attention" or cfg.max_norm == "query"):
        tr = cache_qk(model, examples, heads, progress=progress, batch_size=cache_batch_size,
                      precision=cfg.cache_precision)
        va = (cache_qk(model, val_examples, heads, progress=progress, batch_size=cache_batch_size,
                       precision=cfg.cache_precision)
              if val_examples else None)
        return tr, va
    if caches is not None:
        tr, va = caches
        if tr.heads != list(heads):
            raise ValueError("The given caches were built for other heads.")
        return tr, va
    return None, None


def _training_summary(cfg: TrainConfig, ident: Any, examples: Sequence[DirectionExample],
                      val_examples: Sequence[DirectionExample] | None) -> dict[str, Any]:
    """The start of ``.training``: the config's used fields, the resolved config, the identity, the data sizes."""
    summary: dict[str, Any] = {k: v for k, v in cfg.to_dict().items() if v is not None}
    summary.update({
        "method": cfg.method if cfg.method is not None else "live",
        "max_norm": cfg.max_norm,
        "config": cfg.to_dict(), "identity": content_hash(ident),
        "n_train": len(examples), "n_val": len(val_examples or []),
        "response_tokens_mean": sum(len(e.prompt.response) for e in examples) / len(examples),
        "prompt_tokens_mean": sum(len(e.prompt) for e in examples) / len(examples),
    })
    return summary


def _heldout_report(va: QKCache, u: Tensor, alpha: float) -> dict[str, Any]:
    """Held-out attention mass on the relevant span before and after the learned directions."""
    before = heldout_attention(va, None)
    after = heldout_attention(va, u, alpha=alpha)
    return {
        "heldout_relevant_attention_before": round(float(before.mean()), 5),
        "heldout_relevant_attention_after": round(float(after.mean()), 5),
        "heldout_relevant_attention_per_head_after": [round(float(x), 4) for x in after],
    }


# --------------------------------------------------------------------------------------------------
# The attention objective (cached q/k)


def _chunks(n: int, chunk: int) -> list[list[int]]:
    return [list(range(a, min(a + chunk, n))) for a in range(0, n, chunk)]


def _train_batched(tr: QKCache, va: QKCache | None, u0: Tensor, cfg: TrainConfig, limit: Tensor | None, *,
                   progress: bool, chunk: int = 64, factorised: bool = True):
    u = u0.clone().requires_grad_(True)
    opt = torch.optim.AdamW([u], lr=cfg.lr, weight_decay=cfg.weight_decay)
    _project(u, limit)
    best_u, best_val, bad = u.detach().clone(), -math.inf, 0
    hist: list[dict] = []
    steps = cfg.steps
    it = range(steps)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        it = bar = tqdm(it, desc="focus directions (attention, batched)", leave=False)
    n = len(tr)
    batches = [(len(idx), _pad_batch(tr, idx, "relevant", factorised=factorised)) for idx in _chunks(n, chunk)]
    vbatches = [] if va is None else [(len(idx), _pad_batch(va, idx, "relevant", factorised=factorised))
                                      for idx in _chunks(len(va), chunk)]
    for step in it:
        opt.zero_grad()
        tot = 0.0
        for nb, batch in batches:
            mass = _mass_from_batch(batch, cfg.alpha * u, tr.scale)  # [S]
            loss = -(mass.sum()) * nb / n  # heads independent: sum keeps each head's own gradient
            loss.backward()
            tot += float(loss.detach())
        opt.step()
        _project(u, limit)
        if (step + 1) % cfg.eval_every == 0 or step == steps - 1:
            rec = {"step": step + 1, "train_mass": -tot / len(tr.heads)}
            if va is not None:
                with torch.no_grad():
                    v = float(sum(_mass_from_batch(b_, cfg.alpha * u.detach(), va.scale) * nb_
                                  for nb_, b_ in vbatches).mean() / len(va))
                rec["val_mass"] = v
                if v > best_val + 1e-6:
                    best_val, best_u, bad = v, u.detach().clone(), 0
                else:
                    bad += 1
            hist.append(rec)
            if bar is not None:
                bar.set_postfix({k: round(x, 4) for k, x in rec.items() if k != "step"})
            if va is not None and cfg.patience is not None and bad >= cfg.patience:
                break
    return (best_u if va is not None else u.detach()), hist


def _train_per_layer(tr: QKCache, u0: Tensor, cfg: TrainConfig, limit: Tensor | None, *, progress: bool):
    """The authors' procedure: per layer, batch 1 AdamW over examples, ``epochs`` passes."""
    u_all = u0.clone()
    layers = sorted({l for l, _ in tr.heads})
    hist = []
    rng = random.Random(cfg.seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(layers) * cfg.epochs * len(tr), desc="focus directions (per layer, batch 1)",
                   leave=False)
    for l in layers:
        sel = [i for i, (ll, _) in enumerate(tr.heads) if ll == l]
        u = u_all[sel].clone().requires_grad_(True)
        opt = torch.optim.AdamW([u], lr=cfg.lr, weight_decay=cfg.weight_decay)
        kv = tr.kv_index[sel]
        lim = limit[sel] if limit is not None else None
        for ep in range(cfg.epochs):
            order = list(range(len(tr)))
            rng.shuffle(order)
            for i in order:
                opt.zero_grad()
                mass = attention_mass(tr.logits0[i][sel], tr.keys[i][kv], tr.relevant[i], cfg.alpha * u,
                                      scale=tr.head_scale[sel] if tr.head_scale is not None else tr.scale,
                                      visible=tr.visible[i][sel] if tr.visible else None, softcap=tr.softcap)
                (-mass.sum()).backward()
                opt.step()
                _project(u, lim)
                if bar is not None:
                    bar.update(1)
            hist.append({"layer": l, "epoch": ep + 1})
        u_all[sel] = u.detach()
    if bar is not None:
        bar.close()
    return u_all, hist


def _train_live(model, examples, val_examples, heads, u0: Tensor, cfg: TrainConfig, limit: Tensor | None, *,
                checkpoint: _Checkpoint | None, progress: bool) -> tuple[Tensor, list[dict], int]:
    """Train through the live frozen model; return (best vectors, history, epoch resumed from or 0)."""
    want_att = cfg.objective == "both"
    scale = attention_scale(model, heads[0][0])
    u = u0.clone().requires_grad_(True)
    opt = torch.optim.Adam([u], lr=cfg.lr, weight_decay=cfg.weight_decay)
    _project(u, limit)
    st = _LiveState(u=u, opt=opt, best_u=u.detach().clone())
    resumed = _restore(st, checkpoint, cfg.epochs) if checkpoint is not None else 0

    def objective_value(ex):
        nll, mass = _live_forward(model, ex, heads, u, cfg.alpha, want_attention=want_att, scale=scale)
        loss = nll if mass is None else nll - cfg.attention_weight * mass.mean()
        return loss, nll

    def validate():
        if not val_examples:
            return None
        with torch.no_grad():
            return sum(float(objective_value(ex)[0]) for ex in val_examples) / len(val_examples)

    if st.epoch == 0 and val_examples:
        v0 = validate()
        st.hist.append({"epoch": 0, "val_loss": v0})
        st.best_val = v0
    for ep in range(st.epoch, cfg.epochs):
        if cfg.patience is not None and st.bad >= cfg.patience:
            break
        order = list(range(len(examples)))
        random.Random(cfg.seed + ep).shuffle(order)
        it = order
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(order, desc=f"focus directions ({cfg.objective}) epoch {ep + 1}/{cfg.epochs}", leave=False)
        tot, step, stopped = 0.0, 0, False
        for step, i in enumerate(it, start=1):
            opt.zero_grad()
            loss, _ = objective_value(examples[i])
            loss.backward()
            opt.step()
            _project(u, limit)
            tot += float(loss.detach())
            if cfg.live_eval_every and val_examples and step % cfg.live_eval_every == 0 and step < len(order):
                v = validate()
                st.hist.append({"epoch": ep + step / len(order), "val_loss": v})
                st.record_val(v)
                if cfg.patience is not None and st.bad >= cfg.patience:
                    stopped = True
                    break
        rec = {"epoch": ep + 1, "train_loss": tot / max(step, 1)}
        if stopped:
            rec["early_stop"] = True
        v = validate()
        if v is not None:
            rec["val_loss"] = v
            st.record_val(v)
        else:
            st.best_u = u.detach().clone()
        st.hist.append(rec)
        st.epoch = ep + 1
        if checkpoint is not None:
            checkpoint.save(u=u, best_u=st.best_u, opt=opt, epoch=st.epoch, best_val=st.best_val, bad=st.bad,
                            hist=st.hist)
    return st.best_u, st.hist, resumed
