"""Answer metrics for distraction tasks: best-subspan EM (as *Lost in the Middle*), copies, positions.

Which one should you use?
-------------------------
* :func:`best_subspan_em` — the headline metric, exactly as LitM computes it: the prediction is cut
  to its first line, prediction and gold answers are normalised (lower case, punctuation to spaces,
  articles dropped, whitespace collapsed), and the score is 1 if any normalised gold answer is a
  substring of the normalised prediction. Robust to verbose answers ("The capital of X is Y.").
* :func:`substring_match` — a looser check on the *whole* response (no first-line cut):
  case-insensitive substring of a raw gold answer. Use it to spot answers that came after a newline.
* :func:`distractor_copy` — 1 if the (first-line, normalised) prediction contains the answer that a
  distractor states: the signature failure of distraction (the model read the wrong document).
* :func:`accuracy_by_position` — accuracy per gold position (the "lost in the middle" U-curve).
* :func:`mean_se` — mean and standard error of 0/1 scores, for honest error bars.

One deliberate deviation from LitM: leading whitespace is stripped *before* the first-line cut, so
an answer that starts with a newline (``"\\nParis"``) is read as ``"Paris"`` (LitM would read an
empty line). With chat templates this never matters for the models tested here.
"""

from __future__ import annotations

import math
import re
import string
from typing import Iterable, Mapping, NamedTuple, Sequence

__all__ = [
    "normalize_answer",
    "first_line",
    "best_subspan_em",
    "substring_match",
    "distractor_copy",
    "clean_distractor_answers",
    "mean_se",
    "paired_difference",
    "PairedDifference",
    "accuracy_by_position",
]

_PUNCT = set(string.punctuation + "‘’´`")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """LitM/SQuAD normalisation: ``_``→space, lower case, punctuation→space, drop a/an/the, collapse spaces."""
    s = s.replace("_", " ").lower()
    s = "".join(" " if ch in _PUNCT else ch for ch in s)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split()).strip()


def first_line(prediction: str) -> str:
    """The first line of a response, after leading whitespace (what the metrics read)."""
    return prediction.lstrip().split("\n", 1)[0].strip()


def best_subspan_em(prediction: str, answers: Sequence[str] | str) -> float:
    """1.0 if any normalised gold answer is a substring of the normalised first line, else 0.0.

    Example:
        >>> best_subspan_em("The capital of Veloria is Quentor.\\nMore text", ["Quentor"])
        1.0
        >>> best_subspan_em("I think it is Pell", ["Quentor"])
        0.0
    """
    if isinstance(answers, str):
        answers = [answers]
    pred = normalize_answer(first_line(prediction))
    for a in answers:
        na = normalize_answer(a)
        if na and na in pred:
            return 1.0
    return 0.0


def substring_match(prediction: str, answers: Sequence[str] | str) -> float:
    """1.0 if any gold answer occurs (case-insensitively, raw) anywhere in the whole response."""
    if isinstance(answers, str):
        answers = [answers]
    p = prediction.lower()
    return float(any(a.strip() and a.strip().lower() in p for a in answers))


def clean_distractor_answers(distractor_answers: Iterable[str], answers: Sequence[str]) -> list[str]:
    """Distractor answers that can be told apart from the gold ones.

    A distractor answer whose normalised form contains, or is contained in, a normalised gold
    answer is dropped (a copy of it would be indistinguishable from a correct answer).
    """
    golds = [normalize_answer(a) for a in answers]
    out: list[str] = []
    for d in distractor_answers:
        nd = normalize_answer(d)
        if not nd or any(g and (nd in g or g in nd) for g in golds):
            continue
        if d not in out:
            out.append(d)
    return out


def distractor_copy(prediction: str, distractor_answers: Sequence[str], answers: Sequence[str] = ()) -> float:
    """1.0 if the normalised first line contains a distractor's answer (see :func:`clean_distractor_answers`).

    A prediction can be both correct and a copy ("Quentor, or maybe Pell"); the two metrics are
    independent.
    """
    pred = normalize_answer(first_line(prediction))
    for d in clean_distractor_answers(distractor_answers, answers):
        if normalize_answer(d) in pred:
            return 1.0
    return 0.0


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error (sample standard deviation / √n; 0 for n ≤ 1; NaN mean for n = 0)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(values) / n
    if n == 1:
        return m, 0.0
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(var / n)


class PairedDifference(NamedTuple):
    """``a − b`` over paired examples: mean, its paired SE, n, and the examples where a won / lost."""

    mean: float
    se: float
    n: int
    wins: int
    losses: int


def paired_difference(a: Sequence[float], b: Sequence[float]) -> PairedDifference:
    """Mean difference ``a − b`` on the examples both lists cover (their shared prefix: records grow by
    appending the same examples), with the **paired** SE (:func:`mean_se` of the per-example
    differences). Why paired: two conditions on the same examples share the examples' difficulty, so
    the SE of the difference is far below the two accuracies' SEs combined.

    The one rule for "Δ accuracy ± SE vs unmodified" in every experiment table.
    """
    n = min(len(a), len(b))
    d = [float(a[i]) - float(b[i]) for i in range(n)]
    m, se = mean_se(d)
    return PairedDifference(m, se, n, sum(x > 0 for x in d), sum(x < 0 for x in d))


def accuracy_by_position(
    records: Iterable[Mapping], *, key: str = "em", position_key: str = "gold_position"
) -> dict[int, dict[str, float]]:
    """``{gold_position: {"accuracy", "se", "n"}}`` over records (dicts with ``em`` and ``gold_position``).

    Records without a gold position (the ``"negative"`` variant) are skipped.
    """
    groups: dict[int, list[float]] = {}
    for r in records:
        pos = r.get(position_key)
        if pos is None:
            continue
        groups.setdefault(int(pos), []).append(float(r[key]))
    out = {}
    for pos in sorted(groups):
        m, se = mean_se(groups[pos])
        out[pos] = {"accuracy": m, "se": se, "n": len(groups[pos])}
    return out
