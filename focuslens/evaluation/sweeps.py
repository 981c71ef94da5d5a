"""Sweeps and selection: choosing k and α on validation, random-head controls, one seed convention.

The CLI, the demo, the experiments and the notebooks all choose k and α and draw random heads here.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..core.generation import DEFAULT_MAX_NEW_TOKENS
from ..directions.artefact import FocusDirections
from ..engine import EngineChoice
from ..core.io import content_hash, tensor_checksum
from ..core.models import HookedModel, model_info

__all__ = ["select_alpha", "selection_record", "check_selection_grid", "AlphaSelection", "random_heads", "examples_identity"]


def random_heads(
    model_or_shape: HookedModel | tuple[int, int],
    k: int,
    *,
    seed: int,
    exclude: Iterable[Sequence[int]] = (),
    pool: Iterable[Sequence[int]] | None = None,
) -> list[tuple[int, int]]:
    """``k`` distinct random ``(layer, head)`` query heads: the random-heads control, one convention.

    Why one function: the CLI sweep, the demo and the experiments compare top-k contextual heads with
    k random heads; if each drew them its own way, "random seed 0" would mean different heads in each
    report. The draw is ``random.Random(seed).sample(pool, k)``, in the order drawn, over the pool
    minus ``exclude`` (e.g. the top-k heads, for a disjoint control); the pool is every head in
    layer-major order unless given (e.g. a ranking, to draw among ranked heads). This is the draw the
    published split-softmax control used (``experiments/split_softmax_sweep.py``, seeds 0, 1, 2).

    Args:
        model_or_shape: a hooked model, or ``(n_layers, n_heads)``.
        k: number of heads, ``1..len(pool)``.
        seed: the control's seed (keyword-only, so every call site names it).
        exclude: heads never drawn.
        pool: the candidate heads, in order (default: all heads, layer-major).
    """
    if isinstance(model_or_shape, tuple):
        n_layers, n_heads = (int(x) for x in model_or_shape)
    else:
        info = model_info(model_or_shape)
        n_layers, n_heads = info.n_layers, info.n_heads
    banned = {(int(l), int(h)) for l, h in exclude}
    cand = [(l, h) for l in range(n_layers) for h in range(n_heads)] if pool is None else \
        [(int(l), int(h)) for l, h in pool]
    bad = [h for h in cand if not (0 <= h[0] < n_layers and 0 <= h[1] < n_heads)]
    if bad:
        raise ValueError(f"random_heads: pool heads {bad[:3]} are outside the model's {n_layers} x {n_heads} heads.")
    pool = [h for h in cand if h not in banned]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(pool):
        raise ValueError(f"random_heads: k must be in 1..{len(pool)} (heads available after exclude); got {k!r}.")
    return random.Random(int(seed)).sample(pool, k)


def examples_identity(examples: Sequence[Any]) -> str:
    """A content hash of a list of examples (task records by their fields, rendered ones by tokens).

    Used to key stored results by the data as well as by the intervention, so that another data set
    written into the same folder gets its own files instead of a "different prompt" error or, worse,
    the first data set's answers.
    """
    parts = []
    for e in examples:
        tokens = getattr(getattr(e, "prompt", None), "tokens", None)
        if tokens is not None:
            parts.append({"variant": getattr(e, "variant", None), "tokens": tensor_checksum(tokens)})
        elif dataclasses.is_dataclass(e):
            parts.append(dataclasses.asdict(e))
        else:
            parts.append(repr(e))
    return content_hash(parts)


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

    def __repr__(self) -> str:
        """One line: the choice and the baseline (``.rows`` has every configuration)."""
        a = self.alpha if isinstance(self.alpha, str) else f"{self.alpha:g}"
        tgt = f", target={self.target:g}" if self.target is not None else ""
        return (f"AlphaSelection(k={self.k}, α={a}{tgt}, baseline={self.baseline:.3f}, "
                f"{len(self.rows)} configurations in .rows)")

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


def check_selection_grid(
    alphas: Sequence[float],
    ks: Sequence[int] | None,
    targets: Sequence[float],
    *,
    n_heads: int,
    names: Mapping[str, str] | None = None,
) -> tuple[list[float], list[int] | None, list[float]]:
    """The rules of a ``(k, α, target)`` selection grid, checked before anything runs.

    One definition for :func:`select_alpha` and the CLI's ``--select-*`` flags (which pass
    ``names`` so that the error names the flag): α finite and non-zero (α = 0 is the baseline) with at
    least one positive α to choose; each k in ``1..n_heads``; each magnitude-control target a fraction
    of sink mass in (0, 1).

    Args:
        names: labels for the messages: ``"alphas"``, ``"ks"``, ``"targets"``, ``"n_heads"`` (default:
            the parameter names and the number).

    Returns:
        ``(alphas, ks, targets)`` as lists of floats / ints (``ks`` None stays None: "all heads").

    Raises:
        ValueError: the first rule broken, naming the value.
    """
    lab = {"alphas": "alphas", "ks": "k", "targets": "targets", "n_heads": str(n_heads), **(names or {})}
    alphas = [float(a) for a in alphas]
    for a in alphas:
        if not math.isfinite(a):
            raise ValueError(f"{lab['alphas']} must be finite numbers, got {a}.")
    if not alphas or any(a == 0 for a in alphas) or not any(a > 0 for a in alphas):
        raise ValueError(f"{lab['alphas']} must be non-zero (α = 0 is the baseline) with at least one > 0 "
                         f"(a positive α to choose from); got {alphas}.")
    ks = None if ks is None else [int(k) for k in ks]
    for k in ks or ():
        if not 1 <= k <= n_heads:
            raise ValueError(f"{lab['ks']} must be in 1..{lab['n_heads']} (the number of heads with a direction); got {k}.")
    targets = [float(t) for t in targets]
    for t in targets:
        if not 0.0 < t < 1.0:
            raise ValueError(f"{lab['targets']} are fractions of sink mass to remove, in (0, 1); got {t}.")
    return alphas, ks, targets


def selection_record(output_dir: str | os.PathLike, tag: str, spec: Any, data_id: str, *,
                     max_new_tokens: int, chat: bool = True) -> Path:
    """The JSONL of one :func:`select_alpha` configuration: ``{tag}-{hash}.jsonl``, the hash covering the
    spec's identity, the examples (``data_id`` = :func:`examples_identity`), the decoding budget and
    ``chat`` (only when False: files written before it was a setting keep their names).

    Public so that a caller can read back a configuration's answers (e.g. to measure where its attention
    went) without re-deriving the naming rule.
    """
    key = content_hash({"intervene": None if spec is None else spec.identity, "data": data_id,
                        "max_new_tokens": max_new_tokens, **({} if chat else {"chat": False})})
    return Path(output_dir) / f"{tag}-{key[:12]}.jsonl"


def select_alpha(
    model: HookedModel,
    directions: FocusDirections,
    examples: Sequence[Any],
    *,
    alphas: Sequence[float] = (0.25, 0.5, 1.0, 2.0),
    ks: Sequence[int] | None = None,
    targets: Sequence[float] = (),
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    chat: bool = True,
    output_dir: str | os.PathLike | None = None,
    progress: bool = True,
    batch_size: int = 8,
    engine: EngineChoice = "auto",
) -> AlphaSelection:
    """Choose k (top heads) and α for ``directions`` by accuracy on validation examples.

    Why: the useful α depends on the objective and the vectors' norms (on SmolLM2, attention-objective
    vectors work at α = 0.5 and break at α = 1, likelihood vectors the other way round), so it must be
    chosen on held-out data — never on the test split. Every ``(k, α)`` in the grid is evaluated with
    greedy decoding and best-subspan EM (:func:`focuslens.evaluation.runner.evaluate`); the best accuracy wins,
    ties going to the smaller |α| and then the smaller k. Then, at the chosen k, each magnitude-control
    ``target`` (``alpha="auto"``, :func:`sink_target_alphas`) is evaluated; the best target is reported
    (it replaces the fixed α only if it is strictly better).

    Args:
        directions: trained directions (heads in rank order, so ``top(k)`` is the top-k subset).
        examples: validation :class:`~focuslens.tasks.TaskExample` records (disjoint from train and test).
        alphas: fixed α values to try (non-zero; negative values are allowed but are never chosen).
        ks: numbers of top heads to try (default: all heads only).
        targets: magnitude-control targets in (0, 1) to try at the chosen k (default: none).
        chat: render the examples in the model's chat template (``False`` for a base model without one).
        output_dir: keep one resumable JSONL per configuration there (``None``: in memory), named
            ``{name}-{hash}.jsonl`` where the hash covers the spec's identity (the directions'
            checksum and heads, α or the magnitude-control target), the examples and the decoding
            budget: selecting on other directions or other data into the same folder never reuses
            another configuration's records.
        batch_size: examples decoded together by :func:`~focuslens.evaluation.runner.evaluate`, also for
            the ``alpha="auto"`` targets (each row gets its own α, ``Steer.attach_batch``).
        engine: passed to :func:`~focuslens.evaluation.runner.evaluate` (``"auto"``: fixed α on the fused
            engine, ``alpha="auto"`` on the bridge; ``"eager"``: everything on the bridge).

    Returns:
        An :class:`AlphaSelection` (``.k``, ``.alpha``, ``.target``, ``.table()``).
    """
    from .runner import evaluate
    from ..directions.artefact import Steer

    if not examples:
        raise ValueError("select_alpha needs validation examples.")
    alphas, ks, targets = check_selection_grid(alphas, ks, targets, n_heads=len(directions))
    ks = [len(directions)] if ks is None else ks
    directions.check_model(model)
    out = Path(output_dir) if output_dir is not None else None

    data_id = examples_identity(examples) if out is not None else None

    def run(tag: str, spec: Steer | None) -> dict[str, Any]:
        path = None if out is None else selection_record(out, tag, spec, data_id, max_new_tokens=max_new_tokens,
                                                         chat=chat)
        res = evaluate(model, examples, max_new_tokens=max_new_tokens, chat=chat, intervene=spec, progress=progress,
                       output=path, tag=tag, batch_size=batch_size, engine=engine)
        s = res.summary()
        return {"n": s["n"], "accuracy": s["accuracy"], "stderr": s["accuracy_se"],
                "distractor_copy": s["distractor_copy"]}

    baseline = run("unmodified", None)["accuracy"]
    rows: list[dict[str, Any]] = []
    for k in ks:
        for a in alphas:
            rows.append({"k": k, "alpha": a, "target": None, **run(f"k{k}_a{a:g}", Steer(directions, k=k, alpha=a))})
    best = max((r for r in rows if r["alpha"] > 0), key=_selection_key)
    k, alpha, target = best["k"], best["alpha"], None
    if targets:
        auto = []
        for t in targets:
            spec = Steer(directions, k=k, alpha="auto", target=float(t))
            auto.append({"k": k, "alpha": "auto", "target": float(t), **run(f"k{k}_auto{t:g}", spec)})
        rows += auto
        best_auto = max(auto, key=lambda r: (round(r["accuracy"], 9), -r["target"]))
        target = best_auto["target"]
        if best_auto["accuracy"] > best["accuracy"]:
            alpha = "auto"
    return AlphaSelection(k=k, alpha=alpha, target=target, baseline=baseline, rows=rows)
