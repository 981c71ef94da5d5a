"""The configuration of a focus-direction training run: one frozen, validated, hashable value."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["TrainConfig", "Objective", "Method", "CachePrecision"]

Objective = Literal["attention", "likelihood", "both"]
Method = Literal["batched", "per_layer"]
CachePrecision = Literal["model", "bfloat16"]

_LIVE = ("likelihood", "both")


# --------------------------------------------------------------------------------------------------
# The configuration


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of one focus-direction training run (what :func:`train_focus_directions` trains with).

    ``None`` means "the default for this objective/method"; :meth:`resolved` fills those in and blanks
    the settings the chosen objective/method does not use, so that a resolved config says exactly
    what was trained (it is what the summary and the checkpoint identity record).

    Attributes:
        objective: ``"attention"`` (paper; cached q/k), ``"likelihood"`` (live model, response
            log-likelihood) or ``"both"`` (likelihood + ``attention_weight`` × live attention mass).
        method: attention objective only. ``"batched"``: all heads jointly, full-batch AdamW for
            ``steps`` steps. ``"per_layer"``: the authors' loop, one layer at a time, batch 1, AdamW
            for ``epochs`` — the reference.
        alpha: the α used in training (the paper trains with α = 1).
        lr: learning rate (defaults: batched 0.05; per_layer 1e-3; likelihood/both 1e-2).
        steps: full-batch steps (batched attention; default 300).
        epochs: passes over the data: per_layer (default 10) and the live objectives (default 5).
        init_std: initialisation N(0, init_std²) (paper: 0.01).
        max_norm: norm limit per head after each step: a positive number, ``"query"`` (the mean norm
            of that head's cached response-row queries) or None (no limit).
        weight_decay: AdamW/Adam weight decay (defaults: per_layer 0.01, otherwise 0).
        patience: early stopping after this many validations without improvement (None: never;
            batched attention and live objectives, with validation examples).
        eval_every: batched attention: validate every this many steps (default 10).
        live_eval_every: live objectives: also validate every this many training examples (None:
            once per epoch only).
        attention_weight: objective ``"both"``: weight of the attention-mass term (default 1).
        seed: initialisation and example order.
        cache_precision: the frozen forward passes that cache q/k (attention objective, and
            ``max_norm="query"``). ``"model"``: the model's own dtype (exact; the default).
            ``"bfloat16"``: under ``torch.autocast`` in bfloat16 when the model is float32 — 2.2–2.6×
            faster on CPUs with AMX and on GPUs, but emulated and several times slower on CPUs without
            AMX / AVX-512 BF16 (``focuslens.core.models.cpu_lacks_fast``; a ``RuntimeWarning`` says so); the cached q/k carry bfloat16 rounding (~3
            significant digits) into training only, the optimiser itself runs in float32, and the
            trained vectors are applied at the model's dtype. Part of the run's identity.
    """

    objective: Objective = "attention"
    method: Method | None = "batched"
    alpha: float = 1.0
    lr: float | None = None
    steps: int | None = 300
    epochs: int | None = None
    init_std: float = 0.01
    max_norm: float | Literal["query"] | None = "query"
    weight_decay: float | None = None
    patience: int | None = None
    eval_every: int | None = 10
    live_eval_every: int | None = None
    attention_weight: float | None = 1.0
    seed: int = 0
    cache_precision: CachePrecision = "model"

    def __post_init__(self) -> None:
        def fix(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if self.objective not in ("attention", "likelihood", "both"):
            raise ValueError(f"objective must be 'attention', 'likelihood' or 'both'; got {self.objective!r}.")
        if self.method is not None and self.method not in ("batched", "per_layer"):
            raise ValueError(f"method must be 'batched' or 'per_layer' (attention objective; ignored by the "
                             f"live objectives); got {self.method!r}.")
        # numbers that must be finite (any sign)
        for name, hint in (("alpha", "e.g. 1.0, the paper's training value"),
                           ("attention_weight", "e.g. 1.0, or None for the default")):
            v = getattr(self, name)
            if v is None and name == "attention_weight":
                continue
            if not _is_real(v) or not math.isfinite(float(v)):
                raise ValueError(f"{name} must be a finite number ({hint}); got {v!r}.")
            fix(name, float(v))
        # numbers that must be > 0 or >= 0, None allowed where a default exists
        for name, positive, none_ok, hint in (
            ("lr", True, True, "e.g. 0.01; None gives 0.05 batched, 1e-3 per_layer, 1e-2 live"),
            ("init_std", False, False, "e.g. 0.01, the paper's value"),
            ("weight_decay", False, True, "e.g. 0.01; None gives 0.01 per_layer, 0 otherwise"),
        ):
            v = getattr(self, name)
            if v is None and none_ok:
                continue
            bad = not _is_real(v) or not math.isfinite(float(v)) or (float(v) <= 0 if positive else float(v) < 0)
            if bad:
                rel = "> 0" if positive else ">= 0"
                raise ValueError(f"{name} must be a finite number {rel} ({hint}); got {v!r}.")
            fix(name, float(v))
        # max_norm
        if self.max_norm is not None and self.max_norm != "query":
            v = self.max_norm
            if not _is_real(v) or not math.isfinite(float(v)) or float(v) <= 0:
                raise ValueError(f"max_norm must be a number > 0, 'query' (the mean query norm of each head) or "
                                 f"None (no limit); got {v!r}.")
            fix("max_norm", float(v))
        # counts
        for name, hint in (("steps", "full-batch steps of the batched method, e.g. 300"),
                           ("epochs", "passes over the data, e.g. 5"),
                           ("patience", "validations without improvement before stopping, or None: never"),
                           ("eval_every", "steps between validations of the batched method, e.g. 10"),
                           ("live_eval_every", "training examples between validations, or None: once per epoch")):
            v = getattr(self, name)
            if v is None:
                continue
            if not _is_int(v) or int(v) < 1:
                raise ValueError(f"{name} must be an integer >= 1 or None ({hint}); got {v!r}.")
            fix(name, int(v))
        if self.cache_precision not in ("model", "bfloat16"):
            raise ValueError(f"cache_precision must be 'model' (the model's dtype, exact) or 'bfloat16' (autocast, "
                             f"faster on AMX CPUs and GPUs); got {self.cache_precision!r}.")
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an integer, e.g. 0; got {self.seed!r}.")
        fix("seed", int(self.seed))

    @property
    def live(self) -> bool:
        """True for the objectives trained through the live model (likelihood, both)."""
        return self.objective in _LIVE

    def resolved(self) -> TrainConfig:
        """Defaults filled in for this objective/method; settings it does not use set to None."""
        if self.live:
            return dataclasses.replace(
                self, method=None, lr=self.lr if self.lr is not None else 1e-2,
                epochs=self.epochs if self.epochs is not None else 5, steps=None, eval_every=None,
                weight_decay=self.weight_decay if self.weight_decay is not None else 0.0,
                attention_weight=(self.attention_weight if self.attention_weight is not None else 1.0)
                if self.objective == "both" else None)
        if (self.method or "batched") == "batched":
            return dataclasses.replace(
                self, method="batched", lr=self.lr if self.lr is not None else 0.05, epochs=None,
                steps=self.steps if self.steps is not None else 300,
                eval_every=self.eval_every if self.eval_every is not None else 10,
                weight_decay=self.weight_decay if self.weight_decay is not None else 0.0,
                live_eval_every=None, attention_weight=None)
        return dataclasses.replace(  # per_layer: no validation inside, so no patience/eval settings
            self, method="per_layer", lr=self.lr if self.lr is not None else 1e-3,
            epochs=self.epochs if self.epochs is not None else 10, steps=None, eval_every=None,
            weight_decay=self.weight_decay if self.weight_decay is not None else 0.01,
            patience=None, live_eval_every=None, attention_weight=None)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (in field order)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]
