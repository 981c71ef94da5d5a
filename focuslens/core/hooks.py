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

    def __init__(
        self,
        model: HookedModel,
        hooks: Sequence[tuple[str, HookFn]],
        *,
        label: str = "hooks",
        pre_forward: Sequence[Callable[[tuple, dict], None]] = (),
    ):
        self.model = model
        self.label = label
        self._handles: list[tuple[object, object]] = []
        self._pre: list[object] = []
        hook_dict = model.hook_dict
        try:
            for fn in pre_forward:
                self._pre.append(_add_pre_forward(model, fn))
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
        return bool(self._handles) or bool(self._pre)

    @property
    def n_hooks(self) -> int:
        return len(self._handles) + len(self._pre)

    def remove(self) -> None:
        """Remove this handle's hooks (idempotent; leaves other hooks in place)."""
        while self._pre:
            self._pre.pop().remove()
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


def _add_pre_forward(model: HookedModel, fn: Callable[[tuple, dict], None]):
    """Register ``fn(args, kwargs)`` to run before every call of the model itself (returns nothing).

    For hooks that need what the *call* says (the KV cache's length, the attention mask) rather than
    one activation; ``fn.after()``, when ``fn`` has one, runs after the call (also when it raises).
    Marked so that :func:`count_hooks` sees it.
    """

    def pre(module, args, kwargs):
        fn(args, kwargs)
        return None

    pre._focuslens = True  # type: ignore[attr-defined]
    handles = [model.register_forward_pre_hook(pre, with_kwargs=True)]  # type: ignore[attr-defined]
    after = getattr(fn, "after", None)
    if after is not None:  # e.g. forget what the call said, so that a later call that skips it sees nothing stale
        handles.append(model.register_forward_hook(lambda module, args, out: after(), always_call=True))
    return _Handles(handles)


class _Handles:
    def __init__(self, handles: list) -> None:
        self.handles = handles

    def remove(self) -> None:
        while self.handles:
            self.handles.pop().remove()


def attach_hooks(
    model: HookedModel,
    hooks: Iterable[tuple[str, HookFn]],
    *,
    label: str = "hooks",
    pre_forward: Sequence[Callable[[tuple, dict], None]] = (),
) -> HookHandle:
    """Attach forward hooks (and ``pre_forward`` callbacks ``fn(args, kwargs)`` run before each call of
    the model) and return their :class:`HookHandle`."""
    return HookHandle(model, list(hooks), label=label, pre_forward=pre_forward)


def count_hooks(model: HookedModel) -> int:
    """Number of focuslens hooks currently attached to the model (for leak checks): forward hooks on
    every hook point, and the model-level pre-forward callbacks of :func:`attach_hooks`."""
    points = {id(hp): hp for hp in model.hook_dict.values()}  # aliases share a HookPoint
    n = sum(len(hp.fwd_hooks) for hp in points.values())
    pre = getattr(model, "_forward_pre_hooks", {}) or {}
    return n + sum(1 for f in pre.values() if getattr(f, "_focuslens", False))

