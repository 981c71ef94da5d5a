"""The query-vector spec :class:`InjectVectors` (focus directions have their own, :class:`focuslens.directions.steer.Steer`).

Both add a vector to chosen heads' queries at every position; they share the frozen-vector snapshot
(so a spec keeps describing what it applies if the tensors are edited later), the α scaling of the
spec arithmetic, and the batched attach (one α per row for the magnitude control ``alpha="auto"``).
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

import torch
from jaxtyping import Float
from torch import Tensor

from ..core.hooks import HookHandle
from ..core.io import tensor_checksum
from ..core.models import HookedModel
from ..core.checks import Head, frozen_vectors, real
from .specs import InterventionSpec, format_heads

__all__ = ["InjectVectors"]


class InjectVectors(InterventionSpec):
    """Add ``alpha * u`` to the query (or key) of chosen heads (:func:`~focuslens.intervene.eager.inject_vectors`).

    Args:
        vectors: ``{(layer, head): Tensor[d_head]}``; copied (later edits of the caller's tensors do
            not change the spec). Key order is part of the identity.
        alpha: scale; ``0`` is an exact identity.
        site: ``"query"`` or ``"key"`` (keys are KV heads).
        pre_rope: add before the rotary embedding (a different method; see ``inject_vectors``).
    """

    kind = "inject_vectors"
    __slots__ = ("vectors", "alpha", "site", "pre_rope")

    def __init__(
        self,
        vectors: Mapping[tuple[int, int], Float[Tensor, "d_head"]],
        *,
        alpha: float = 1.0,
        site: Literal["query", "key"] = "query",
        pre_rope: bool = False,
    ):
        what = "InjectVectors"
        self.vectors = frozen_vectors(vectors, what=what)
        self.alpha = real(alpha, name="alpha", what=what)
        if site not in ("query", "key"):
            raise ValueError(f"{what}: site must be 'query' or 'key', got {site!r}.")
        self.site = site
        self.pre_rope = bool(pre_rope)
        self._freeze()

    @property
    def heads(self) -> tuple[Head, ...]:
        return tuple(self.vectors)

    def _ctor(self):
        return (dict(self.vectors),), {"alpha": self.alpha, "site": self.site, "pre_rope": self.pre_rope}

    def _identity(self) -> dict[str, Any]:
        stack = torch.stack(list(self.vectors.values()))
        return {"heads": [list(h) for h in self.vectors], "vectors": tensor_checksum(stack),
                "alpha": self.alpha, "site": self.site, "pre_rope": self.pre_rope}

    def attach(self, model: HookedModel, example: Any = None) -> HookHandle:
        from .eager import inject_vectors

        return inject_vectors(model, dict(self.vectors), alpha=self.alpha, site=self.site, pre_rope=self.pre_rope)

    def scaled(self, c: float) -> "InjectVectors":
        return InjectVectors(self.vectors, alpha=self.alpha * c, site=self.site, pre_rope=self.pre_rope)

    def __repr__(self) -> str:
        extra = ", pre_rope" if self.pre_rope else ""
        return (f"InjectVectors({format_heads(self.heads)}, α={self.alpha:g}, {self.site}{extra}, "
                f"vectors={self.identity['vectors'][:8]})")
