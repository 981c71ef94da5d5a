"""Forward passes the rest of focuslens builds on: KV-cached continuation and partial (early-stopping) passes.

Both work on either TransformerLens API (the TL 4 bridge and a legacy ``HookedTransformer``), and both
are the one place their rule is written: generation and the margin probes continue a cache with
:func:`forward_with_cache`; everything that reads only some layers (caching q/k for focus directions,
the sink probe, scoring a layer subset) stops early with :func:`run_until`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .checks import check_token_ids
from .models import HookedModel, is_legacy

__all__ = ["forward_with_cache", "repeat_cache", "run_until"]


def _legacy_kv_cache_class():
    try:  # TransformerLens 3.x
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache as cls
    except ImportError:  # TransformerLens 2.x
        from transformer_lens.past_key_value_caching import HookedTransformerKeyValueCache as cls
    return cls


def forward_with_cache(
    model: HookedModel,
    tokens: torch.Tensor,
    cache: Any = None,
    *,
    attention_mask: torch.Tensor | None = None,
    logits_to_keep: int | None = None,
) -> tuple[torch.Tensor, Any]:
    """One forward pass that continues a KV cache: ``(logits, cache)`` on either TransformerLens API.

    Args:
        tokens: ``[batch, new]`` ids (the whole prompt at the prefill, then the new tokens).
        cache: ``None`` at the prefill, then what the previous call returned.
        attention_mask: ``[batch, past + new]``, 1 on real tokens (left padding), covering the cached
            positions too (the bridge's convention; for a legacy model only its last ``new`` columns are
            passed, since its cache keeps the earlier ones). ``None``: every token is real.
        logits_to_keep: return only the last this many positions' logits.

    The bridge (TL 4) gets ``return_type="logits_and_cache"`` with ``past_key_values``; a legacy
    ``HookedTransformer`` (TL 2/3) gets ``past_kv_cache=`` a TransformerLens key-value cache, always
    with an explicit mask (without one it would mask every token equal to the pad id, which the tiny
    tokenizers and many chat models share with BOS/EOS). Hooks attached to the model fire either way.
    """
    if cache is None:  # the prefill: the caller's ids (later steps feed back the model's own tokens)
        _check_ids(model, tokens)
    if not is_legacy(model):
        kw: dict[str, Any] = {}
        if cache is not None:
            kw["past_key_values"] = cache
        if attention_mask is not None:
            kw["attention_mask"] = attention_mask
        if logits_to_keep is not None:
            kw["logits_to_keep"] = logits_to_keep
        return model(tokens, return_type="logits_and_cache", **kw)
    if tokens.dim() == 1:
        tokens = tokens[None]
    batch, n_new = tokens.shape
    if attention_mask is None:
        mask = torch.ones((batch, n_new), dtype=torch.long, device=tokens.device)
    else:
        mask = attention_mask[:, -n_new:].to(device=tokens.device, dtype=torch.long)
    if cache is None:
        cache = _legacy_kv_cache_class().init_cache(model.cfg, model.cfg.device, batch)
    logits = model(tokens, past_kv_cache=cache, attention_mask=mask)
    if logits_to_keep is not None:
        logits = logits[:, -int(logits_to_keep):]
    return logits, cache


def repeat_cache(model: HookedModel, cache: Any, n: int) -> Any:
    """A copy of a batch-1 KV cache repeated ``n`` times along the batch (the original is untouched)."""
    import copy

    out = copy.deepcopy(cache)
    if not is_legacy(model):
        out.batch_repeat_interleave(n)
        return out
    for e in out.entries:
        e.past_keys = e.past_keys.repeat_interleave(n, dim=0)
        e.past_values = e.past_values.repeat_interleave(n, dim=0)
    out.previous_attention_mask = out.previous_attention_mask.repeat_interleave(n, dim=0)
    return out


def _check_ids(model: HookedModel, tokens: torch.Tensor) -> None:
    """Integer ids inside the model's vocabulary (:func:`~focuslens.core.checks.check_token_ids`)."""
    check_token_ids(torch.as_tensor(tokens), int(getattr(model.cfg, "d_vocab", 0) or 0), what="tokens")


class _StopForward(Exception):
    """Raised by :func:`run_until` from the last hook it needs: nothing downstream is computed."""


def run_until(
    model: HookedModel,
    tokens: torch.Tensor,
    *,
    names: Sequence[str] = (),
    hooks: Sequence[tuple[str, Any]] = (),
    attention_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """A frozen forward pass that stops as soon as every hook it needs has fired.

    Callers that read only early layers (caching q/k for focus directions, the sink probe, scoring a
    layer subset) need nothing after the last of their hooks: no later block, no final norm, no
    unembedding (≈ 30 % of a SmolLM2 forward at 300 tokens). The stop is a private exception raised
    from that hook and caught here, which works on every backend (the TL 4 bridge's own
    ``stop_at_layer`` stops only at a block boundary, i.e. after the whole last block's MLP).

    Args:
        tokens: ``[batch, pos]`` (or ``[pos]``) token ids.
        names: hook names whose activations are returned (detached, batch dim kept), keyed by the
            name as given (inside a hook ``hook.name`` may be an alias, e.g. on GPT-2 bridges).
        hooks: extra ``(name, fn(x, hook))`` forward hooks run as usual (their return value replaces
            the activation); the pass also waits for these to fire.
        attention_mask: ``[batch, pos]``, 1 on real tokens (e.g. right padding of a batch); None:
            the model's default.

    Returns:
        ``{name: activation}`` for ``names``, e.g. ``[batch, pos, head, d_head]`` at ``hook_rot_q``.

    Raises:
        ValueError: nothing to wait for, or a name the model does not have.
        RuntimeError: the pass ended before some hook fired (the model skipped that site).

    All hooks are removed afterwards, also when a hook or the model raises. Runs under
    ``torch.no_grad()`` (not inference mode: the activations may enter autograd later as constants).
    """
    from .hooks import attach_hooks

    want = list(dict.fromkeys([*names, *(n for n, _ in hooks)]))
    if not want:
        raise ValueError("run_until needs at least one hook name in names= or hooks= (what to stop after).")
    unknown = [n for n in want if n not in model.hook_dict]
    if unknown:
        raise ValueError(f"Unknown hook name(s) {unknown}: this model's hooks are listed in model.hook_dict "
                         "(e.g. 'blocks.0.attn.hook_rot_q').")
    toks = torch.as_tensor(tokens)
    if toks.dim() == 1:
        toks = toks[None]
    _check_ids(model, toks)
    pending = set(want)
    store: dict[str, torch.Tensor] = {}

    def fired(name: str) -> None:
        pending.discard(name)
        if not pending:
            raise _StopForward

    def make_grab(name: str):
        def grab(x, hook):
            store[name] = x.detach()
            fired(name)
            return x

        return grab

    def make_wrap(name: str, fn):
        def wrapped(x, hook):
            out = fn(x, hook)
            fired(name)
            return out

        return wrapped

    attached = [(n, make_grab(n)) for n in dict.fromkeys(names)]
    attached += [(n, make_wrap(n, fn)) for n, fn in hooks]
    kw: dict[str, Any] = {} if attention_mask is None else {"attention_mask": attention_mask}
    with attach_hooks(model, attached, label="focuslens: partial forward"), torch.no_grad():
        try:
            model(toks, **kw)
        except _StopForward:
            pass
    if pending:
        raise RuntimeError(f"The forward pass ended before hook(s) {sorted(pending)} fired: the model skipped them.")
    return store
