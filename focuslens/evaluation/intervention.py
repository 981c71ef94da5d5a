"""How ``evaluate`` and ``teacher_forced_margins`` take an intervention: one rule for both.

``intervene`` may be a spec (content identity, attached per example or once, batched with each row's
left-padding offset), a callable ``RenderedExample -> context manager`` or a context manager object
(these need an explicit ``id=`` to be written to records). An already attached eager handle is
refused for batches: its spans are absolute positions, which left padding would shift.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Sequence

from ..core.errors import UsageError
from ..core.hooks import HookHandle
from ..core.models import HookedModel
from ..intervene.specs import InterventionSpec, NoIntervention
from ..tasks.records import RenderedExample

__all__ = ["Intervene", "intervention_entry", "refuse_handle_in_batches", "split_intervene", "attached",
           "attached_batch", "label_of"]

Intervene = InterventionSpec | Callable[[RenderedExample], ContextManager[Any]] | ContextManager[Any] | None


def label_of(intervene: Any) -> str | None:
    if intervene is None:
        return None
    label = getattr(intervene, "label", None)
    if isinstance(label, str):
        return label
    mod = getattr(intervene, "__module__", "") or ""
    name = getattr(intervene, "__qualname__", None) or type(intervene).__qualname__
    return f"{mod}.{name}" if mod else name


def _is_context_manager(x: Any) -> bool:
    return hasattr(x, "__enter__") and hasattr(x, "__exit__")


def intervention_entry(intervene: Any, *, id: str | None, output: Any,
                       batch_size: int | None = None) -> tuple[Any, Any]:
    """Classify ``intervene``: returns ``(normalised intervene, its entry in the configuration)``.

    Specs enter with their content identity; a bare callable or context manager has none, so with an
    output file it must come with an explicit ``id`` (a name alone is what let one run's records be
    handed to another). With ``batch_size > 1`` an already attached handle is refused
    (:func:`refuse_handle_in_batches`).
    """
    if isinstance(intervene, NoIntervention) or (
        isinstance(intervene, InterventionSpec) and intervene.identity.get("kind") == "none"
    ):
        intervene = None
    if intervene is None:
        if id is not None:
            raise ValueError("id= names a callable or context-manager intervention; there is none here.")
        return None, None
    if isinstance(intervene, InterventionSpec):
        if id is not None:
            raise ValueError(
                f"id= is for callables and context managers; the spec {intervene!r} has its own content "
                "identity (spec.id), which is what keys the records."
            )
        return intervene, intervene.identity
    if not (_is_context_manager(intervene) or callable(intervene)):
        raise TypeError(
            "intervene must be None, an intervention spec (focuslens.intervene.specs), a callable RenderedExample -> "
            f"context manager, or a context manager object; got {type(intervene).__name__}."
        )
    if id is not None:
        if not isinstance(id, str) or not id.strip():
            raise ValueError(f"id must be a non-empty string, got {id!r}.")
        refuse_handle_in_batches(intervene, batch_size)
        return intervene, {"kind": "custom", "id": id}
    if output is not None:
        raise ValueError(
            f"intervene={label_of(intervene)!r} is a bare callable/context manager with no content identity, "
            "so its records could be confused with another intervention's: pass a spec from "
            "focuslens.intervene.specs (SplitSoftmax, Steer, InjectVectors, Ablate, Compose), or an explicit "
            "id='...' that names exactly what it does."
        )
    refuse_handle_in_batches(intervene, batch_size)
    return intervene, label_of(intervene)


def refuse_handle_in_batches(intervene: Any, batch_size: int | None) -> None:
    """An attached eager handle cannot serve a left-padded batch: refuse it when ``batch_size > 1``.

    Why: ``split_softmax(model, heads, r.relevant, tau)`` (and every other eager handle) was attached for
    one unpadded prompt; its span is in that prompt's absolute positions. Under left padding each row
    is shifted by its own number of pad tokens, so the handle would edit the wrong positions of most
    rows and silently change their answers. A spec attaches each batch with each row's own span.
    """
    if not isinstance(intervene, HookHandle) or batch_size is None or batch_size <= 1:
        return
    raise UsageError(
        f"evaluate(batch_size={batch_size}) was given an already attached handle ({label_of(intervene)!r}): its "
        "spans are absolute positions of one unpadded prompt, which left padding shifts row by row. Pass the "
        "spec instead, e.g. intervene=fl.SplitSoftmax(heads, tau=0.2, span=\"relevant\") (each row gets its own "
        "span), or use batch_size=1."
    )


def split_intervene(model: HookedModel, intervene: Any) -> tuple[Callable[[Any], ContextManager[Any]] | None,
                                                                  Callable[[], ContextManager[Any]]]:
    """``(per-example factory or None, factory of the context around the whole run)``.

    A spec is attached inside a ``try/finally`` (:func:`_attached`), so its hooks are removed also when
    generation raises; a spec that does not need the example is attached once (and batches).
    """
    if intervene is None:
        return None, contextlib.nullcontext
    if isinstance(intervene, InterventionSpec):
        if intervene.per_example:
            return (lambda r: attached(model, intervene, r)), contextlib.nullcontext
        return None, (lambda: attached(model, intervene, None))
    if _is_context_manager(intervene):
        return None, (lambda: intervene)
    return intervene, contextlib.nullcontext


@contextlib.contextmanager
def attached(model: HookedModel, spec: InterventionSpec, example: Any):
    handle = spec.attach(model, example)
    try:
        yield handle
    finally:
        handle.remove()


@contextlib.contextmanager
def attached_batch(model: HookedModel, spec: InterventionSpec, examples: Sequence[Any], offsets: list[int]):
    handle = spec.attach_batch(model, examples, offsets=offsets)
    try:
        yield handle
    finally:
        handle.remove()


