"""Training focus directions: the batched and per-layer attention objective, and the live objectives."""

from __future__ import annotations

import math
import os
import random
import time
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from torch import Tensor

from ..attention import attention_scale, query_site
from ..models import HookedModel, check_heads, model_info
from .artefact import FocusDirections
from .data import DirectionExample
from .objectives import (QKCache, _live_forward, _mass_from_batch, _pad_batch, _project,
                         attention_mass, cache_qk, heldout_attention)

__all__ = ["train_focus_directions", "Objective", "Method"]

Objective = Literal["attention", "likelihood", "both"]
Method = Literal["batched", "per_layer"]


def _resolve_max_norm(max_norm, cache: QKCache | None, S: int) -> Tensor | None:
    if max_norm is None:
        return None
    if max_norm == "query":
        if cache is None:
            raise ValueError("max_norm='query' needs cached queries; give a number instead.")
        return torch.stack([q.norm(dim=-1).mean(-1) for q in cache.queries]).mean(0)  # [S]
    return torch.full((S,), float(max_norm))


def train_focus_directions(
    model: HookedModel,
    examples: Sequence[DirectionExample],
    *,
    heads: Sequence[Sequence[int]],
    objective: Objective = "attention",
    method: Method = "batched",
    val_examples: Sequence[DirectionExample] | None = None,
    alpha: float = 1.0,
    lr: float | None = None,
    steps: int = 300,
    epochs: int | None = None,
    init_std: float = 0.01,
    max_norm: float | Literal["query"] | None = "query",
    weight_decay: float | None = None,
    patience: int | None = None,
    eval_every: int = 10,
    live_eval_every: int | None = None,
    attention_weight: float = 1.0,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = True,
    caches: tuple[QKCache, QKCache | None] | None = None,
) -> FocusDirections:
    """Learn one query vector per head; return :class:`FocusDirections` (heads in the order given).

    Args:
        heads: ``(layer, head)`` pairs, e.g. the top-k contextual heads (rank order is kept, so
            ``.top(k)`` of the result is the top-k subset) or all heads of chosen layers.
        objective: ``"attention"`` (paper; cached q/k), ``"likelihood"`` (live model, response
            log-likelihood) or ``"both"`` (likelihood + ``attention_weight`` × live attention mass).
        method: attention objective only. ``"batched"``: all heads jointly, full-batch Adam for
            ``steps`` steps (default lr 0.05). ``"per_layer"``: the authors' loop, one layer at a time,
            batch 1, AdamW (lr 1e-3, weight decay 0.01) for ``epochs`` (default 10) — the reference.
        val_examples: held-out examples for early stopping (best validation objective is kept) and
            for the before/after report in ``.training``.
        alpha: the α used in training (the paper trains with α = 1).
        lr: learning rate (defaults: batched 0.05; per_layer 1e-3; likelihood/both 1e-2).
        steps: full-batch steps (batched attention). ``epochs``: passes over the data for per_layer
            (default 10) and the live objectives (default 5).
        init_std: initialisation N(0, init_std²) (paper: 0.01).
        max_norm: norm limit per head after each step: a number, ``"query"`` (the mean norm of that
            head's cached response-row queries, i.e. α=1 never outweighs the query itself; needs the
            attention cache, so for live objectives it is computed from one cache pass) or None.
        patience: early stopping after this many evaluations without improvement (None: never).
        eval_every: batched attention objective: validate every this many steps.
        live_eval_every: live objectives: also validate every this many training examples (``None``:
            once per epoch only). With one epoch over a few hundred examples this is what gives
            early stopping and the best-on-validation vectors.
        checkpoint_dir: live objectives only: the state is written there after every epoch and a
            rerun resumes from it.
        caches: precomputed ``(train_cache, val_cache)`` from :func:`cache_qk` (attention objective).
    """
    if objective not in ("attention", "likelihood", "both"):
        raise ValueError(f"objective must be 'attention', 'likelihood' or 'both'; got {objective!r}.")
    if method not in ("batched", "per_layer"):
        raise ValueError(f"method must be 'batched' or 'per_layer'; got {method!r}.")
    heads = check_heads(model, heads)
    if not examples:
        raise ValueError("No training examples.")
    info = model_info(model)
    torch.manual_seed(seed)
    t0 = time.time()
    if caches is None and (objective == "attention" or max_norm == "query"):
        tr = cache_qk(model, examples, heads, progress=progress)
        va = cache_qk(model, val_examples, heads, progress=progress) if val_examples else None
    elif caches is not None:
        tr, va = caches
        if tr.heads != list(heads):
            raise ValueError("The given caches were built for other heads.")
    else:
        tr = va = None
    limit = _resolve_max_norm(max_norm, tr, len(heads))
    g = torch.Generator().manual_seed(seed)
    u0 = torch.randn(len(heads), info.d_head, generator=g) * init_std
    summary: dict[str, Any] = {
        "objective": objective, "method": method if objective == "attention" else "live", "alpha": alpha,
        "n_train": len(examples), "n_val": len(val_examples or []), "seed": seed, "init_std": init_std,
        "max_norm": max_norm if not isinstance(max_norm, Tensor) else "tensor",
        "response_tokens_mean": sum(len(e.prompt.response) for e in examples) / len(examples),
        "prompt_tokens_mean": sum(len(e.prompt) for e in examples) / len(examples),
    }
    if objective == "attention":
        if method == "batched":
            u, hist = _train_batched(tr, va, u0, lr=lr or 0.05, steps=steps, alpha=alpha, limit=limit,
                                     patience=patience, eval_every=eval_every, progress=progress,
                                     weight_decay=weight_decay or 0.0)
            summary.update(lr=lr or 0.05, steps=steps)
        else:
            u, hist = _train_per_layer(tr, u0, lr=lr or 1e-3, epochs=epochs or 10, alpha=alpha, limit=limit,
                                       seed=seed, progress=progress,
                                       weight_decay=0.01 if weight_decay is None else weight_decay)
            summary.update(lr=lr or 1e-3, epochs=epochs or 10)
    else:
        u, hist = _train_live(model, examples, val_examples, heads, u0, objective=objective, alpha=alpha,
                              lr=lr or 1e-2, epochs=epochs or 5, limit=limit, patience=patience,
                              attention_weight=attention_weight, seed=seed, progress=progress,
                              checkpoint_dir=checkpoint_dir, weight_decay=weight_decay or 0.0,
                              eval_every=live_eval_every)
        summary.update(lr=lr or 1e-2, epochs=epochs or 5, attention_weight=attention_weight)
    summary["train_seconds"] = round(time.time() - t0, 2)
    summary["history"] = hist
    if va is not None:
        before = heldout_attention(va, None)
        after = heldout_attention(va, u, alpha=alpha)
        summary["heldout_relevant_attention_before"] = round(float(before.mean()), 5)
        summary["heldout_relevant_attention_after"] = round(float(after.mean()), 5)
        summary["heldout_relevant_attention_per_head_after"] = [round(float(x), 4) for x in after]
    return FocusDirections(heads=list(heads), vectors=u.detach().clone(), fingerprint=info.fingerprint(),
                           model_name=info.name, site=query_site(model), alpha=alpha, objective=objective,
                           training=summary)


def _train_batched(tr: QKCache, va: QKCache | None, u0: Tensor, *, lr, steps, alpha, limit, patience,
                   eval_every, progress, weight_decay, chunk: int = 64):
    u = u0.clone().requires_grad_(True)
    opt = torch.optim.AdamW([u], lr=lr, weight_decay=weight_decay)
    _project(u, limit)
    best_u, best_val, bad = u.detach().clone(), -math.inf, 0
    hist: list[dict] = []
    it = range(steps)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        it = bar = tqdm(it, desc="focus directions (attention, batched)", leave=False)
    n = len(tr)
    batches = [(len(idx), _pad_batch(tr, idx, "relevant"))
               for idx in (list(range(a, min(a + chunk, n))) for a in range(0, n, chunk))]
    vbatches = [] if va is None else [
        (len(idx), _pad_batch(va, idx, "relevant"))
        for idx in (list(range(a, min(a + chunk, len(va)))) for a in range(0, len(va), chunk))]
    for step in it:
        opt.zero_grad()
        tot = 0.0
        for nb, batch in batches:
            mass = _mass_from_batch(batch, alpha * u, tr.scale)  # [S]
            loss = -(mass.sum()) * nb / n  # heads independent: sum keeps each head's own gradient
            loss.backward()
            tot += float(loss.detach())
        opt.step()
        _project(u, limit)
        if (step + 1) % eval_every == 0 or step == steps - 1:
            rec = {"step": step + 1, "train_mass": -tot / len(tr.heads)}
            if va is not None:
                with torch.no_grad():
                    v = float(sum(_mass_from_batch(b_, alpha * u.detach(), va.scale) * nb_
                                  for nb_, b_ in vbatches).mean() / len(va))
                rec["val_mass"] = v
                if v > best_val + 1e-6:
                    best_val, best_u, bad = v, u.detach().clone(), 0
                else:
                    bad += 1
            hist.append(rec)
            if bar is not None:
                bar.set_postfix({k: round(x, 4) for k, x in rec.items() if k != "step"})
            if va is not None and patience is not None and bad >= patience:
                break
    return (best_u if va is not None else u.detach()), hist


def _train_per_layer(tr: QKCache, u0: Tensor, *, lr, epochs, alpha, limit, seed, progress, weight_decay):
    """The authors' procedure: per layer, batch 1 AdamW over examples, ``epochs`` passes."""
    u_all = u0.clone()
    layers = sorted({l for l, _ in tr.heads})
    hist = []
    rng = random.Random(seed)
    total = len(layers) * epochs * len(tr)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="focus directions (per layer, batch 1)", leave=False)
    for l in layers:
        sel = [i for i, (ll, _) in enumerate(tr.heads) if ll == l]
        u = u_all[sel].clone().requires_grad_(True)
        opt = torch.optim.AdamW([u], lr=lr, weight_decay=weight_decay)
        kv = tr.kv_index[sel]
        lim = limit[sel] if limit is not None else None
        for ep in range(epochs):
            order = list(range(len(tr)))
            rng.shuffle(order)
            for i in order:
                opt.zero_grad()
                mass = attention_mass(tr.logits0[i][sel], tr.keys[i][kv], tr.relevant[i], alpha * u,
                                      scale=tr.scale)
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


def _train_live(model, examples, val_examples, heads, u0, *, objective, alpha, lr, epochs, limit, patience,
                attention_weight, seed, progress, checkpoint_dir, weight_decay, eval_every=None):
    want_att = objective == "both"
    scale = attention_scale(model, heads[0][0])
    u = u0.clone().requires_grad_(True)
    opt = torch.optim.Adam([u], lr=lr, weight_decay=weight_decay)
    _project(u, limit)
    start_epoch, best_u, best_val, bad, hist = 0, u.detach().clone(), math.inf, 0, []
    ck = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ck is not None and (ck / "state.pt").exists():
        st = torch.load(ck / "state.pt", weights_only=False)
        if st["heads"] != [list(h) for h in heads] or st["objective"] != objective:
            raise ValueError(f"The checkpoint in {ck} is for other heads/objective; use another folder.")
        with torch.no_grad():
            u.copy_(st["u"])
        opt.load_state_dict(st["opt"])
        start_epoch, best_u, best_val, bad, hist = st["epoch"], st["best_u"], st["best_val"], st["bad"], st["hist"]

    def objective_value(ex):
        nll, mass = _live_forward(model, ex, heads, u, alpha, want_attention=want_att, scale=scale)
        loss = nll if mass is None else nll - attention_weight * mass.mean()
        return loss, nll

    def validate():
        if not val_examples:
            return None
        with torch.no_grad():
            return sum(float(objective_value(ex)[0]) for ex in val_examples) / len(val_examples)

    if start_epoch == 0 and val_examples:
        v0 = validate()
        hist.append({"epoch": 0, "val_loss": v0})
        best_val = v0
    for ep in range(start_epoch, epochs):
        if patience is not None and bad >= patience:
            break
        order = list(range(len(examples)))
        random.Random(seed + ep).shuffle(order)
        it = order
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(order, desc=f"focus directions ({objective}) epoch {ep + 1}/{epochs}", leave=False)
        tot = 0.0
        stopped = False
        for step, i in enumerate(it, start=1):
            opt.zero_grad()
            loss, _ = objective_value(examples[i])
            loss.backward()
            opt.step()
            _project(u, limit)
            tot += float(loss.detach())
            if eval_every and val_examples and step % eval_every == 0 and step < len(order):
                v = validate()
                hist.append({"epoch": ep + step / len(order), "val_loss": v})
                if v < best_val - 1e-6:
                    best_val, best_u, bad = v, u.detach().clone(), 0
                else:
                    bad += 1
                if patience is not None and bad >= patience:
                    stopped = True
                    break
        rec = {"epoch": ep + 1, "train_loss": tot / max(step, 1)}
        if stopped:
            rec["early_stop"] = True
        v = validate()
        if v is not None:
            rec["val_loss"] = v
            if v < best_val - 1e-6:
                best_val, best_u, bad = v, u.detach().clone(), 0
            else:
                bad += 1
        else:
            best_u = u.detach().clone()
        hist.append(rec)
        if ck is not None:
            ck.mkdir(parents=True, exist_ok=True)
            tmp = ck / "state.pt.tmp"
            torch.save({"u": u.detach(), "opt": opt.state_dict(), "epoch": ep + 1, "best_u": best_u,
                        "best_val": best_val, "bad": bad, "hist": hist,
                        "heads": [list(h) for h in heads], "objective": objective}, tmp)
            os.replace(tmp, ck / "state.pt")
    return best_u, hist
