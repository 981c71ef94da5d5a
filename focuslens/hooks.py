"""Leak-free hook handles: the one mechanism every focuslens intervention and measurement uses.

A :class:`HookHandle` attaches a list of ``(hook_name, fn)`` forward hooks to a hooked model and
removes exactly those hooks again, never anyone else's. It is both a handle (``.remove()``,
idempotent) and a context manager (``with handle: ...``), like steering-vectors' ``patch``/``apply``.
Attaching is all-or-nothing: if the third hook fails to attach, the first two are removed before the
error propagates. Hooks stay active during ``model.generate`` (prefill and every decoding step).

Why not ``model.hooks(...)``? It is a context manager only; interventions that a user keeps on across
notebook cells need a handle, and composing several interventions needs each to own its hooks.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

from .models import HookedModel

__all__ = ["HookHandle", "attach_hooks", "count_hooks"]

HookFn = Callable[..., object]


class HookHandle:
    """Forward hooks attached to a model, removable as a unit.

    Example:
        >>> h = attach_hooks(model, [("blocks.3.attn.hook_pattern", fn)], label="my edit")
        >>> model(tokens)  # edited
        >>> h.remove()     # gone, other hooks untouched
        >>> with attach_hooks(model, hooks):
        ...     model.generate(tokens)
    """

    def __init__(self, model: HookedModel, hooks: Sequence[tuple[str, HookFn]], *, label: str = "hooks"):
        self.model = model
        self.label = label
        self._handles: list[tuple[object, object]] = []
        hook_dict = model.hook_dict
        try:
            for name, fn in hooks:
                if name not in hook_dict:
                    raise ValueError(
                        f"{label}: the model has no hook point {name!r}. focuslens needs the "
                        "HookedTransformer hook names (blocks.L.attn.hook_q, hook_rot_q, hook_pattern...)."
                    )
                hp = hook_dict[name]
                before = list(hp.fwd_hooks)
                handle = hp.add_hook(fn, dir="fwd")
                if handle is None:  # legacy HookPoint.add_hook returns nothing
                    handle = next(h for h in hp.fwd_hooks if all(h is not b for b in before))
                self._handles.append((hp, handle))
        except BaseException:
            self.remove()
            raise

    @property
    def active(self) -> bool:
        return bool(self._handles)

    @property
    def n_hooks(self) -> int:
        return len(self._handles)

    def remove(self) -> None:
        """Remove this handle's hooks (idempotent; leaves other hooks in place)."""
        while self._handles:
            hp, handle = self._handles.pop()
            handle.hook.remove()
            hp.fwd_hooks = [h for h in hp.fwd_hooks if h is not handle]

    def __enter__(self) -> "HookHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = f"{self.n_hooks} hooks" if self.active else "removed"
        return f"<HookHandle {self.label}: {state}>"


def attach_hooks(model: HookedModel, hooks: Iterable[tuple[str, HookFn]], *, label: str = "hooks") -> HookHandle:
    """Attach forward hooks and return their :class:`HookHandle`."""
    return HookHandle(model, list(hooks), label=label)


def count_hooks(model: HookedModel) -> int:
    """Number of forward hooks currently attached anywhere on the model (for leak checks)."""
    points = {id(hp): hp for hp in model.hook_dict.values()}  # aliases share a HookPoint
    return sum(len(hp.fwd_hooks) for hp in points.values())

