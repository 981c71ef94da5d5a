"""Intervention specs: frozen descriptions of an intervention, with a content identity.

Why this module exists
----------------------
The eager functions (:func:`~focuslens.intervene.eager.split_softmax`,
:func:`~focuslens.intervene.eager.inject_vectors`, :meth:`FocusDirections.apply
<focuslens.directions.FocusDirections.apply>`, :func:`~focuslens.heads.patching.ablate_heads`) attach their
hooks the moment they are called. That is right in a notebook cell, and wrong everywhere an
intervention has to be *described* before it is applied:

* an evaluation attaches it once per example (split softmax needs each example's own gold span, the
  magnitude control ``alpha="auto"`` each prompt's tokens), so callers wrote ``Lazy`` wrapper classes;
* ``with compose(split_softmax(...), inject_vectors(..., alpha=nan))`` leaves the first handle attached
  when the second call raises, before ``compose`` ever runs;
* stored results were keyed by a *name* (a lambda's qualname, a tag), so a run with other heads, another
  τ or other directions under the same name was silently handed the first run's answers.

A spec is a small immutable value that touches no model. ``spec.attach(model, example)`` attaches it
(the eager functions are one-line sugar over it: the same validation) and returns a
:class:`~focuslens.core.hooks.HookHandle`; ``spec.identity`` is a JSON-able description of everything
that changes its effect (kind, heads in order, τ/α/mode/span rule, a checksum of the vectors, the
directions' model fingerprint, the focuslens version) and ``spec.id`` its
:func:`~focuslens.core.io.content_hash`. Two specs have the same ``id`` exactly when they do the same thing,
so :func:`focuslens.evaluation.runner.evaluate` and the CLI key stored results by it.

Arithmetic (new objects; the operands are unchanged):

* ``c * spec`` / ``spec * c`` / ``-spec``: scale α of :class:`Steer` (fixed α only) and
  :class:`InjectVectors`; a :class:`Compose` scales every member. Other specs raise ``TypeError``.
* ``a + b``: :class:`Compose` (apply both; ``sum([a, b, c])`` works). ``a + NoIntervention()`` is
  ``a``. For two injections this is also the arithmetic sum of their query offsets.

Example:
    >>> from focuslens import SplitSoftmax, Steer
    >>> spec = SplitSoftmax(top20, tau=0.2)              # span taken from each example: r.relevant
    >>> with spec.attach(model, rendered):
    ...     out = model.generate(rendered.tokens[None], max_new_tokens=10, verbose=False)
    >>> both = spec + 0.5 * Steer(directions, alpha=1.0)  # Compose(...): all-or-nothing attach
    >>> res = evaluate(model, test, intervene=both, output="runs/both.jsonl")
"""

from __future__ import annotations

import copy
from types import MappingProxyType
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from ..core.hooks import HookHandle, attach_hooks
from ..core.io import content_hash, tensor_checksum
from ..core.checks import Head, frozen_vectors, head_list, real
from ..core.errors import UsageError
from ..core.models import HookedModel
from .handles import ComposedHandle, remove_all

__all__ = [
    "InterventionSpec",
    "NoIntervention",
    "Ablate",
    "Compose",
    "as_spec",
    "check_batch",
    "format_heads",
    "tokens_of",
    "measuring_model",
    "SpanRule",
]

#: Where a span edit reads its span from: ``"relevant"`` (the gold document), ``"support"`` (every gold
#: document of a multi-gold record, their union), ``"distractors"`` (their union), any other span
#: attribute of the example, or a prompt span name (``"question"``, ``"doc_3"``).
SpanRule = Literal["relevant", "support", "distractors", "question"] | str


def _version() -> str:
    try:
        from ..core.version import __version__

        return str(__version__)
    except Exception:  # pragma: no cover - only while focuslens/__init__ is half imported
        return "unknown"


def format_heads(heads: Sequence[Head], n: int = 3) -> str:
    shown = ", ".join(f"L{l}H{h}" for l, h in heads[:n])
    return f"{len(heads)} heads [{shown}{', …' if len(heads) > n else ''}]"


def check_batch(examples: Sequence[Any], offsets: Sequence[int], *, what: str) -> None:
    if len(examples) == 0 or len(examples) != len(offsets):
        raise ValueError(
            f"{what}.attach_batch needs one offset (left-pad tokens) per example; got {len(examples)} examples "
            f"and {len(offsets)} offsets."
        )
    for i, o in enumerate(offsets):
        if isinstance(o, bool) or not isinstance(o, int) or o < 0:
            raise ValueError(f"{what}.attach_batch: offsets[{i}] must be an int >= 0, got {o!r}.")


def tokens_of(example: Any):
    """The prompt tokens of a RenderedExample, a LabelledPrompt or a 1-D tensor."""
    if isinstance(example, torch.Tensor):
        return example
    for attr in ("tokens",):
        t = getattr(example, attr, None)
        if isinstance(t, torch.Tensor):
            return t
    return None


def measuring_model(engine: Any, what: str) -> HookedModel:
    """The hooked model a fused engine was built for (:func:`focuslens.engine.engine_for`): where a spec's
    measuring pass (:meth:`InterventionSpec.measure`) runs when it is attached to the engine, with the
    very numbers of the bridge path."""
    model = getattr(engine, "hooked", None)
    if model is None:
        raise TypeError(f"{what} measures each prompt on the hooked model the engine was built for "
                        "(focuslens.engine.engine_for(bridge)); this engine has none: run it on the bridge.")
    return model


class InterventionSpec:
    """Base class: an immutable description of an intervention with a content identity.

    Subclasses implement :meth:`attach` and ``_identity()``; everything else (``id``, equality,
    hashing, ``+``) is shared. Specs compare equal exactly when their identities are equal.
    """

    kind: str = "spec"
    __slots__ = ("_frozen", "_identity_cache")

    def _freeze(self) -> None:
        object.__setattr__(self, "_identity_cache", None)
        object.__setattr__(self, "_frozen", True)

    def __setattr__(self, name: str, value: Any) -> None:
        if getattr(self, "_frozen", False):
            raise AttributeError(f"{type(self).__name__} is immutable; make a new spec instead.")
        object.__setattr__(self, name, value)

    # --- identity ------------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def identity(self) -> dict[str, Any]:
        """Everything that changes the effect, JSON-able (a fresh copy on every access)."""
        if self._identity_cache is None:
            object.__setattr__(self, "_identity_cache", {"kind": self.kind, **self._identity(),
                                                         "focuslens": _version()})
        return copy.deepcopy(self._identity_cache)

    @property
    def id(self) -> str:
        """:func:`focuslens.core.io.content_hash` of :attr:`identity`: equal iff the specs do the same."""
        return content_hash(self.identity)

    @property
    def per_example(self) -> bool:
        """True when attaching needs the example (its spans or tokens): evaluated one by one."""
        return False

    def attach(self, model: HookedModel, example: Any = None) -> HookHandle:  # pragma: no cover
        """Attach the hooks to ``model`` (for ``example`` when the spec needs one); returns a handle."""
        raise NotImplementedError

    @property
    def batchable(self) -> bool:
        """True when :meth:`attach_batch` can serve a left-padded batch of different examples.

        Every built-in spec can. A subclass that needs the example but has no batched attach says
        False, and :func:`~focuslens.evaluation.runner.evaluate` then runs it one example at a time.
        """
        return not self.per_example or type(self).attach_batch is not InterventionSpec.attach_batch

    @property
    def measures(self) -> bool:
        """Whether attaching first measures each prompt (a pass over it, under the specs attached before it):
        ``Steer(alpha="auto")``'s sink probe, :class:`~focuslens.intervene.label_free.PositionalCalibration`'s
        calibration, :class:`~focuslens.intervene.label_free.SelfLocatedSpan`'s locating pass.

        Such a spec splits its batched attach into :meth:`measure` (each row alone, on its unpadded prompt)
        and :meth:`attach_measured` (and :meth:`attach_measured_fused` on the fused engine), so that a
        :class:`Compose` measures each row with the members before it attached for that row alone, as
        :meth:`attach` does, before anything is attached for the padded batch.
        """
        return False

    def measure(self, model: HookedModel, examples: Sequence[Any], prior: "InterventionSpec | None" = None) -> Any:
        """Each row's measurement (:attr:`measures`), ``prior`` attached (``prior.attach(model, example)``)
        around the pass of that row alone."""
        raise TypeError(f"{type(self).__name__} measures nothing.")

    def attach_measured(self, model: HookedModel, measured: Any, examples: Sequence[Any], *,
                        offsets: Sequence[int]) -> HookHandle:
        """:meth:`attach_batch` with the rows' measurement given (from :meth:`measure`)."""
        raise TypeError(f"{type(self).__name__} measures nothing.")

    def attach_measured_fused(self, engine: Any, measured: Any, examples: Sequence[Any], *,
                              offsets: Sequence[int]) -> HookHandle:
        """:meth:`attach_fused` with the rows' measurement given (made on the bridge, ``engine.hooked``)."""
        raise TypeError(f"{type(self).__name__} measures nothing.")

    def attach_batch(self, model: HookedModel, examples: Sequence[Any], *, offsets: Sequence[int]) -> HookHandle:
        """Attach for one left-padded batch: row i is ``examples[i]`` after ``offsets[i]`` pad tokens.

        The batch of :func:`~focuslens.core.generation.greedy_generate_batch` (``offsets`` from
        :func:`~focuslens.core.generation.left_pad_offsets`). Row i gets what ``attach(model, examples[i])``
        gives it alone, up to float rounding; pad positions cannot change real rows (their keys are
        masked). Specs that do not need the example attach once, as :meth:`attach` does.
        """
        check_batch(examples, offsets, what=type(self).__name__)
        if not self.per_example:
            return self.attach(model, None)
        raise TypeError(
            f"{type(self).__name__} needs each example and has no batched attach: run it one example at a "
            "time (evaluate does so by itself)."
        )

    # --- the fused engine (focuslens.engine) --------------------------------------------------
    @property
    def fused(self) -> bool:
        """True when :meth:`attach_fused` can express this spec exactly on the fused engine.

        Then ``evaluate(engine="auto")`` runs it on the Hugging Face model's SDPA attention with only
        the edited heads recomputed explicitly (:mod:`focuslens.engine`); else on the bridge.
        """
        return type(self).attach_fused is not InterventionSpec.attach_fused

    def attach_fused(self, engine: Any, examples: Sequence[Any], *, offsets: Sequence[int]) -> HookHandle:
        """Attach to a fused engine (a :class:`focuslens.engine.FusedModel`) for one left-padded batch.

        The engine's counterpart of :meth:`attach_batch` (same ``examples`` and ``offsets``): row i gets
        what ``attach(model, examples[i])`` gives it on the bridge, up to float rounding. Returns a
        handle (``.remove()``). Specs without a fused edit raise ``TypeError`` (``spec.fused`` is False).
        """
        raise TypeError(f"{type(self).__name__} has no fused edit: run it on the bridge (engine='eager').")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, InterventionSpec):
            return NotImplemented
        return self.identity == other.identity

    def __hash__(self) -> int:
        return hash(self.id)

    # --- copying / pickling: rebuild through the constructor (which re-validates and re-freezes) ----
    def _ctor(self) -> tuple[tuple, dict[str, Any]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __reduce__(self):
        args, kwargs = self._ctor()
        return (_rebuild, (type(self), args, kwargs))

    # --- arithmetic ----------------------------------------------------------------------------
    def __add__(self, other: Any) -> "InterventionSpec":
        if other is None or isinstance(other, NoIntervention):
            return self
        if isinstance(other, InterventionSpec):
            return Compose(self, other)
        return NotImplemented

    def __radd__(self, other: Any) -> "InterventionSpec":
        if other is None or (isinstance(other, (int, float)) and other == 0):  # sum([...]) starts at 0
            return self
        if isinstance(other, InterventionSpec):
            return Compose(other, self)
        return NotImplemented

    def scaled(self, c: float) -> "InterventionSpec":
        """The same spec with α multiplied by ``c`` (only specs with a linear α)."""
        raise TypeError(f"{type(self).__name__} has no α to scale.")

    def __mul__(self, c: Any) -> "InterventionSpec":
        if isinstance(c, InterventionSpec):
            return NotImplemented
        return self.scaled(real(c, name="scale", what=type(self).__name__))

    __rmul__ = __mul__

    def __truediv__(self, c: Any) -> "InterventionSpec":
        d = real(c, name="divisor", what=type(self).__name__)
        if d == 0:
            raise UsageError(f"{type(self).__name__} / c: the divisor is 0; give a non-zero number.")
        return self.scaled(1.0 / d)

    def __neg__(self) -> "InterventionSpec":
        return self.scaled(-1.0)


# --------------------------------------------------------------------------------------------------


class NoIntervention(InterventionSpec):
    """The unmodified model, as a spec (``evaluate`` treats it exactly like ``intervene=None``)."""

    kind = "none"
    __slots__ = ()

    def __init__(self) -> None:
        self._freeze()

    def _identity(self) -> dict[str, Any]:
        return {}

    def _ctor(self):
        return (), {}

    def attach(self, model: HookedModel, example: Any = None) -> HookHandle:
        return attach_hooks(model, [], label="no intervention")

    def attach_fused(self, engine: Any, examples: Sequence[Any], *, offsets: Sequence[int]) -> HookHandle:
        return engine.no_edit("no intervention")

    def scaled(self, c: float) -> "NoIntervention":
        return self

    def __add__(self, other: Any) -> InterventionSpec:
        if other is None:
            return self
        if isinstance(other, InterventionSpec):
            return other
        return NotImplemented

    def __repr__(self) -> str:
        return "NoIntervention()"


class Ablate(InterventionSpec):
    """Knock out heads (:func:`~focuslens.heads.patching.ablate_heads`): output ``hook_z`` set to 0 or a mean.

    Args:
        heads: ``(layer, head)`` query heads, in order.
        mode: ``"zero"`` or ``"mean"``.
        means: ``{(layer, head): Tensor[d_head]}`` (``mode="mean"``; e.g. from
            :func:`focuslens.heads.patching.head_means`), copied; their checksum is part of the identity.
    """

    kind = "ablate"
    __slots__ = ("heads", "mode", "means")

    def __init__(
        self,
        heads: Iterable[Sequence[int]],
        *,
        mode: Literal["zero", "mean"] = "zero",
        means: Mapping[tuple[int, int], Float[Tensor, "d_head"]] | None = None,
    ):
        what = "Ablate"
        self.heads = head_list(heads, what=what)
        if mode not in ("zero", "mean"):
            raise ValueError(f"{what}: mode must be 'zero' or 'mean', got {mode!r}.")
        self.mode = mode
        if mode == "mean":
            if means is None:
                raise ValueError(f"{what}(mode='mean') needs means={{(layer, head): Tensor[d_head]}} "
                                 "(focuslens.heads.patching.head_means).")
            m = frozen_vectors(means, what=f"{what} means")
            missing = [h for h in self.heads if h not in m]
            if missing:
                raise ValueError(f"{what}: means has no entry for heads {missing}.")
            self.means = MappingProxyType({h: m[h] for h in self.heads})
        elif means is not None:
            raise ValueError(f"{what}: means are only used with mode='mean'.")
        else:
            self.means = None
        self._freeze()

    def _ctor(self):
        return (self.heads,), {"mode": self.mode, "means": None if self.means is None else dict(self.means)}

    def _identity(self) -> dict[str, Any]:
        out: dict[str, Any] = {"heads": [list(h) for h in self.heads], "mode": self.mode}
        if self.means is not None:
            out["means"] = tensor_checksum(torch.stack([self.means[h] for h in self.heads]))
        return out

    def attach(self, model: HookedModel, example: Any = None) -> HookHandle:
        from ..heads.patching import ablate_heads

        means = None if self.means is None else dict(self.means)
        return ablate_heads(model, self.heads, mode=self.mode, means=means)

    def attach_fused(self, engine: Any, examples: Sequence[Any], *, offsets: Sequence[int]) -> HookHandle:
        """The heads' slices of the attention output (before ``o_proj``: ``hook_z``) set to 0 or the mean."""
        check_batch(examples, offsets, what="Ablate")
        return engine.ablate(self.heads, means=None if self.means is None else dict(self.means))

    def __repr__(self) -> str:
        return f"Ablate({format_heads(self.heads)}, {self.mode})"


class Compose(InterventionSpec):
    """Several specs applied together (``a + b``). Attaching is all-or-nothing.

    Nested compositions are flattened and :class:`NoIntervention` members dropped; a composition of
    one spec has that spec's identity, of none the identity of :class:`NoIntervention`. Members attach
    in order; if one fails, those already attached are removed before the error propagates.
    """

    kind = "compose"
    __slots__ = ("members",)

    def __init__(self, *specs: InterventionSpec | None):
        members: list[InterventionSpec] = []
        for s in specs:
            if s is None or isinstance(s, NoIntervention):
                continue
            if isinstance(s, Compose):
                members.extend(s.members)
            elif isinstance(s, InterventionSpec):
                members.append(s)
            else:
                raise TypeError(f"Compose takes intervention specs, got {type(s).__name__} "
                                "(wrap hooks or handles in a spec, or use focuslens.intervene.eager.compose).")
        self.members = tuple(members)
        self._freeze()

    @property
    def identity(self) -> dict[str, Any]:
        if len(self.members) == 1:
            return self.members[0].identity
        if not self.members:
            return NoIntervention().identity
        return super().identity

    def _identity(self) -> dict[str, Any]:
        return {"members": [m.identity for m in self.members]}

    def _ctor(self):
        return self.members, {}

    @property
    def per_example(self) -> bool:
        return any(m.per_example for m in self.members)

    def _all_or_nothing(self, attachers: Iterable[Callable[[], HookHandle]]) -> HookHandle:
        """Attach every member in order; if one raises, remove those already attached, then re-raise."""
        handles: list[HookHandle] = []
        try:
            for attach in attachers:
                handles.append(attach())
        except BaseException:
            remove_all(handles)
            raise
        return ComposedHandle(handles, label=repr(self))

    def attach(self, model: HookedModel, example: Any = None) -> HookHandle:
        return self._all_or_nothing((lambda m=m: m.attach(model, example)) for m in self.members)

    @property
    def batchable(self) -> bool:
        return all(m.batchable for m in self.members)

    def attach_batch(self, model: HookedModel, examples: Sequence[Any], *, offsets: Sequence[int]) -> HookHandle:
        """Every member's :meth:`attach_batch`, all-or-nothing like :meth:`attach`."""
        check_batch(examples, offsets, what="Compose")
        measured = self._measure(model, examples)
        return self._all_or_nothing(
            (lambda k=k, m=m: m.attach_measured(model, measured[k], examples, offsets=offsets) if k in measured
             else m.attach_batch(model, examples, offsets=offsets))
            for k, m in enumerate(self.members)
        )

    def _measure(self, model: HookedModel, examples: Sequence[Any]) -> dict[int, Any]:
        """The measuring members' measurements (:attr:`InterventionSpec.measures`: alpha="auto", calibration,
        locating), first, each row alone with the members before it attached for that row (as attach does)."""
        return {k: m.measure(model, examples, Compose(*self.members[:k]) if k else None)
                for k, m in enumerate(self.members) if m.measures}

    @property
    def fused(self) -> bool:
        return all(m.fused for m in self.members)

    def attach_fused(self, engine: Any, examples: Sequence[Any], *, offsets: Sequence[int]) -> HookHandle:
        """Every member's :meth:`attach_fused` in order, all-or-nothing like :meth:`attach`.

        Measuring members (:attr:`InterventionSpec.measures`) measure first, as in :meth:`attach_batch`: each
        row alone on the bridge the engine was built for (``engine.hooked``), with the members before it
        attached there; only their edits go on the engine."""
        check_batch(examples, offsets, what="Compose")
        if not self.members:
            return engine.no_edit("no intervention")
        measured = (self._measure(measuring_model(engine, "Compose"), examples)
                    if any(m.measures for m in self.members) else {})
        return self._all_or_nothing(
            (lambda k=k, m=m: m.attach_measured_fused(engine, measured[k], examples, offsets=offsets)
             if k in measured else m.attach_fused(engine, examples, offsets=offsets))
            for k, m in enumerate(self.members)
        )

    def scaled(self, c: float) -> "Compose":
        return Compose(*(m.scaled(c) for m in self.members))

    def __repr__(self) -> str:
        return "Compose(" + " + ".join(repr(m) for m in self.members) + ")" if self.members else "Compose()"


def _rebuild(cls: type, args: tuple, kwargs: dict[str, Any]) -> InterventionSpec:
    return cls(*args, **kwargs)


def as_spec(x: Any) -> InterventionSpec | None:
    """Normalise an optional spec: ``None``, ``NoIntervention()`` and ``Compose()`` → ``None``; a spec →
    itself; anything else → ``TypeError``."""
    if x is None or isinstance(x, NoIntervention):
        return None
    if isinstance(x, Compose) and not x.members:
        return None
    if isinstance(x, InterventionSpec):
        return x
    raise TypeError(f"expected an intervention spec (focuslens.intervene.specs) or None, got {type(x).__name__}.")


