"""Contextual scoring: how much attention each head pays to a span, for the price of one forward pass.

Why this module exists
----------------------
The contextual score of head ``(l, h)`` on one example (Zhu et al. 2025, §2 of ``METHOD.md``) is

    s[l, h] = (1/|R|) Σ_{t∈R} Σ_{j∈C} A[l, h, t, j]

with ``R`` the response tokens (query rows) and ``C`` the relevant document (key columns). The obvious
implementation — ``run_with_cache`` every ``hook_pattern`` and reduce afterwards — holds
``L·H·N²`` floats (≈ 4.5 GB for SmolLM2 at 2,048 tokens) and is the usual way such analyses run out
of memory. Here every hook reduces *immediately* to what is kept: for each layer the mean over response
rows of the attention that each key column receives, ``columns[l, h, j] = (1/|R|) Σ_{t∈R} A[l,h,t,j]``
(``L·H·N`` floats, 2 MB at 2,048 tokens). Any number of named spans (relevant, sink, every distractor,
their union and maximum) are then sums over columns of that one tensor: one pass gives them all.

Two exact routes compute the response rows (``method=``):

* ``"qk"``: hook the post-RoPE queries/keys (``hook_rot_q``/``hook_rot_k``, after QK-norm;
  ``hook_q``/``hook_k`` on learned-position models), and recompute the response rows of the pattern
  with :mod:`focuslens.attention` (the one definition of scale, causal + sliding-window mask,
  soft-capping and row softmax, GQA-expanded, fp32). Refused, with the reason, where that
  recomputation is not exact (attention sinks, ALiBi, non-causal attention, dropout:
  :func:`qk_route_available`).
* ``"pattern"``: take the response rows of ``hook_pattern`` as it passes and reduce them at once.
  Works on every architecture the bridge supports.
* ``"auto"`` (default): ``"pattern"``. Measured on SmolLM2 (``docs/scoring.md``) the two routes cost
  the same within noise, the pattern route slightly less (the bridge materialises each layer's pattern
  anyway, so taking rows from it adds nothing, while the q/k route adds a small matmul and the hook
  layout conversions); it is exact on every architecture, and it sees the attention the model really
  used when another focuslens intervention edits ``hook_pattern``. ``"qk"`` is for backends that do
  not materialise patterns, and as an independent cross-check.

Both routes stop the forward pass right after the last layer's attention (no last MLP, no unembedding),
so scoring is *cheaper* than a plain forward pass. ``docs/scoring.md`` has the measurements.

Under grouped-query attention every *query* head gets its own score (query head ``h`` reads KV head
``h // (H/G)``, as in TransformerLens and Hugging Face).

Which function should you use?
------------------------------
* :func:`contextual_scores` — the paper's score for one sequence: ``[n_layers, n_heads]``.
* :func:`score_spans` — the same pass, many named spans at once (sink, distractors...): :class:`HeadScores`.
* :func:`score_many` — a list of sequences of different lengths (one pass each).
* :func:`score_dataset` — labelled :class:`~focuslens.tasks.RenderedExample` s: generates (or takes) the
  response, scores, averages, ranks: :class:`DatasetScores`; :func:`contextual_heads` gives the top-k.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .attention import LayerAttention, attention_probs, expand_kv, qk_route
from .generation import DEFAULT_MAX_NEW_TOKENS, generate_response
from .io import atomic_write
from .hooks import attach_hooks
from .models import Head, HookedModel, check_heads, hook_name, model_info
from .prompts import LabelledPrompt, Span, SpanLike, as_span, normalise_spans

__all__ = [
    "ScoringMethod",
    "ResponseMode",
    "HeadScores",
    "DatasetScores",
    "contextual_scores",
    "score_spans",
    "score_many",
    "score_dataset",
    "contextual_heads",
    "load_heads",
    "save_heads",
    "qk_route_available",
    "generate_response",
]

ScoringMethod = Literal["auto", "qk", "pattern"]
ResponseMode = Literal["generate", "gold", "gold_only"]
SpansLike = Union[SpanLike, Sequence[SpanLike]]

RANKING_FORMAT = "focuslens.contextual_heads/v1"

# Names of the aggregate distractor scores (each distractor also gets ``distractor_{i}``, 1-based).
DISTRACTORS_TOTAL = "distractors_total"
DISTRACTORS_MAX = "distractors_max"


class _StopForward(Exception):
    """Raised from the last layer's hook: everything after it is not needed for scoring."""


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


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
        return self.columns[..., _union_mask(spans, self.seq_len)].sum(-1)


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

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.mean["relevant"].shape)  # type: ignore[return-value]

    def ranking(self, name: str = "relevant") -> list[tuple[int, int, float]]:
        """All heads as ``(layer, head, mean score)``, best first (ties broken by layer, then head)."""
        return _rank(self.mean[name])

    def top_k(self, k: int = 20, name: str = "relevant") -> list[Head]:
        """The ``k`` best heads as ``(layer, head)`` pairs."""
        return [(l, h) for l, h, _ in self.ranking(name)[:_check_k(k, self.mean[name])]]

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
    def load(cls, path: str | os.PathLike) -> "DatasetScores":
        """Read what :meth:`save` wrote (per-example scores are not saved: ``per_example`` is empty)."""
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or data.get("format") != RANKING_FORMAT:
            raise ValueError(
                f"{path} is not a focuslens ranking ({RANKING_FORMAT}); for a plain list of heads "
                "(the authors' relevant_heads.json) use load_heads()."
            )
        mean = {k: torch.tensor(v, dtype=torch.float32) for k, v in data["mean"].items()}
        stderr = {k: torch.tensor(v, dtype=torch.float32) for k, v in data["stderr"].items()}
        return cls(mean=mean, stderr=stderr, per_example={}, n=int(data["n"]),
                   n_skipped=int(data.get("n_skipped", 0)), responses=list(data.get("responses", [])),
                   indices=list(data.get("indices", [])),
                   response_mode=str(data.get("response_mode", "")), model=str(data.get("model", "")),
                   fingerprint=dict(data.get("fingerprint", {})))


def _rank(scores: Float[Tensor, "layer head"]) -> list[tuple[int, int, float]]:
    n_heads = scores.shape[1]
    flat = scores.flatten().tolist()
    order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))
    return [(i // n_heads, i % n_heads, float(flat[i])) for i in order]


def _check_k(k: int, scores: Tensor) -> int:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}.")
    if k > scores.numel():
        raise ValueError(f"k={k} exceeds the number of heads ({scores.numel()}).")
    return k


def contextual_heads(
    scores: DatasetScores | HeadScores | Float[Tensor, "layer head"], k: int = 20, *, name: str = "relevant"
) -> list[Head]:
    """The top-``k`` heads by contextual score as ``(layer, head)`` pairs, best first (paper default k=20)."""
    if isinstance(scores, (DatasetScores, HeadScores)):
        t = scores.mean[name] if isinstance(scores, DatasetScores) else scores.scores[name]
    elif isinstance(scores, Tensor):
        t = scores
    else:
        raise TypeError(f"contextual_heads takes DatasetScores, HeadScores or a [layer, head] tensor, got {type(scores).__name__}.")
    if t.dim() != 2:
        raise ValueError(f"scores must be [layer, head], got shape {tuple(t.shape)}.")
    return [(l, h) for l, h, _ in _rank(t)[:_check_k(k, t)]]


def save_heads(heads: Iterable[Sequence[int]], path: str | os.PathLike) -> Path:
    """Write heads in the authors' ``relevant_heads.json`` format (``[[layer, head], ...]``), atomically."""
    out = [[int(l), int(h)] for l, h in heads]
    return atomic_write(Path(path), json.dumps(out))


def load_heads(path: str | os.PathLike, *, k: int | None = None, model: HookedModel | None = None) -> list[Head]:
    """Read a head list: the authors' ``[[layer, head], ...]`` or a focuslens ranking JSON.

    Args:
        k: keep the first ``k`` heads (a ranking file has all of them, best first).
        model: when given, the heads are validated against it (:func:`~focuslens.check_heads`).
    """
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict):
        if data.get("format") != RANKING_FORMAT or "ranking" not in data:
            raise ValueError(f"{path}: expected [[layer, head], ...] or a focuslens ranking JSON.")
        rows = [r[:2] for r in data["ranking"]]
    elif isinstance(data, list):
        rows = data
    else:
        raise ValueError(f"{path}: expected [[layer, head], ...], got {type(data).__name__}.")
    heads: list[Head] = []
    for r in rows:
        if not (isinstance(r, (list, tuple)) and len(r) == 2 and all(isinstance(x, int) for x in r)):
            raise ValueError(f"{path}: every entry must be a [layer, head] pair of ints, got {r!r}.")
        heads.append((int(r[0]), int(r[1])))
    if k is not None:
        if k < 1 or k > len(heads):
            raise ValueError(f"k={k} but {path} lists {len(heads)} heads.")
        heads = heads[:k]
    if model is not None:
        heads = check_heads(model, heads)
    return heads


# --------------------------------------------------------------------------------------------------
# Span handling
# --------------------------------------------------------------------------------------------------


def _as_tokens(tokens: Tensor | Sequence[int]) -> Int[Tensor, "1 pos"]:
    t = torch.as_tensor(tokens)
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"tokens must be integer token ids, got dtype {t.dtype}.")
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2 or t.shape[0] != 1:
        raise ValueError(
            f"tokens must be [pos] or [1, pos], got shape {tuple(t.shape)}. For several sequences use "
            "score_many(model, items)."
        )
    if t.shape[1] == 0:
        raise ValueError("tokens is empty.")
    return t.long()


def _union_mask(spans: list[Span], seq_len: int) -> Tensor:
    mask = torch.zeros(seq_len, dtype=torch.bool)
    for s in spans:
        mask[s.start:s.end] = True
    return mask


# --------------------------------------------------------------------------------------------------
# The two routes
# --------------------------------------------------------------------------------------------------


def qk_route_available(model: HookedModel) -> tuple[bool, str]:
    """Whether ``method="qk"`` is exact on this model, and if not, why (it then raises; use ``"pattern"``).

    The rule is :func:`focuslens.attention.qk_route`: sliding windows, soft-capping and QK-norm are
    modelled (exact); attention sinks, ALiBi, non-causal attention and active dropout are not.
    """
    plan, why = qk_route(model)
    return plan is not None, why


def _response_rows_qk(
    q: Float[Tensor, "r head d"], k: Float[Tensor, "key kv d"], la: LayerAttention, *, start: int, n_heads: int
) -> Float[Tensor, "head key"]:
    """Σ over response rows of the recomputed pattern (:func:`~focuslens.attention.attention_probs`):
    ``[head, key]`` in fp32 (scale, sliding window and soft-cap of layer ``la``, GQA-expanded)."""
    k = expand_kv(k, n_heads, head_dim=1)  # [key, head, d]
    rows = torch.arange(start, start + q.shape[0])
    return attention_probs(q.transpose(0, 1), k.transpose(0, 1), la, rows).sum(1)


def _column_sums(
    model: HookedModel, tokens: Int[Tensor, "1 pos"], response: Span, *, method: ScoringMethod,
    stop_early: bool,
) -> tuple[Float[Tensor, "layer head pos"], str]:
    """One forward pass; per layer the mean over response rows of each key column's attention."""
    info = model_info(model)
    L, H, N = info.n_layers, info.n_heads, tokens.shape[1]
    if method not in ("auto", "qk", "pattern"):
        raise ValueError(f"method must be 'auto', 'qk' or 'pattern', got {method!r}.")
    plan = None
    if method == "qk":
        plan, why = qk_route(model)
        if plan is None:
            raise ValueError(
                f"method='qk' is not exact on this model ({why}); use method='pattern' or 'auto'."
            )
    used = "qk" if plan is not None else "pattern"
    columns = torch.zeros(L, H, N, dtype=torch.float32)
    done = [False] * L
    R = response
    n_r = len(R)

    def finish(l: int) -> None:
        done[l] = True
        if stop_early and all(done):
            raise _StopForward

    hooks: list[tuple[str, Callable]] = []
    if plan is not None:
        store: dict[int, dict[str, Tensor]] = {}

        def make(l: int, which: str, p: LayerAttention):
            def fn(x: Tensor, hook=None) -> Tensor:
                # x: [batch, pos, head (q) or kv_head (k), d_head]
                s = store.setdefault(l, {})
                s[which] = x[0, R.start:R.end].detach() if which == "q" else x[0, :R.end].detach()
                if "q" in s and "k" in s:
                    rows = _response_rows_qk(s.pop("q"), s.pop("k"), p, start=R.start, n_heads=H)
                    columns[l, :, :R.end] = rows / n_r
                    finish(l)
                return x
            return fn

        for l, p in enumerate(plan):
            hooks.append((p.q_hook, make(l, "q", p)))
            hooks.append((p.k_hook, make(l, "k", p)))
    else:
        def make_pattern(l: int):
            def fn(x: Tensor, hook=None) -> Tensor:
                # x: [batch, head, q_pos, k_pos]; keep the response rows, summed, only.
                columns[l] = x[0, :, R.start:R.end, :].float().sum(1) / n_r
                finish(l)
                return x
            return fn

        hooks = [(hook_name(l, "hook_pattern"), make_pattern(l)) for l in range(L)]

    with torch.inference_mode(), attach_hooks(model, hooks, label="focuslens scoring"):
        try:
            model(tokens, return_type=None)
        except _StopForward:
            pass
    if not all(done):
        missing = [l for l, d in enumerate(done) if not d]
        raise RuntimeError(f"Scoring hooks did not fire on layers {missing}: the model skipped them.")
    return columns, used


# --------------------------------------------------------------------------------------------------
# Public scoring functions
# --------------------------------------------------------------------------------------------------


def score_spans(
    model: HookedModel,
    tokens: Int[Tensor, "pos"] | Int[Tensor, "1 pos"],
    *,
    response: SpanLike,
    spans: Mapping[str, SpansLike] | None = None,
    distractors: Sequence[SpanLike] | None = None,
    sink: SpanLike | int | None = 1,
    method: ScoringMethod = "auto",
    stop_early: bool = True,
) -> HeadScores:
    """Attention mass of every head on several named spans, from one forward pass.

    Args:
        model: a hooked model (TransformerLens bridge).
        tokens: ``[pos]`` or ``[1, pos]`` token ids: the prompt with the response appended.
        response: the query rows ``R`` (half-open ``Span``, ``slice`` or ``(start, end)``).
        spans: name -> a span or a list of spans (scored as their union), e.g.
            ``{"relevant": gold_span}``. Every span must end at or before the response start.
        distractors: spans of the distractor documents: adds ``distractor_1``..``distractor_M``,
            ``distractors_total`` (mass on their union) and ``distractors_max`` (largest single one).
        sink: the attention sink: an int ``n`` = the first ``n`` tokens (default 1), a span, or None.
        method: ``"auto"`` (= ``"pattern"``: response rows of ``hook_pattern``, measured fastest),
            ``"qk"`` (response rows recomputed from post-RoPE q/k; exact where
            :func:`qk_route_available`), ``"pattern"``.
        stop_early: stop the pass after the last layer's attention (no effect on the scores).

    Returns:
        :class:`HeadScores` with one ``[n_layers, n_heads]`` tensor per name, and the ``columns``
        tensor they were summed from.

    Example:
        >>> p = build_prompt(tok, [...]).with_response(tok, "Paris")
        >>> hs = score_spans(model, p.tokens, response=p.response, spans={"relevant": p["doc_2"]},
        ...                  distractors=[p["doc_1"], p["doc_3"]])
        >>> hs.relevant.shape, hs.distractors_max.shape   # ([L, H], [L, H])
    """
    backend = getattr(model, "score_spans", None)
    if callable(backend) and not hasattr(model, "hook_dict"):
        # Another backend (focuslens.backends: FusedModel, NNsightScorer): same protocol and result type.
        return backend(tokens, response=response, spans=spans, distractors=distractors, sink=sink)
    toks = _as_tokens(tokens)
    N = toks.shape[1]
    R, named, n_dis = _named_spans(N, response=response, spans=spans, distractors=distractors, sink=sink)
    columns, used = _column_sums(model, toks, R, method=method, stop_early=stop_early)
    return _head_scores(columns, R, named, n_dis, method=used)


def _named_spans(
    n: int,
    *,
    response: SpanLike,
    spans: Mapping[str, SpansLike] | None,
    distractors: Sequence[SpanLike] | None,
    sink: SpanLike | int | None,
) -> tuple[Span, dict[str, list[Span]], int]:
    """The response span and every named key span of :func:`score_spans` (shared with the backends).

    Returns ``(response, name -> spans, number of distractors)``; names are the user's spans, ``sink``
    and ``distractor_1``.. (``distractors_total``/``distractors_max`` are added by :func:`_head_scores`).
    """
    R = as_span(response, seq_len=n, name="response")
    if R.start == 0:
        raise ValueError(f"response {R} starts at token 0: there is no earlier context to attend to.")
    named: dict[str, list[Span]] = {}
    for name, sp in (spans or {}).items():
        if name in (DISTRACTORS_TOTAL, DISTRACTORS_MAX, "sink") or (distractors and name.startswith("distractor_")):
            raise ValueError(f"span name {name!r} is reserved; use the sink=/distractors= arguments or rename it.")
        named[name] = normalise_spans(sp, seq_len=n, before=R, name=name)
    if sink is not None:
        if isinstance(sink, int) and not isinstance(sink, bool):
            if sink < 1:
                raise ValueError(f"sink={sink}: give the number of leading tokens (>= 1), a span or None.")
            sink = Span(0, sink)
        named["sink"] = normalise_spans(sink, seq_len=n, before=R, name="sink")
    dlist = list(distractors or [])
    for i, d in enumerate(dlist, start=1):
        named[f"distractor_{i}"] = normalise_spans(d, seq_len=n, before=R, name=f"distractor_{i}")
    return R, named, len(dlist)


def _head_scores(
    columns: Float[Tensor, "layer head pos"], response: Span, named: dict[str, list[Span]], n_distractors: int,
    *, method: str,
) -> HeadScores:
    """Sum ``columns`` over every named span (and the distractor aggregates) into a :class:`HeadScores`."""
    N = columns.shape[-1]
    scores = {n: columns[..., _union_mask(s, N)].sum(-1) for n, s in named.items()}
    if n_distractors:
        all_d = [s for i in range(1, n_distractors + 1) for s in named[f"distractor_{i}"]]
        scores[DISTRACTORS_TOTAL] = columns[..., _union_mask(all_d, N)].sum(-1)
        scores[DISTRACTORS_MAX] = torch.stack([scores[f"distractor_{i}"] for i in range(1, n_distractors + 1)]).amax(0)
    return HeadScores(scores=scores, columns=columns, response=response, method=method, spans=named)


def contextual_scores(
    model: HookedModel,
    tokens: Int[Tensor, "pos"] | Int[Tensor, "1 pos"],
    *,
    relevant: SpansLike,
    response: SpanLike,
    method: ScoringMethod = "auto",
) -> Float[Tensor, "layer head"]:
    """The paper's contextual score of every query head, ``[n_layers, n_heads]``.

    ``s[l, h] = (1/|R|) Σ_{t∈R} Σ_{j∈C} A[l, h, t, j]`` with ``R = response``, ``C = relevant`` (a span
    or a list of spans = their union), from one forward pass that never holds a full attention pattern.
    """
    backend_scores = getattr(model, "contextual_scores", None)
    if callable(backend_scores) and not hasattr(model, "hook_dict"):
        # Another backend (focuslens.backends: FusedModel, NNsightScorer) computes the same numbers
        # its own way, e.g. response rows only under fused attention.
        return backend_scores(tokens, relevant=relevant, response=response)
    return score_spans(model, tokens, response=response, spans={"relevant": relevant}, sink=None,
                       method=method).scores["relevant"]


def _item_kwargs(item: Any) -> tuple[Tensor, dict]:
    if isinstance(item, LabelledPrompt):
        spans = dict(item.spans)
        tokens = item.tokens
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        tokens, spans = item[0], dict(item[1])
    else:
        raise TypeError("score_many items must be (tokens, spans) pairs or LabelledPrompts with a 'response' span.")
    if "response" not in spans:
        raise ValueError("Each item's spans need a 'response' entry (the query rows).")
    kw: dict[str, Any] = {"response": spans.pop("response")}
    if "distractors" in spans:
        kw["distractors"] = spans.pop("distractors")
    if "sink" in spans:
        kw["sink"] = spans.pop("sink")
    kw["spans"] = spans
    return tokens, kw


def score_many(
    model: HookedModel,
    items: Sequence[tuple[Tensor, Mapping[str, Any]] | LabelledPrompt],
    *,
    method: ScoringMethod = "auto",
    progress: bool = False,
) -> list[HeadScores]:
    """Score sequences of different lengths, one forward pass each.

    Each item is ``(tokens, spans)`` where ``spans`` maps names to spans and must contain
    ``"response"``; the optional keys ``"distractors"`` (list of spans) and ``"sink"`` go to the
    matching :func:`score_spans` arguments, the rest are named spans. A :class:`LabelledPrompt` with a
    ``response`` segment scores every segment.

    Why one pass per sequence and not a padded batch: on CPU a forward pass is compute-bound, so
    padding buys no throughput and costs the padded positions' work (measured on SmolLM2 with
    sequences of 200-320 tokens: one padded batch took 1.13-1.21x the CPU time of one pass each,
    ``docs/scoring.md``), plus a padding mask that the q/k route would have to reproduce. One pass
    per sequence keeps every score exact and memory at one sequence's activations.
    """
    out = []
    it: Iterable = items
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(items, desc="scoring", unit="seq")
    for item in it:
        tokens, kw = _item_kwargs(item)
        out.append(score_spans(model, tokens, method=method, **kw))
    return out


# --------------------------------------------------------------------------------------------------
# Dataset level
# --------------------------------------------------------------------------------------------------


def _response_for(model, ex, mode, *, max_new_tokens: int) -> Tensor | str:
    tok = model.tokenizer
    if callable(mode):
        return mode(ex)
    if mode == "generate":
        return generate_response(model, ex.prompt.tokens, max_new_tokens=max_new_tokens)
    if mode == "gold":
        if not ex.answers:
            raise ValueError("response='gold' needs examples with at least one gold answer.")
        return " " + ex.answers[0].strip() if not ex.prompt.chat else ex.answers[0].strip()
    if mode == "gold_only":
        from .tasks.records import render

        gold = render(ex.example, tok, variant="gold_only", chat=ex.prompt.chat)
        return generate_response(model, gold.prompt.tokens, max_new_tokens=max_new_tokens)
    raise ValueError(f"response must be 'generate', 'gold', 'gold_only' or a callable, got {mode!r}.")


def _respan(ex: Any, full: LabelledPrompt) -> tuple[Span, list[Span]]:
    """The example's relevant/distractor spans in ``full`` (the prompt plus response).

    A text response re-tokenises the whole sequence; the prompt's tokens normally stay the same, but
    the spans are looked up by segment name in ``full`` so that they are right even if they moved.
    """
    by_span = {sp: name for name, sp in ex.prompt.spans.items()}

    def move(sp: Span) -> Span:
        name = by_span.get(sp)
        return full.spans[name] if name is not None and name in full.spans else sp

    return move(ex.relevant), [move(d) for d in (ex.distractors or [])]


def score_dataset(
    model: HookedModel,
    examples: Sequence[Any],
    *,
    response: ResponseMode | Callable[[Any], str | Tensor | Sequence[int]] = "generate",
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    sink: SpanLike | int | None = 1,
    method: ScoringMethod = "auto",
    progress: bool = True,
) -> DatasetScores:
    """Contextual scores of every head averaged over labelled examples, ready to rank.

    Args:
        model: the hooked model.
        examples: :class:`~focuslens.tasks.RenderedExample` s with a ``relevant`` span (the gold
            document); ``distractors`` are scored too.
        response: the query rows of each example:

            * ``"generate"`` (paper default): the model's own greedy answer to the full prompt;
            * ``"gold"``: the first gold answer text, appended as text;
            * ``"gold_only"``: the model's greedy answer to the gold-only prompt, appended to the full
              prompt (the response the paper trains focus directions on);
            * a callable ``f(example) -> str | token ids``.

            The response is cut before the first end-of-turn token; examples whose response is empty
            are skipped (``n_skipped``).
        max_new_tokens: generation budget (the library default, :data:`~focuslens.generation.DEFAULT_MAX_NEW_TOKENS`; the paper used 100).
        sink, method: as in :func:`score_spans`.
        progress: a tqdm bar over examples.

    Returns:
        :class:`DatasetScores` with mean/stderr ``[layer, head]`` tensors for ``relevant``, ``sink``,
        ``distractors_total`` and ``distractors_max`` (those present in every example).

    Raises:
        ValueError: when no example is usable (all responses empty, no relevant span...).
    """
    examples = list(examples)
    if not examples:
        raise ValueError("score_dataset got no examples.")
    mode_name = "callable" if callable(response) else str(response)
    if not callable(response) and response not in ("generate", "gold", "gold_only"):
        raise ValueError(f"response must be 'generate', 'gold', 'gold_only' or a callable, got {response!r}.")
    per: dict[str, list[Tensor]] = {}
    texts: list[str] = []
    used: list[int] = []
    skipped: list[str] = []
    it: Iterable = examples
    bar = None
    if progress:
        from tqdm.auto import tqdm

        it = bar = tqdm(examples, desc=f"scoring heads ({mode_name} responses)", unit="ex")
    for i, ex in enumerate(it):
        if getattr(ex, "relevant", None) is None:
            skipped.append(f"example {i}: no relevant span (variant {getattr(ex, 'variant', '?')!r})")
            continue
        resp = _response_for(model, ex, response, max_new_tokens=max_new_tokens)
        empty = (isinstance(resp, str) and not resp.strip()) or (not isinstance(resp, str) and len(resp) == 0)
        if empty:
            skipped.append(f"example {i}: empty response")
            continue
        full = ex.prompt.with_response(model.tokenizer, resp)
        relevant, distractors = _respan(ex, full)
        hs = score_spans(model, full.tokens, response=full.response, spans={"relevant": relevant},
                         distractors=distractors or None, sink=sink, method=method)
        for name in ("relevant", "sink", DISTRACTORS_TOTAL, DISTRACTORS_MAX):
            if name in hs:
                per.setdefault(name, []).append(hs[name])
        texts.append(model.tokenizer.decode(full.tokens[full.response.slice].tolist()))
        used.append(i)
        if bar is not None:
            bar.set_postfix(used=len(texts), skipped=len(skipped))
    n = len(texts)
    if n == 0:
        raise ValueError(
            f"score_dataset: 0 of {len(examples)} examples were usable, nothing to rank. Reasons: "
            f"{'; '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}. Check the prompts (does the "
            "model answer at all?), raise max_new_tokens, or pass response='gold'."
        )
    stacked = {k: torch.stack(v) for k, v in per.items() if len(v) == n}
    mean = {k: v.mean(0) for k, v in stacked.items()}
    stderr = {k: (v.std(0, unbiased=True) / math.sqrt(n) if n > 1 else torch.full_like(v[0], float("nan")))
              for k, v in stacked.items()}
    info = model_info(model)
    return DatasetScores(mean=mean, stderr=stderr, per_example=stacked, n=n, n_skipped=len(skipped),
                         responses=texts, indices=used, response_mode=mode_name, model=info.name,
                         fingerprint=info.fingerprint())
