"""Query-vector specs: :class:`InjectVectors` and :class:`Steer` (focus directions), re-exported by :mod:`focuslens.specs`.

Both add a vector to chosen heads' queries at every position; they share the frozen-vector snapshot
(so a spec keeps describing what it applies if the tensors are edited later), the α scaling of the
spec arithmetic, and the batched attach (one α per row for the magnitude control ``alpha="auto"``).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Iterable, Literal, Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from .hooks import HookHandle
from .io import tensor_checksum
from .models import HookedModel
from .specs import Head, InterventionSpec, _check_batch, _fmt_heads, _frozen_vectors, _real, _tokens_of

__all__ = ["InjectVectors", "Steer"]


class InjectVectors(InterventionSpec):
    """Add ``alpha * u`` to the query (or key) of chosen heads (:func:`~focuslens.interventions.inject_vectors`).

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
        self.vectors = _frozen_vectors(vectors, what=what)
        self.alpha = _real(alpha, name="alpha", what=what)
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
        from .interventions import inject_vectors

        return inject_vectors(model, dict(self.vectors), alpha=self.alpha, site=self.site, pre_rope=self.pre_rope)

    def scaled(self, c: float) -> "InjectVectors":
        return InjectVectors(self.vectors, alpha=self.alpha * c, site=self.site, pre_rope=self.pre_rope)

    def __repr__(self) -> str:
        extra = ", pre_rope" if self.pre_rope else ""
        return (f"InjectVectors({_fmt_heads(self.heads)}, α={self.alpha:g}, {self.site}{extra}, "
                f"vectors={self.identity['vectors'][:8]})")


class Steer(InterventionSpec):
    """Focus directions applied with a factor α (:meth:`FocusDirections.apply <focuslens.directions.FocusDirections.apply>`).

    Args:
        directions: a :class:`~focuslens.directions.FocusDirections`; the selected heads are copied
            at construction (``Steer(d, k=5)`` and ``Steer(d.top(5))`` are the same spec).
        alpha: a number, or ``"auto"`` (the sink-target magnitude control: needs each example's
            prompt tokens at attach time, so it is attached per example). Default: ``directions.alpha``.
        heads: a subset of the directions' heads (list of ``(layer, head)``).
        k: the top-k heads (``directions.top(k)``); not together with ``heads``.
        target, alpha_max, per: settings of ``alpha="auto"`` (part of the identity only then).
    """

    kind = "steer"
    __slots__ = ("directions", "alpha", "target", "alpha_max", "per")

    def __init__(
        self,
        directions: Any,
        *,
        alpha: float | Literal["auto"] | None = None,
        heads: Iterable[Sequence[int]] | None = None,
        k: int | None = None,
        target: float = 0.5,
        alpha_max: float = 4.0,
        per: Literal["head", "input"] = "head",
    ):
        from .directions.artefact import FocusDirections

        what = "Steer"
        if not isinstance(directions, FocusDirections):
            raise TypeError(f"{what} takes a FocusDirections, got {type(directions).__name__}.")
        if heads is not None and k is not None:
            raise ValueError(f"{what}: give heads= or k=, not both.")
        d = directions
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(d):
                raise ValueError(f"{what}: k must be an int in 1..{len(d)}, got {k!r}.")
            d = d.top(k)
        elif heads is not None:
            d = d.select(heads)
        # Snapshot: the spec must keep describing what it applies even if the artefact is edited later.
        self.directions = d._replace(vectors=d.vectors.detach().clone(), training=copy.deepcopy(d.training))
        a = directions.alpha if alpha is None else alpha
        if isinstance(a, str):
            if a != "auto":
                raise ValueError(f"{what}: alpha must be a number or 'auto', got {a!r}.")
            self.alpha = "auto"
        else:
            self.alpha = _real(a, name="alpha", what=what)
        self.target = _real(target, name="target", what=what)
        if self.alpha == "auto" and not 0.0 < self.target < 1.0:
            raise ValueError(f"{what}: target is a fraction of sink mass in (0, 1); got {target!r}.")
        self.alpha_max = _real(alpha_max, name="alpha_max", what=what)
        if not (self.alpha_max > 0 and math.isfinite(self.alpha_max)):
            raise ValueError(
                f"{what}: alpha_max is the top of the alpha grid [0, alpha_max] that alpha='auto' searches; "
                f"it must be finite and > 0, got {alpha_max!r}."
            )
        if per not in ("head", "input"):
            raise ValueError(f"{what}: per must be 'head' or 'input', got {per!r}.")
        self.per = per
        self._freeze()

    @property
    def heads(self) -> tuple[Head, ...]:
        return tuple(self.directions.heads)

    @property
    def per_example(self) -> bool:
        return self.alpha == "auto"

    def _ctor(self):
        return (self.directions,), {"alpha": self.alpha, "target": self.target, "alpha_max": self.alpha_max,
                                    "per": self.per}

    def _identity(self) -> dict[str, Any]:
        d = self.directions
        out: dict[str, Any] = {"heads": [list(h) for h in d.heads], "vectors": tensor_checksum(d.vectors),
                               "alpha": self.alpha, "site": d.site, "fingerprint": dict(d.fingerprint)}
        if self.alpha == "auto":
            out.update(target=self.target, alpha_max=self.alpha_max, per=self.per)
        return out

    def attach(self, model: HookedModel, example: Any = None) -> HookHandle:
        if self.alpha == "auto":
            tokens = _tokens_of(example) if example is not None else None
            if tokens is None:
                raise ValueError("Steer(alpha='auto') needs the prompt: attach(model, example) with a "
                                 "RenderedExample (or its tokens).")
            return self.directions.apply(model, alpha="auto", tokens=tokens, target=self.target,
                                         alpha_max=self.alpha_max, per=self.per)
        return self.directions.apply(model, alpha=self.alpha)

    def attach_batch(self, model: HookedModel, examples: Sequence[Any], *, offsets: Sequence[int]) -> HookHandle:
        """Fixed α: attached once. ``alpha="auto"``: each row's α from its own unpadded prompt.

        The probe pass of :func:`~focuslens.directions.magnitude.sink_target_alphas` runs per example
        on the unpadded tokens (exactly what :meth:`attach` runs), then one injection hook adds row i's
        scaled vectors to row i (:func:`~focuslens.interventions.inject_vectors` with ``[batch, d_head]``
        vectors). Pad positions only change pad rows, whose keys every real row masks.
        """
        _check_batch(examples, offsets, what="Steer")
        if self.alpha != "auto":
            return self.attach(model, None)
        return self._attach_rows(model, self._row_vectors(model, examples))

    def _row_vectors(self, model: HookedModel, examples: Sequence[Any], prior: "InterventionSpec | None" = None):
        """``{head: [batch, d_head]}``: each row's auto-scaled vectors; the probe runs with ``prior``
        attached for that row alone (what a :class:`Compose` member attached before this one does)."""
        from .directions.magnitude import sink_target_alphas

        d = self.directions
        d.check_applies_to(model)  # the checks of FocusDirections.apply
        rows = []
        for e in examples:
            tokens = _tokens_of(e)
            if tokens is None:
                raise ValueError("Steer(alpha='auto').attach_batch needs each example's prompt tokens.")
            handle = prior.attach(model, e) if prior is not None else None
            try:
                a = sink_target_alphas(model, d, tokens, target=self.target, alpha_max=self.alpha_max, per=self.per)
            finally:
                if handle is not None:
                    handle.remove()
            rows.append(d.scaled(a).as_dict())
        return {h: torch.stack([r[h] for r in rows]) for h in rows[0]}

    @staticmethod
    def _attach_rows(model: HookedModel, vectors) -> HookHandle:
        from .interventions import inject_vectors

        return inject_vectors(model, vectors, alpha=1.0, site="query", pre_rope=False)

    def scaled(self, c: float) -> "Steer":
        if self.alpha == "auto":
            raise TypeError("Steer(alpha='auto') picks α per prompt; change target= instead of scaling it.")
        return Steer(self.directions, alpha=self.alpha * c, target=self.target, alpha_max=self.alpha_max,
                     per=self.per)

    def __repr__(self) -> str:
        a = "auto" if self.alpha == "auto" else f"{self.alpha:g}"
        extra = f", target={self.target:g}" if self.alpha == "auto" else ""
        return (f"Steer({_fmt_heads(self.heads)}, α={a}{extra}, {self.directions.objective}, "
                f"vectors={self.identity['vectors'][:8]})")
