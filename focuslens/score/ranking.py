"""Contextual-score results and rankings: ``HeadScores``, ``DatasetScores``, ``contextual_heads``, ranking files.

The types every scorer returns (the TransformerLens path, the fused and nnsight backends,
``FocusLens``): ``[layer, head]`` tensors by span name, and their dataset means with standard errors,
ranked into the *contextual heads*. A ranking file is JSON (``focuslens.contextual_heads/v1``, with the
model fingerprint) or the authors' ``[[layer, head], ...]``; it is checked against a model on load.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor

from ..core.errors import UsageError
from ..core.io import atomic_write
from ..core.models import HookedModel, ModelInfo, model_info
from ..core.checks import Head, check_count, check_heads, head_list, is_index, read_json
from ..core.prompts import Span, SpanLike, normalise_spans

__all__ = ["HeadScores", "DatasetScores", "contextual_heads", "save_heads", "load_heads", "check_scores",
           "check_model_match", "RANKING_FORMAT", "DISTRACTORS_TOTAL", "DISTRACTORS_MAX"]

SpansLike = Union[SpanLike, Sequence[SpanLike]]

RANKING_FORMAT = "focuslens.contextual_heads/v1"

# Names of the aggregate distractor scores (each distractor also gets ``distractor_{i}``, 1-based).
DISTRACTORS_TOTAL = "distractors_total"
DISTRACTORS_MAX = "distractors_max"




def _summary(scores: dict[str, Tensor], n_names: int = 5, n_top: int = 3) -> str:
    """``"L×H heads, scores relevant, sink, …; top relevant L8H0 0.41, …"`` for a repr."""
    names = list(scores)
    shown = ", ".join(names[:n_names]) + (f", … ({len(names)})" if len(names) > n_names else "")
    key = "relevant" if "relevant" in scores else (names[0] if names else None)
    if key is None:
        return "no scores"
    t = scores[key]
    top = ", ".join(f"L{l}H{h} {v:.3g}" for l, h, v in _rank(t)[:n_top])
    return f"{t.shape[0]}×{t.shape[1]} heads, scores {shown}; top {key}: {top}"


@dataclass
class HeadScores:
    """Named ``[layer, head]`` attention masses of one sequence, from one forward pass.

    Attributes:
        scores: name -> ``[n_layers, n_heads]`` float32 tensor; ``s[l, h]`` is the mean over response
            rows of the attention mass head ``(l, h)`` puts on that span (a union for span lists).
            Common names: ``relevant``, ``sink``, ``distractor_1``.., ``distractors_total`` (mass on
            the union of all distractors), ``distractors_max`` (the largest single distractor's mass).
        columns: ``[n_layers, n_heads, pos]`` mean attention each key column receives from the response
            rows. Every score above is a sum of these over its columns; use :meth:`mass` for new spans.
        response: the response span (query rows).
        method: the route that computed it (``"qk"`` or ``"pattern"``).

    Scores are also attributes: ``hs.relevant`` is ``hs.scores["relevant"]``.
    """

    scores: dict[str, Float[Tensor, "layer head"]]
    columns: Float[Tensor, "layer head pos"]
    response: Span
    method: str
    spans: dict[str, list[Span]] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Tensor:
        scores = self.__dict__.get("scores")
        if scores is not None and name in scores:
            return scores[name]
        raise AttributeError(
            f"HeadScores has no score {name!r}; it has {list(scores or {})}. Pass the span to "
            "score_spans(..., spans={name: span}) or use .mass(span)."
        )

    def __getitem__(self, name: str) -> Tensor:
        return self.scores[name]

    def __contains__(self, name: str) -> bool:
        return name in self.scores

    @property
    def names(self) -> list[str]:
        return list(self.scores)

    @property
    def seq_len(self) -> int:
        return int(self.columns.shape[-1])

    def mass(self, span: SpansLike) -> Float[Tensor, "layer head"]:
        """Attention mass on another span (or union of spans) from the same pass, ``[layer, head]``."""
        spans = normalise_spans(span, seq_len=self.seq_len, before=self.response, name="span")
        return self.columns[..., union_mask(spans, self.seq_len)].sum(-1)

    def __repr__(self) -> str:
        """One line: shape, the score names and the top heads by ``relevant`` (not the tensors)."""
        return (f"HeadScores({_summary(self.scores)}; response {self.response.start}..{self.response.end} "
                f"of {self.seq_len} tokens, method={self.method})")


@dataclass
class DatasetScores:
    """Per-head scores averaged over a dataset, with standard errors and a ranking.

    Attributes:
        mean: name -> ``[n_layers, n_heads]`` mean over examples (plain mean, not filtered by
            correctness, as in the paper).
        stderr: name -> ``[n_layers, n_heads]`` standard error of that mean (``std / √n``, ddof 1).
        per_example: name -> ``[n, n_layers, n_heads]`` the example scores.
        n: number of scored examples; ``n_skipped`` examples had no usable response.
        responses: the response text of every scored example.
        indices: the position in the input list of every scored example (skipped ones are absent).
        response_mode: how responses were chosen ("generate", "gold", "gold_only", "callable", ...).
        model: the model's name; ``fingerprint`` its architecture (checked by :meth:`load` users).
    """

    mean: dict[str, Float[Tensor, "layer head"]]
    stderr: dict[str, Float[Tensor, "layer head"]]
    per_example: dict[str, Float[Tensor, "n layer head"]]
    n: int
    n_skipped: int = 0
    responses: list[str] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    response_mode: str = "generate"
    model: str = ""
    fingerprint: dict = field(default_factory=dict)

    def __getattr__(self, name: str) -> Tensor:
        mean = self.__dict__.get("mean")
        if mean is not None and name in mean:
            return mean[name]
        raise AttributeError(f"DatasetScores has no score {name!r}; it has {list(mean or {})}.")

    def __repr__(self) -> str:
        """One line: model, n, response mode, the score names and the top heads (not the tensors)."""
        skipped = f" ({self.n_skipped} skipped)" if self.n_skipped else ""
        return (f"DatasetScores({self.model or '?'}, n={self.n}{skipped}, response={self.response_mode}; "
                f"{_summary(self.mean)})")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.mean["relevant"].shape)  # type: ignore[return-value]

    def ranking(self, name: str = "relevant") -> list[tuple[int, int, float]]:
        """All heads as ``(layer, head, mean score)``, best first (ties broken by layer, then head)."""
        return _rank(_named(self.mean, name))

    def top_k(self, k: int = 20, name: str = "relevant") -> list[Head]:
        """The ``k`` best heads as ``(layer, head)`` pairs."""
        return [(l, h) for l, h, _ in self.ranking(name)[:_check_k(k, _named(self.mean, name))]]

    def to_json(self) -> dict:
        rel = self.mean["relevant"]
        se = self.stderr["relevant"]
        return {
            "format": RANKING_FORMAT,
            "model": self.model,
            "fingerprint": self.fingerprint,
            "n": self.n,
            "n_skipped": self.n_skipped,
            "response_mode": self.response_mode,
            "ranking": [[l, h, s, float(se[l, h])] for l, h, s in _rank(rel)],
            "top_20": [list(x) for x in self.top_k(min(20, rel.numel()))],
            "mean": {k: v.tolist() for k, v in self.mean.items()},
            "stderr": {k: v.tolist() for k, v in self.stderr.items()},
            "responses": self.responses,
            "indices": self.indices,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the ranking and all mean/stderr tensors as JSON, atomically (temp file + rename)."""
        return atomic_write(Path(path), json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike, *, model: HookedModel | ModelInfo | None = None) -> "DatasetScores":
        """Read what :meth:`save` wrote (per-example scores are not saved: ``per_example`` is empty).

        Raises :class:`~focuslens.core.errors.UsageError` naming the file for anything that is not such a
        ranking (not JSON, another format, missing or malformed ``mean``/``stderr``/``n``, tables whose
        shape is not the ``n_layers x n_heads`` of the file's own fingerprint), and, with ``model=``, for a
        ranking of another model (:func:`check_scores`).
        """
        data = _read_json(path)
        if not isinstance(data, dict) or data.get("format") != RANKING_FORMAT:
            raise UsageError(
                f"{path} is not a focuslens ranking ({RANKING_FORMAT}); for a plain list of heads "
                "(the authors' relevant_heads.json) use load_heads()."
            )
        fix = "re-run `focuslens score` to write it again"
        try:
            mean = {k: torch.tensor(v, dtype=torch.float32) for k, v in data["mean"].items()}
            stderr = {k: torch.tensor(v, dtype=torch.float32) for k, v in data["stderr"].items()}
            n = data["n"]
            if not isinstance(n, int) or isinstance(n, bool) or "relevant" not in mean:
                raise ValueError("'n' must be an int and 'mean' must have 'relevant'")
            if any(t.dim() != 2 for t in (*mean.values(), *stderr.values())):
                raise ValueError("every mean/stderr entry must be a [layer, head] table")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UsageError(f"{path}: malformed ranking file ({type(e).__name__}: {e}); {fix}.") from None
        fp = data.get("fingerprint", {})
        fp = dict(fp) if isinstance(fp, dict) else {}
        shapes = sorted({tuple(t.shape) for t in (*mean.values(), *stderr.values())})
        own = (fp.get("n_layers"), fp.get("n_heads"))
        if len(shapes) > 1 or (all(isinstance(x, int) for x in own) and shapes[0] != own):
            raise UsageError(
                f"{path}: malformed ranking file: its [layer, head] tables have shape(s) "
                f"{', '.join(' x '.join(map(str, sh)) for sh in shapes)} but its own fingerprint says "
                f"{own[0]} layers x {own[1]} heads (model {data.get('model', '')!r}); {fix}.")
        ds = cls(mean=mean, stderr=stderr, per_example={}, n=n,
                 n_skipped=int(data.get("n_skipped", 0) or 0), responses=list(data.get("responses", [])),
                 indices=list(data.get("indices", [])),
                 response_mode=str(data.get("response_mode", "")), model=str(data.get("model", "")),
                 fingerprint=fp)
        if model is not None:
            check_scores(ds, model, what=str(path))
        return ds


def _rank(scores: Float[Tensor, "layer head"]) -> list[tuple[int, int, float]]:
    """``(layer, head, score)`` best first; ties by position; NaN scores always last (never "best")."""
    n_heads = scores.shape[1]
    flat = scores.flatten().tolist()
    order = sorted(range(len(flat)), key=lambda i: (math.isnan(flat[i]), -flat[i] if not math.isnan(flat[i]) else 0.0, i))
    return [(i // n_heads, i % n_heads, float(flat[i])) for i in order]


def _check_k(k: int, scores: Tensor) -> int:
    """A count of heads, ``1..n_layers*n_heads`` (bools and floats refused: :func:`check_count`)."""
    return check_count(k, name="k", what="top-k heads", upper=scores.numel())


def _named(tables: dict[str, Tensor], name: str) -> Tensor:
    """The table ``name``; an unknown name is a clear error listing the names there are."""
    if name not in tables:
        raise ValueError(f"name={name!r}: these scores have no {name!r} table; they have {list(tables)}.")
    return tables[name]


def contextual_heads(
    scores: DatasetScores | HeadScores | Float[Tensor, "layer head"], k: int = 20, *, name: str = "relevant"
) -> list[Head]:
    """The top-``k`` heads by contextual score as ``(layer, head)`` pairs, best first (paper default k=20)."""
    if isinstance(scores, (DatasetScores, HeadScores)):
        t = _named(scores.mean if isinstance(scores, DatasetScores) else scores.scores, name)
    elif isinstance(scores, Tensor):
        t = scores
    else:
        raise TypeError(f"contextual_heads takes DatasetScores, HeadScores or a [layer, head] tensor, got {type(scores).__name__}.")
    if t.dim() != 2:
        raise ValueError(f"scores must be [layer, head], got shape {tuple(t.shape)}.")
    return [(l, h) for l, h, _ in _rank(t)[:_check_k(k, t)]]


def save_heads(heads: Iterable[Sequence[int]], path: str | os.PathLike) -> Path:
    """Write heads in the authors' ``relevant_heads.json`` format (``[[layer, head], ...]``), atomically."""
    out = [[l, h] for l, h in head_list(heads, what="save_heads")]  # ints only: a float is never truncated
    return atomic_write(Path(path), json.dumps(out))


def load_heads(path: str | os.PathLike, *, k: int | None = None, model: HookedModel | None = None) -> list[Head]:
    """Read a head list: the authors' ``[[layer, head], ...]`` or a focuslens ranking JSON.

    Args:
        k: keep the first ``k`` heads (a ranking file has all of them, best first).
        model: when given, the heads are validated against it (:func:`~focuslens.check_heads`).
    """
    data = _read_json(path)
    if isinstance(data, dict):
        if data.get("format") != RANKING_FORMAT or not isinstance(data.get("ranking"), list):
            raise UsageError(f"{path}: expected [[layer, head], ...] or a focuslens ranking JSON "
                             "(written by `focuslens score`).")
        saved = data.get("fingerprint")
        if not isinstance(saved, dict):
            raise UsageError(
                f"{path}: 'fingerprint' must be the ranked model's architecture object, got {saved!r}, so the "
                "ranking cannot be checked against a model; re-run `focuslens score`, or give the heads as a "
                "plain [[layer, head], ...] list.")
        if model is not None:
            check_model_match(model, what=str(path), fingerprint=saved, source_model=str(data.get("model", "")),
                              fix="Rank this model's heads with `focuslens score --model ...` first.")
        rows = [r[:2] if isinstance(r, (list, tuple)) else r for r in data["ranking"]]
    elif isinstance(data, list):
        rows = data
    else:
        raise UsageError(f"{path}: expected [[layer, head], ...], got {type(data).__name__}.")
    heads: list[Head] = []
    for r in rows:
        if not (isinstance(r, (list, tuple)) and len(r) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in r)):
            raise UsageError(f"{path}: every entry must be a [layer, head] pair of ints, got {r!r}.")
        heads.append((int(r[0]), int(r[1])))
    if not heads:
        raise UsageError(f"{path} lists no heads.")
    if k is not None:
        if not is_index(k) or not 1 <= k <= len(heads):
            raise UsageError(f"k={k!r} but {path} lists {len(heads)} heads: give an int k in 1..{len(heads)}.")
        heads = heads[:int(k)]
    if model is not None:
        heads = check_heads(model, heads)
    return heads


# --------------------------------------------------------------------------------------------------
# Every table knows its model: the one check of every route (FocusLens, load_heads, DatasetScores.load,
# the figures given a model, the CLI)
# --------------------------------------------------------------------------------------------------

SCORE_FIX = ("Score this model first (`focuslens score --model ...` or lens.score_dataset(examples)), or use "
             "the ranking written for it.")


def _known(v: object) -> bool:
    """A fingerprint value that says something (a backend's ``ModelInfo`` has 0 for what it cannot read)."""
    return v is not None and (isinstance(v, bool) or v != 0)


def check_model_match(model: HookedModel | ModelInfo, *, what: str, shape: Sequence[int] | None = None,
                      fingerprint: dict | None = None, source_model: str = "", fix: str = SCORE_FIX,
                      relation: str = "ranks the heads of") -> None:
    """Refuse what was computed on another model: a ``[layer, head]`` table whose ``shape`` is not the model's
    ``(n_layers, n_heads)``, or a saved ``fingerprint`` that differs from the model's in a field.

    The one rule behind every route that puts a scores table or a ranking next to a model
    (:func:`check_scores`, :func:`load_heads`, :meth:`DatasetScores.load`, ``FocusLens.use_scores`` /
    ``heads`` / ``heatmap``, :func:`~focuslens.plot.figures.head_heatmap` given ``model=``, the CLI).
    Without it a 30 × 9 ranking picks heads such as (24, 5) for a 2 × 4 model, and a heatmap draws one
    model's table under another model's name.

    ``relation`` words the link (``"ranks the heads of"``; focus directions: ``"was learned on"``).

    Raises:
        UsageError: naming both shapes (layers × heads) and both model names where known, and ``fix``.
    """
    info = model if isinstance(model, ModelInfo) else model_info(model)
    here = (info.n_layers, info.n_heads)
    name = f"{info.name!r}" if info.name else "this model"
    src = f" ({source_model!r})" if source_model else ""
    if shape is not None and tuple(int(x) for x in shape) != here:
        there = tuple(int(x) for x in shape)
        raise UsageError(
            f"{what} {relation} another model{src}: its [layer, head] table has shape {there} = {there[0]} layers "
            f"x {there[1]} heads, but {name} has {here} = {here[0]} layers x {here[1]} heads. {fix}")
    if fingerprint:
        actual = info.fingerprint()
        diff = [k for k in sorted(set(fingerprint) | set(actual))
                if _known(actual.get(k)) and fingerprint.get(k) != actual.get(k)]
        if diff:
            raise UsageError(
                f"{what} {relation} another model{src}: it differs from {name} in "
                + ", ".join(f"{k}={fingerprint.get(k)!r} there, {actual.get(k)!r} here" for k in diff)
                + f" (there {fingerprint.get('n_layers', '?')} layers x {fingerprint.get('n_heads', '?')} heads, "
                f"here {here[0]} x {here[1]}). {fix}")


def check_scores(scores: "DatasetScores | HeadScores | Tensor", model: HookedModel | ModelInfo, *,
                 what: str = "the scores") -> None:
    """:func:`check_model_match` of a scores object: every ``[layer, head]`` table of a
    :class:`DatasetScores` (and its fingerprint and model name) or :class:`HeadScores`, or one tensor."""
    if isinstance(scores, DatasetScores):
        tables = [*scores.mean.values(), *scores.stderr.values()]
        fp, src = scores.fingerprint, scores.model
    elif isinstance(scores, HeadScores):
        tables, fp, src = list(scores.scores.values()), None, ""
    else:
        tables, fp, src = [torch.as_tensor(scores)], None, ""
    for t in tables:
        if t.dim() != 2:
            raise UsageError(f"{what} must be [layer, head] tables, got shape {tuple(t.shape)}.")
        check_model_match(model, what=what, shape=tuple(t.shape), fingerprint=fp, source_model=src)
    if not tables:
        check_model_match(model, what=what, fingerprint=fp, source_model=src)


def _read_json(path: str | os.PathLike):
    """JSON of a user-given file; every failure is a :class:`UsageError` naming the file."""
    return read_json(path, what="a ranking JSON written by `focuslens score` or [[layer, head], ...]")


def union_mask(spans: list[Span], seq_len: int) -> Tensor:
    mask = torch.zeros(seq_len, dtype=torch.bool)
    for s in spans:
        mask[s.start:s.end] = True
    return mask
