"""Handles that remove several interventions as one: :class:`ComposedHandle` and :func:`remove_all`.

Why a module of its own: both the eager :func:`~focuslens.intervene.eager.compose` and the
all-or-nothing :class:`~focuslens.intervene.specs.Compose` spec build a :class:`ComposedHandle`, and the
eager functions are sugar over the specs, so the handle sits below both (no import cycle).
"""

from __future__ import annotations

from typing import Iterable, Sequence

from ..core.hooks import HookHandle

__all__ = ["ComposedHandle", "remove_all"]


def remove_all(handles: Iterable[object]) -> None:
    """Remove every :class:`HookHandle` among ``handles`` (others ignored, last first), whatever fails."""
    for h in reversed(list(handles)):
        if isinstance(h, HookHandle):
            try:
                h.remove()
            except Exception:  # keep removing; the refusal is the error to report
                pass


class ComposedHandle(HookHandle):
    """Several handles removed as one (each removes only its own hooks).

    Removal is exception-safe: every member is removed even if one of them raises, and the first
    error is re-raised afterwards.
    """

    def __init__(self, handles: Sequence[HookHandle], *, label: str = "composed"):
        models = {id(h.model) for h in handles}
        if len(models) > 1:
            # Refusing must not leak: the handles given are already attached, and the caller gets no
            # object through which to remove them.
            remove_all(handles)
            raise ValueError(
                "compose(): all handles must belong to the same model; the handles given were removed."
            )
        self.model = handles[0].model if handles else None
        self.label = label
        self.members: list[HookHandle] = list(handles)
        self._handles = []  # the members own the hooks

    @property
    def active(self) -> bool:
        return any(h.active for h in self.members)

    @property
    def n_hooks(self) -> int:
        return sum(h.n_hooks for h in self.members)

    def remove(self) -> None:
        first: BaseException | None = None
        for h in reversed(self.members):
            try:
                h.remove()
            except BaseException as e:  # keep removing the others
                first = first or e
        if first is not None:
            raise first

    def __repr__(self) -> str:
        return f"<ComposedHandle {self.label}: {len(self.members)} handles, {self.n_hooks} hooks>"
