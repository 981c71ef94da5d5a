"""Which engine runs an intervention on a hooked model, and the fused engine of a TransformerLens bridge.

:func:`engine_for` builds (once per bridge, cached) a plain Hugging Face model of the bridge's class
on SDPA whose parameters and buffers *are* the bridge's tensors (no copy: a module tree built on the
meta device, then each parameter slot pointed at the bridge's), wrapped as a
:class:`~focuslens.engine.fused.FusedModel`. The bridge itself is never switched to another attention
implementation, so its hooks and patterns stay exactly as they were.

:func:`resolve_engine` is the rule that ``evaluate`` (and sweeps, the CLI) follow for
``engine="auto" | "fused" | "eager"``: ``"auto"`` takes the engine whenever it can express the
intervention exactly (:func:`engine_refusal` is None) and the bridge otherwise; ``"fused"`` raises
with the reason when it cannot; ``"eager"`` is today's bridge path.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any, Literal

import torch

from ..core.errors import UsageError
from ..core.models import HookedModel
from ..intervene.specs import InterventionSpec
from .fused import FusedModel

__all__ = ["EngineChoice", "ENGINES", "engine_for", "engine_refusal", "resolve_engine"]

EngineChoice = Literal["auto", "fused", "eager"]
ENGINES: tuple[str, ...] = ("auto", "fused", "eager")

# bridge -> (signature of its parameter tensors, engine); rebuilt when a parameter is replaced
_ENGINES: "weakref.WeakKeyDictionary[Any, tuple[tuple, FusedModel]]" = weakref.WeakKeyDictionary()
_WRAPPER = "_original_component"


def _hf_model(model: Any) -> torch.nn.Module | None:
    hf = getattr(model, "original_model", None)
    if isinstance(hf, torch.nn.Module) and hasattr(hf, "config") and hasattr(type(hf), "_from_config"):
        return hf
    return None


def _hf_name(name: str) -> str:
    """A bridge parameter name with the bridge's wrapper levels removed: the Hugging Face name."""
    return ".".join(part for part in name.split(".") if part != _WRAPPER)


def _signature(hf: torch.nn.Module) -> tuple:
    return tuple((n, p.data_ptr(), p.dtype, p.device, tuple(p.shape))
                 for n, p in hf.named_parameters(remove_duplicate=False))


def _share_weights(hf: torch.nn.Module) -> torch.nn.Module:
    """A Hugging Face model of ``hf``'s class on SDPA whose parameters and buffers are ``hf``'s tensors."""
    cfg = copy.deepcopy(hf.config)
    with torch.device("meta"):
        shadow = type(hf)._from_config(cfg, attn_implementation="sdpa")
    params = {_hf_name(n): p for n, p in hf.named_parameters(remove_duplicate=False)}
    buffers = {_hf_name(n): b for n, b in hf.named_buffers(remove_duplicate=False)}
    for kind, source in (("_parameters", params), ("_buffers", buffers)):
        named = shadow.named_parameters if kind == "_parameters" else shadow.named_buffers
        for name, _ in list(named(remove_duplicate=False)):
            if name not in source:
                raise UsageError(f"the bridge has no tensor for the Hugging Face {kind[1:-1]} {name!r}.")
            owner, _, leaf = name.rpartition(".")
            getattr(shadow.get_submodule(owner), kind)[leaf] = source[name]
    left = [n for n, t in list(shadow.named_parameters()) + list(shadow.named_buffers()) if t.is_meta]
    if left:
        raise UsageError(f"the bridge's model left tensors unset in the engine: {left[:3]}.")
    shadow.generation_config = copy.deepcopy(getattr(hf, "generation_config", shadow.generation_config))
    shadow.eval()
    return shadow


def engine_for(model: HookedModel) -> FusedModel:
    """The fused engine of a TransformerLens bridge (built on first use, then cached per bridge).

    Its Hugging Face model shares every parameter tensor with the bridge (in-place weight edits are
    seen by both; replacing a parameter rebuilds the engine at the next call).
    """
    hf = _hf_model(model)
    if hf is None:
        raise UsageError(f"{type(model).__name__} has no Hugging Face model behind it (original_model): "
                         "the fused engine runs TransformerLens bridges only.")
    sig = _signature(hf)
    entry = _ENGINES.get(model)
    if entry is not None and entry[0] == sig:
        return entry[1]
    fm = FusedModel(_share_weights(hf), getattr(model, "tokenizer", None))
    fm.hooked = model
    _ENGINES[model] = (sig, fm)
    return fm


def _hooks_attached(model: Any) -> list[str]:
    out = []
    for name, hp in (getattr(model, "hook_dict", None) or {}).items():
        if getattr(hp, "_forward_hooks", None) or getattr(hp, "_forward_pre_hooks", None):
            out.append(name)
    return out


def engine_refusal(model: HookedModel, spec: InterventionSpec | None) -> str | None:
    """Why the fused engine cannot run ``spec`` on ``model`` exactly (``None``: it can).

    Reasons: no Hugging Face model behind ``model`` (a legacy ``HookedTransformer``); an architecture
    the engine does not cover (attention modules without ``q_proj``/``o_proj``, e.g. GPT-2); hooks
    attached to the bridge (the engine would not run them); a spec without a fused edit
    (``spec.fused`` False: key-site or pre-RoPE injection, a custom spec);
    an edit on a model with sliding-window layers or learned attention sinks (the explicit rows
    assume every key of the cache, plain causal attention).
    """
    if _hf_model(model) is None:
        return f"{type(model).__name__} has no Hugging Face model behind it (original_model)"
    hooked = _hooks_attached(model)
    if hooked:
        return f"hooks are attached to the model ({hooked[:3]}...); the engine would not run them"
    if spec is not None and not spec.fused:
        return f"{spec!r} has no fused edit"
    try:
        fm = engine_for(model)
    except (UsageError, ValueError, TypeError) as e:
        return f"the engine does not cover this model ({e})"
    if spec is not None:
        for i, m in enumerate(fm._attn_modules):
            w = getattr(m, "sliding_window", None)
            if (isinstance(w, int) and not isinstance(w, bool) and w > 0) or getattr(m, "sinks", None) is not None:
                return f"layer {i} has a sliding window or attention sinks, which the engine's edits do not model"
    return None


def resolve_engine(model: HookedModel, intervene: Any, engine: EngineChoice | str) -> FusedModel | None:
    """The engine that runs ``intervene`` on ``model``: a :class:`FusedModel`, or ``None`` for the bridge.

    ``intervene``: ``None``, an intervention spec, or anything else (a callable or context manager,
    which only the bridge runs). ``engine``: ``"auto"`` (the fused engine when
    :func:`engine_refusal` finds nothing, else the bridge), ``"fused"`` (raise ``UsageError`` with
    the reason when it cannot), ``"eager"`` (the bridge).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {list(ENGINES)}, got {engine!r}.")
    if engine == "eager":
        return None
    if intervene is not None and not isinstance(intervene, InterventionSpec):
        reason: str | None = "a callable or context-manager intervention runs only on the bridge (pass a spec)"
    else:
        reason = engine_refusal(model, intervene)
    if reason is None:
        return engine_for(model)
    if engine == "fused":
        raise UsageError(f"engine='fused' cannot run this evaluation: {reason}. Use engine='auto' (the "
                         "eager bridge where the engine cannot) or engine='eager'.")
    return None
