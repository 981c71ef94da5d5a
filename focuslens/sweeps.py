"""Sweeps and selection: choosing k and α on validation, random-head controls, one seed convention.

The CLI, the demo, the experiments and the notebooks all choose k and α and draw random heads here.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence


from .generation import DEFAULT_MAX_NEW_TOKENS
from .directions.artefact import FocusDirections
from .models import HookedModel

__all__ = ["select_alpha", "AlphaSelection"]


@dataclass
class AlphaSelection:
    """What :func:`select_alpha` measured and chose.

    Attributes:
        k, alpha: the chosen number of top heads and fixed α (``alpha`` is ``"auto"`` when the
            magnitude control won and ``prefer_fixed`` is False).
        target: the best magnitude-control target (``None`` when no target was tried).
        baseline: validation accuracy of the unmodified model.
        rows: one dict per configuration: ``k``, ``alpha`` (number or ``"auto"``), ``target``,
            ``accuracy``, ``stderr``, ``distractor_copy``, ``n``.
    """

    k: int
    alpha: float | str
    target: float | None
    baseline: float
    rows: list[dict[str, Any]]

    @property
    def best_fixed(self) -> dict[str, Any]:
        """The best row with a fixed positive α (what was chosen unless the magnitude control won)."""
        return max((r for r in self.rows if r["alpha"] != "auto" and r["alpha"] > 0), key=_selection_key)

    def table(self) -> str:
        """The grid as markdown (validation accuracy ± binomial standard error)."""
        lines = ["| k | α | target | n | accuracy | distractor copy |", "|---|---|---|---|---|---|",
                 f"| – | 0 (unmodified) | – | {self.rows[0]['n'] if self.rows else 0} | {self.baseline:.3f} | – |"]
        for r in self.rows:
            t = "–" if r["target"] is None else f"{r['target']:g}"
            a = r["alpha"] if isinstance(r["alpha"], str) else f"{r['alpha']:g}"
            lines.append(f"| {r['k']} | {a} | {t} | {r['n']} | {r['accuracy']:.3f} ± {r['stderr']:.3f} | "
                         f"{r['distractor_copy']:.2f} |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"k": self.k, "alpha": self.alpha, "target": self.target, "baseline": self.baseline,
                "rows": self.rows}


def _selection_key(r: Mapping[str, Any]) -> tuple:
    # best accuracy; ties → the weaker intervention (smaller |α|, then fewer heads)
    a = 0.0 if r["alpha"] == "auto" else abs(float(r["alpha"]))
    return (round(float(r["accuracy"]), 9), -a, -int(r["k"]))


def select_alpha(
    model: HookedModel,
    directions: FocusDirections,
    examples: Sequence[Any],
    *,
    alphas: Sequence[float] = (0.25, 0.5, 1.0, 2.0),
    ks: Sequence[int] | None = None,
    targets: Sequence[float] = (),
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    output_dir: str | os.PathLike | None = None,
    progress: bool = True,
    batch_size: int = 8,
) -> AlphaSelection:
    """Choose k (top heads) and α for ``directions`` by accuracy on validation examples.

    Why: the useful α depends on the objective and the vectors' norms (on SmolLM2, attention-objective
    vectors work at α = 0.5 and break at α = 1, likelihood vectors the other way round), so it must be
    chosen on held-out data — never on the test split. Every ``(k, α)`` in the grid is evaluated with
    greedy decoding and best-subspan EM (:func:`focuslens.evaluation.evaluate`); the best accuracy wins,
    ties going to the smaller |α| and then the smaller k. Then, at the chosen k, each magnitude-control
    ``target`` (``alpha="auto"``, :func:`sink_target_alphas`) is evaluated; the best target is reported
    (it replaces the fixed α only if it is strictly better).

    Args:
        directions: trained directions (heads in rank order, so ``top(k)`` is the top-k subset).
        examples: validation :class:`~focuslens.tasks.TaskExample` records (disjoint from train and test).
        alphas: fixed α values to try (non-zero; negative values are allowed but are never chosen).
        ks: numbers of top heads to try (default: all heads only).
        targets: magnitude-control targets in (0, 1) to try at the chosen k (default: none).
        output_dir: keep one resumable JSONL per configuration there (``None``: in memory).

    Returns:
        An :class:`AlphaSelection` (``.k``, ``.alpha``, ``.target``, ``.table()``).
    """
    from .evaluation import evaluate

    if not examples:
        raise ValueError("select_alpha needs validation examples.")
    alphas = [float(a) for a in alphas]
    if not alphas or any(a == 0 or not math.isfinite(a) for a in alphas):
        raise ValueError(f"alphas must be non-empty, finite and non-zero (α = 0 is the baseline); got {alphas}.")
    if not any(a > 0 for a in alphas):
        raise ValueError(f"select_alpha needs at least one positive α to choose from; got {alphas}.")
    ks = [len(directions)] if ks is None else [int(k) for k in ks]
    for k in ks:
        if not 1 <= k <= len(directions):
            raise ValueError(f"k must be in 1..{len(directions)} (the number of heads with a direction); got {k}.")
    for t in targets:
        if not 0.0 < t < 1.0:
            raise ValueError(f"targets are fractions of sink mass to remove, in (0, 1); got {t}.")
    directions.check_model(model)
    out = Path(output_dir) if output_dir is not None else None

    def run(tag: str, intervene: Any) -> dict[str, Any]:
        res = evaluate(model, examples, max_new_tokens=max_new_tokens, intervene=intervene, progress=progress,
                       output=None if out is None else out / f"{tag}.jsonl", tag=tag, batch_size=batch_size)
        s = res.summary()
        return {"n": s["n"], "accuracy": s["accuracy"], "stderr": s["accuracy_se"],
                "distractor_copy": s["distractor_copy"]}

    baseline = run("unmodified", None)["accuracy"]
    rows: list[dict[str, Any]] = []
    for k in ks:
        dk = directions.top(k)
        for a in alphas:
            with dk.apply(model, alpha=a) as h:
                rows.append({"k": k, "alpha": a, "target": None, **run(f"k{k}_a{a:g}", h)})
    best = max((r for r in rows if r["alpha"] > 0), key=_selection_key)
    k, alpha, target = best["k"], best["alpha"], None
    if targets:
        dk = directions.top(k)
        auto = []
        for t in targets:
            auto.append({"k": k, "alpha": "auto", "target": float(t), **run(
                f"k{k}_auto{t:g}", lambda r, t=t: dk.apply(model, alpha="auto", tokens=r.prompt.tokens, target=t))})
        rows += auto
        best_auto = max(auto, key=lambda r: (round(r["accuracy"], 9), -r["target"]))
        target = best_auto["target"]
        if best_auto["accuracy"] > best["accuracy"]:
            alpha = "auto"
    return AlphaSelection(k=k, alpha=alpha, target=target, baseline=baseline, rows=rows)
