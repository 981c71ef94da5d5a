"""Head finders behind one interface: contextual, retrieval, query-focused retrieval and patching scores.

Why this module exists
----------------------
The literature names several families of "heads that read the context", each found by its own
recipe in its own repository. To compare them (and to steer with each family's heads on equal terms)
they must be computed on the *same* examples and returned as the *same* result. Every finder here
takes labelled :class:`~focuslens.tasks.RenderedExample` s (or task records) and returns a
:class:`~focuslens.score.ranking.DatasetScores` whose ``mean["relevant"]`` is the finder's ``[layer, head]``
score (higher = more of that family's behaviour) with ``stderr`` and ``per_example``; ``response_mode``
names the finder. So ``contextual_heads(result, 20)``, ``result.top_k(20)``, ``result.save(path)``,
``DatasetScores.load`` and :func:`focuslens.plot.figures.head_heatmap` work unchanged for every finder.

Finders (``finder=`` of :func:`find_heads`):

* ``"contextual"`` — Zhu et al. 2025, the paper's contextual score: mean over response rows of the
  attention mass on the gold document. Delegates to :func:`focuslens.score.contextual.score_dataset`.
* ``"retrieval"`` — Wu et al. 2024 ("Retrieval Head Mechanistically Explains Long-Context
  Factuality"): the gold document is the needle; the model is teacher-forced on the answer *as the
  needle spells it* (the needle's own tokens that cover the answer text, so every generated token has
  an exact copy in the needle). At each answer step ``i`` (query row ``N-1+i``, the position that
  predicts answer token ``i``) head ``(l, h)`` makes a **copy event** when the argmax of its attention
  row (over all visible keys) lies inside the needle span and that key's token equals answer token
  ``i``. Score = copy events / answer tokens, per example, averaged. One forward pass per example;
  hooks on ``hook_pattern`` keep only ``[head]`` counts per layer. (Wu et al. count each needle token
  once per head, as a set; with teacher forcing each step's target is a distinct needle token unless
  the answer repeats a token, so the two agree except for repeated tokens.)
* ``"qrhead"`` — QRHead (Zhang et al. 2025, "Query-Focused Retrieval Heads Improve Long-Context
  Reasoning and Re-ranking"): attention from the *question tokens* onto each document (summed over the
  document's tokens, averaged over question tokens), scored on the gold document. ``qr_score="gold"``
  (default) is the plain gold mass; ``"contrast"`` subtracts the mean mass on the other documents
  (QRHead's relative comparison of documents; it ranks heads that *discriminate* the gold document,
  not heads that attend to documents in general). Computed by :func:`focuslens.score.contextual.score_spans`
  with the question span as the query rows: the prompt only, one pass, no attention cache.
* ``"patching"`` — the causal effect of each head's output: patch ``hook_z`` of head ``(l, h)`` from
  the clean prompt into the corrupted one (:func:`focuslens.heads.patching.make_corrupted_pair`: the gold
  document's value replaced) and measure the first-answer-token logit difference (clean − corrupted
  answer), normalised ``(m_patched − m_corrupt) / (m_clean − m_corrupt)`` (0 = no effect, 1 = the
  whole clean behaviour restored). ``n_layers · n_heads`` forward passes per example: use a small n.
  Examples whose clean and corrupted metrics differ by less than ``min_gap`` (the model does not use
  the gold value) or whose answers share a first token are skipped (``n_skipped``).

Which one should you use?
-------------------------
``contextual`` for the paper's heads (what focus directions are trained on); ``retrieval`` for heads
that copy verbatim from the context; ``qrhead`` for heads whose attention *from the question* finds the
right document (needs no answer at all); ``patching`` for the causal check. :func:`compare_finders`
gives Spearman rank correlations and top-k overlaps between any of them, :func:`focuslens.plot.finder_heatmaps` the
heatmaps side by side.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Literal, Mapping, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..core.hooks import attach_hooks
from ..core.models import HookedModel, hook_name, model_info
from ..core.generation import DEFAULT_MAX_NEW_TOKENS
from ..core.prompts import Span, SpanLike
from ..score.contextual import ScoringMethod
from ..score.ranking import DatasetScores, contextual_heads

__all__ = [
    "FINDER_OPTIONS",
    "FinderName",
    "FINDERS",
    "find_heads",
    "contextual_finder",
    "retrieval_scores",
    "retrieval_finder",
    "qrhead_finder",
    "patching_finder",
    "needle_answer_tokens",
    "spearman",
    "top_k_overlap",
    "compare_finders",
]

FinderName = Literal["contextual", "retrieval", "qrhead", "patching"]
FINDERS: tuple[str, ...] = ("contextual", "retrieval", "qrhead", "patching")


# --------------------------------------------------------------------------------------------------
# Shared plumbing
# --------------------------------------------------------------------------------------------------


def _rendered(model: HookedModel, examples: Sequence[Any], *, chat: bool = True) -> list[Any]:
    """Task records rendered (original variant); rendered examples passed through."""
    from ..tasks.records import RenderedExample, TaskExample, render

    out = []
    for i, ex in enumerate(examples):
        if isinstance(ex, RenderedExample):
            out.append(ex)
        elif isinstance(ex, TaskExample):
            out.append(render(ex, model, variant="original", chat=chat, index=i))
        else:
            raise TypeError(f"examples[{i}] is a {type(ex).__name__}; give TaskExample or RenderedExample objects.")
    if not out:
        raise ValueError("The finder got no examples.")
    return out


def _progress(items: Sequence[Any], desc: str, progress: bool):
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="ex")


def _dataset(model: HookedModel, per: Mapping[str, list[Tensor]], *, n_skipped: int, indices: list[int],
             mode: str, total: int, reasons: list[str]) -> DatasetScores:
    """Stack per-example ``[layer, head]`` scores into a :class:`DatasetScores` (mean, stderr ddof 1)."""
    n = len(indices)
    if n == 0:
        raise ValueError(
            f"{mode}: 0 of {total} examples were usable. Reasons: {'; '.join(reasons[:5])}"
            f"{' ...' if len(reasons) > 5 else ''}."
        )
    stacked = {k: torch.stack(v) for k, v in per.items()}
    mean = {k: v.mean(0) for k, v in stacked.items()}
    stderr = {k: (v.std(0, unbiased=True) / math.sqrt(n) if n > 1 else torch.full_like(v[0], float("nan")))
              for k, v in stacked.items()}
    info = model_info(model)
    return DatasetScores(mean=mean, stderr=stderr, per_example=stacked, n=n, n_skipped=n_skipped,
                         responses=[], indices=indices, response_mode=mode, model=info.name,
                         fingerprint=info.fingerprint())


# --------------------------------------------------------------------------------------------------
# contextual (delegates)
# --------------------------------------------------------------------------------------------------


def contextual_finder(
    model: HookedModel, examples: Sequence[Any], *, response: Literal["generate", "gold", "gold_only"] = "generate",
    progress: bool = True, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, sink: SpanLike | int | None = 1,
    method: ScoringMethod = "auto", batch_size: int = 8,
) -> DatasetScores:
    """The paper's contextual score (:func:`focuslens.score.contextual.score_dataset`), unchanged.

    One contextual ranking, one default: like ``score_dataset``, ``response="generate"`` (the paper's
    protocol: the model's own greedy answer is appended and its tokens are the scoring rows).
    ``response="gold"`` appends the gold answer as text instead (one pass per example, the same
    teacher forcing as the retrieval finder; what ``find_heads(finder="contextual")`` did by default
    before 0.2 — pass it explicitly to reproduce those rankings).
    """
    from ..score.contextual import score_dataset

    ds = score_dataset(model, _rendered(model, examples), response=response, progress=progress,
                       max_new_tokens=max_new_tokens, sink=sink, method=method, batch_size=batch_size)
    ds.response_mode = f"contextual ({ds.response_mode} responses)"
    return ds


# --------------------------------------------------------------------------------------------------
# retrieval (Wu et al. 2024)
# --------------------------------------------------------------------------------------------------


def needle_answer_tokens(tokenizer: Any, tokens: Int[Tensor, "pos"], needle: Span,
                         answers: Sequence[str]) -> Span:
    """The shortest token window inside ``needle`` whose text contains an answer (first answer found).

    Why: the retrieval score compares attended tokens with generated tokens by id, so the teacher-
    forced answer must be the needle's own tokens (``" Drulport"`` inside a sentence and
    ``"Drulport"`` at the start of a turn are different ids).

    Raises:
        ValueError: no answer occurs verbatim in the needle.
    """
    ids = torch.as_tensor(tokens).flatten().tolist()
    for ans in answers:
        a = ans.strip()
        if not a:
            continue
        best = None
        for s in range(needle.start, needle.end):
            if a not in tokenizer.decode(ids[s:needle.end]):
                break  # later starts see less of the needle
            for e in range(s + 1, needle.end + 1):
                if a in tokenizer.decode(ids[s:e]):
                    if best is None or e - s < best[1] - best[0]:
                        best = (s, e)
                    break
        if best is not None:
            return Span(*best)
    raise ValueError(f"No answer of {list(answers)!r} occurs verbatim in the needle span {needle}.")


class _StopAfter(Exception):
    pass


def retrieval_scores(
    model: HookedModel, tokens: Int[Tensor, "pos"], *, needle: Span, answer: Span,
) -> Float[Tensor, "layer head"]:
    """Copy-event rate of every head for one teacher-forced needle answer, ``[n_layers, n_heads]``.

    Args:
        tokens: ``[pos]`` the prompt (``N`` tokens); the answer tokens ``tokens[answer]`` are appended
            and teacher-forced.
        needle: span of the needle (the gold document) in the prompt.
        answer: the answer's tokens inside the needle (:func:`needle_answer_tokens`).

    Returns ``events / len(answer)``: the fraction of answer steps at which the head's most attended
    key is in the needle and holds the token being generated. One forward pass, stopped after the last
    layer's attention; each ``hook_pattern`` is reduced at once to ``[head]`` counts.
    """
    t = torch.as_tensor(tokens).flatten().long()
    N = t.shape[0]
    if not (0 <= needle.start < needle.end <= N and needle.start <= answer.start < answer.end <= needle.end):
        raise ValueError(f"needle {needle} must lie in the prompt (0..{N}) and contain the answer {answer}.")
    resp = t[answer.start:answer.end]
    m = resp.shape[0]
    full = torch.cat([t, resp])[None]
    info = model_info(model)
    L = info.n_layers
    counts = torch.zeros(L, info.n_heads)
    done = [False] * L

    def make(l: int) -> Callable:
        def fn(x: Tensor, hook=None) -> Tensor:
            # x: [batch, head, q_pos, k_pos]; rows N-1 .. N+m-2 predict the m answer tokens.
            rows = x[0, :, N - 1:N - 1 + m, :]
            top = rows.argmax(-1)  # [head, m]
            inside = (top >= needle.start) & (top < needle.end)
            same = full[0, top.to(full.device)].to(top.device) == resp.to(top.device)[None, :]
            counts[l] = (inside & same).sum(-1).float().cpu()
            done[l] = True
            if all(done):
                raise _StopAfter
            return x
        return fn

    hooks = [(hook_name(l, "hook_pattern"), make(l)) for l in range(L)]
    with torch.inference_mode(), attach_hooks(model, hooks, label="focuslens retrieval score"):
        try:
            model(full.to(_device(model)), return_type=None)
        except _StopAfter:
            pass
    if not all(done):
        raise RuntimeError(f"retrieval hooks did not fire on layers {[l for l, d in enumerate(done) if not d]}.")
    return counts / m


def _device(model: HookedModel) -> torch.device:
    from ..core.generation import model_device

    return model_device(model)


def retrieval_finder(model: HookedModel, examples: Sequence[Any], *, progress: bool = True) -> DatasetScores:
    """Retrieval-head scores (Wu et al. 2024) over a dataset; the needle is each example's gold document."""
    rs = _rendered(model, examples)
    per: list[Tensor] = []
    used: list[int] = []
    reasons: list[str] = []
    for i, r in enumerate(_progress(rs, "retrieval heads", progress)):
        if r.relevant is None:
            reasons.append(f"example {i}: no gold document")
            continue
        try:
            ans = needle_answer_tokens(model.tokenizer, r.tokens, r.relevant, r.answers)
        except ValueError as e:
            reasons.append(f"example {i}: {e}")
            continue
        per.append(retrieval_scores(model, r.tokens, needle=r.relevant, answer=ans))
        used.append(i)
    return _dataset(model, {"relevant": per, "retrieval": per}, n_skipped=len(rs) - len(used), indices=used,
                    mode="retrieval (teacher-forced needle answer)", total=len(rs), reasons=reasons)


# --------------------------------------------------------------------------------------------------
# QRHead (Zhang et al. 2025)
# --------------------------------------------------------------------------------------------------


def qrhead_finder(
    model: HookedModel, examples: Sequence[Any], *, qr_score: Literal["gold", "contrast"] = "gold",
    progress: bool = True,
) -> DatasetScores:
    """Query-focused retrieval scores: question-token attention on the gold document, ``[layer, head]``.

    ``mean["relevant"]`` is the chosen ``qr_score``; ``mean["gold"]`` (plain gold mass) and
    ``mean["contrast"]`` (gold mass − mean mass per other document) are both kept.
    """
    from ..score.contextual import score_spans

    if qr_score not in ("gold", "contrast"):
        raise ValueError(f"qr_score must be 'gold' or 'contrast', got {qr_score!r}.")
    rs = _rendered(model, examples)
    per: dict[str, list[Tensor]] = {"relevant": [], "gold": [], "contrast": []}
    used: list[int] = []
    reasons: list[str] = []
    for i, r in enumerate(_progress(rs, "QRHead scores", progress)):
        if r.relevant is None:
            reasons.append(f"example {i}: no gold document")
            continue
        q = r.question_span
        hs = score_spans(model, r.tokens, response=q, spans={"relevant": r.relevant},
                         distractors=r.distractors or None, sink=None)
        gold = hs["relevant"]
        others = hs["distractors_total"] / len(r.distractors) if r.distractors else torch.zeros_like(gold)
        contrast = gold - others
        per["gold"].append(gold)
        per["contrast"].append(contrast)
        per["relevant"].append(gold if qr_score == "gold" else contrast)
        used.append(i)
    return _dataset(model, per, n_skipped=len(rs) - len(used), indices=used,
                    mode=f"qrhead ({qr_score}; question rows)", total=len(rs), reasons=reasons)


# --------------------------------------------------------------------------------------------------
# Patching
# --------------------------------------------------------------------------------------------------


def patching_finder(model: HookedModel, examples: Sequence[Any], *, min_gap: float = 1.0,
                    progress: bool = True) -> DatasetScores:
    """Normalised ``hook_z`` patching effect of every head (clean → corrupted gold value), averaged.

    ``mean["relevant"]`` = mean over usable examples of ``(m_patched − m_corrupt) / (m_clean − m_corrupt)``;
    ``mean["raw"]`` the unnormalised patched logit difference.
    """
    from .patching import logit_diff_metric, make_corrupted_pair, patch_heads
    from ..tasks.records import RenderedExample

    if not min_gap > 0:
        raise ValueError(f"min_gap must be > 0 (logit-difference units), got {min_gap!r}.")
    exs = list(examples)
    if not exs:
        raise ValueError("The finder got no examples.")
    per: dict[str, list[Tensor]] = {"relevant": [], "raw": []}
    used: list[int] = []
    reasons: list[str] = []
    dev = _device(model)
    for i, ex in enumerate(_progress(exs, "patching heads", progress)):
        rec = ex.example if isinstance(ex, RenderedExample) else ex
        try:
            clean, corrupt = make_corrupted_pair(model, rec)
            metric = logit_diff_metric(model, clean.answers[0], corrupt.answers[0])
        except ValueError as e:
            reasons.append(f"example {i}: {e}")
            continue
        ct, xt = clean.tokens[None].to(dev), corrupt.tokens[None].to(dev)
        with torch.no_grad():
            m_clean, m_corrupt = float(metric(model(ct))), float(metric(model(xt)))
        gap = m_clean - m_corrupt
        if abs(gap) < min_gap:
            reasons.append(f"example {i}: clean - corrupted logit difference {gap:.2f} < min_gap")
            continue
        raw = patch_heads(model, xt, ct, metric, site="z")
        per["raw"].append(raw)
        per["relevant"].append((raw - m_corrupt) / gap)
        used.append(i)
    return _dataset(model, per, n_skipped=len(exs) - len(used), indices=used,
                    mode="patching (z, normalised logit difference)", total=len(exs), reasons=reasons)


# --------------------------------------------------------------------------------------------------
# One interface, comparison, figure
# --------------------------------------------------------------------------------------------------


#: the options each finder takes (every other option must stay at its default for that finder)
FINDER_OPTIONS: dict[str, tuple[str, ...]] = {
    "contextual": ("response", "max_new_tokens", "sink", "method", "batch_size"),
    "retrieval": (), "qrhead": ("qr_score",), "patching": ("min_gap",),
}


def find_heads(
    model: HookedModel,
    examples: Sequence[Any],
    *,
    finder: FinderName = "contextual",
    progress: bool = True,
    response: Literal["generate", "gold", "gold_only"] = "generate",
    qr_score: Literal["gold", "contrast"] = "gold",
    min_gap: float = 1.0,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    sink: SpanLike | int | None = 1,
    method: ScoringMethod = "auto",
    batch_size: int = 8,
) -> DatasetScores:
    """Run one head finder: the one entry point for every way of ranking heads.

    Returns a :class:`~focuslens.score.ranking.DatasetScores`; ``mean["relevant"]`` is the finder's
    ``[layer, head]`` score. Which one should you use? ``"contextual"`` (default) is the paper's score
    and the same ranking as :func:`~focuslens.score.contextual.score_dataset` with the same default
    (the model's own answer, ``response="generate"``; its options ``max_new_tokens``, ``sink``,
    ``method``, ``batch_size`` are score_dataset's); ``"retrieval"`` (Wu et al. 2024) needs a copyable
    needle; ``"qrhead"`` scores question tokens (``qr_score``); ``"patching"`` is causal but slow
    (``min_gap``). An option changed for a finder that does not take it is refused, so a setting is
    never silently ignored. docs/method.md §1 and docs/comparison.md compare them.

    Example:
        >>> ds = find_heads(model, examples, finder="qrhead", qr_score="contrast")
        >>> ds.top_k(20)
    """
    given = {"response": response, "qr_score": qr_score, "min_gap": min_gap, "max_new_tokens": max_new_tokens,
             "sink": sink, "method": method, "batch_size": batch_size}
    fns = {"contextual": contextual_finder, "retrieval": retrieval_finder, "qrhead": qrhead_finder,
           "patching": patching_finder}
    if finder not in fns:
        raise ValueError(f"Unknown finder {finder!r}; use one of {list(fns)}.")
    defaults = _FIND_HEADS_DEFAULTS
    for k, v in given.items():
        if k not in FINDER_OPTIONS[finder] and not (type(v) is type(defaults[k]) and v == defaults[k]):
            takes = [f for f, opts in FINDER_OPTIONS.items() if k in opts]
            raise ValueError(f"find_heads(finder={finder!r}): {k}= is an option of the {takes[0]!r} finder only.")
    return fns[finder](model, examples, progress=progress, **{k: given[k] for k in FINDER_OPTIONS[finder]})


def _matrix(x: DatasetScores | Tensor) -> Tensor:
    t = x.mean["relevant"] if isinstance(x, DatasetScores) else torch.as_tensor(x)
    if t.dim() != 2:
        raise ValueError(f"expected a [layer, head] score, got shape {tuple(t.shape)}.")
    return t.float()


def _ranks(v: Tensor) -> Tensor:
    """Average ranks (ties share the mean rank), 1-based."""
    order = torch.argsort(v, stable=True)
    sv = v[order]
    ranks = torch.empty_like(v, dtype=torch.float64)
    i, n = 0, v.numel()
    while i < n:
        j = i
        while j + 1 < n and sv[j + 1] == sv[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: DatasetScores | Tensor, b: DatasetScores | Tensor) -> float:
    """Spearman rank correlation of two ``[layer, head]`` scores over all heads (ties: average ranks)."""
    x, y = _matrix(a).flatten(), _matrix(b).flatten()
    if x.shape != y.shape:
        raise ValueError(f"scores differ in shape: {tuple(_matrix(a).shape)} vs {tuple(_matrix(b).shape)}.")
    keep = ~(torch.isnan(x) | torch.isnan(y))
    rx, ry = _ranks(x[keep]), _ranks(y[keep])
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum()) / den if den > 0 else float("nan")


def top_k_overlap(a: DatasetScores | Tensor, b: DatasetScores | Tensor, k: int = 20) -> int:
    """How many of the top-``k`` heads of ``a`` are among the top-``k`` of ``b``."""
    return len(set(contextual_heads(_matrix(a), k)) & set(contextual_heads(_matrix(b), k)))


def compare_finders(results: Mapping[str, DatasetScores | Tensor], *, k: int = 20) -> dict[str, Any]:
    """Pairwise Spearman correlations and top-``k`` overlaps of several finders' scores.

    Returns ``{"names", "spearman": [[...]], "overlap": [[...]], "k", "top": {name: [[l, h], ...]}}``.
    """
    names = list(results)
    if len(names) < 2:
        raise ValueError("compare_finders needs at least two results.")
    sp = [[spearman(results[a], results[b]) for b in names] for a in names]
    ov = [[top_k_overlap(results[a], results[b], k) for b in names] for a in names]
    top = {n: [list(h) for h in contextual_heads(_matrix(results[n]), k)] for n in names}
    return {"names": names, "spearman": sp, "overlap": ov, "k": k, "top": top}


_FIND_HEADS_DEFAULTS = {k: p.default for k, p in inspect.signature(find_heads).parameters.items()}
