"""Contextual scoring: how much attention each head pays to a span, for the price of one forward pass.

Why this module exists
----------------------
The contextual score of head ``(l, h)`` on one example (Zhu et al. 2025; ``docs/method.md`` §1) is

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
  with :mod:`focuslens.core.attention` (the one definition of scale, causal + sliding-window mask,
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

import math
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..core.attention import LayerAttention, attention_probs, expand_kv, qk_route
from ..core.generation import DEFAULT_MAX_NEW_TOKENS, generate_responses
from ..core.hooks import attach_hooks
from ..core.forward import run_until
from ..core.checks import check_count
from ..core.models import HookedModel, check_context, hook_name, model_info
from ..core.prompts import LabelledPrompt, Span, SpanLike, as_span, normalise_spans
from .ranking import (  # the result types, re-exported from here
    DISTRACTORS_MAX,
    DISTRACTORS_TOTAL,
    DatasetScores,
    HeadScores,
    union_mask,
)

__all__ = [
    "ScoringMethod",
    "ResponseMode",
    "contextual_scores",
    "score_spans",
    "score_many",
    "score_dataset",
    "qk_route_available",
]

ScoringMethod = Literal["auto", "qk", "pattern"]
ResponseMode = Literal["generate", "gold", "gold_only"]
SpansLike = Union[SpanLike, Sequence[SpanLike]]


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


# --------------------------------------------------------------------------------------------------
# The two routes
# --------------------------------------------------------------------------------------------------


def qk_route_available(model: HookedModel) -> tuple[bool, str]:
    """Whether ``method="qk"`` is exact on this model, and if not, why (it then raises; use ``"pattern"``).

    The rule is :func:`focuslens.core.attention.qk_route`: sliding windows, soft-capping and QK-norm are
    modelled (exact); attention sinks, ALiBi, non-causal attention and active dropout are not.
    """
    plan, why = qk_route(model)
    return plan is not None, why


def _response_rows_qk(
    q: Float[Tensor, "r head d"], k: Float[Tensor, "key kv d"], la: LayerAttention, *, start: int, n_heads: int
) -> Float[Tensor, "head key"]:
    """Σ over response rows of the recomputed pattern (:func:`~focuslens.core.attention.attention_probs`):
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

    with torch.inference_mode():
        if stop_early:  # nothing after the last layer's attention is needed (forward.run_until)
            run_until(model, tokens, hooks=hooks)
        else:
            with attach_hooks(model, hooks, label="focuslens scoring"):
                model(tokens, return_type=None)
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
    check_context(model, toks, what="the scored sequence (prompt + response)")
    N = toks.shape[1]
    R, named, n_dis = named_spans(N, response=response, spans=spans, distractors=distractors, sink=sink)
    columns, used = _column_sums(model, toks, R, method=method, stop_early=stop_early)
    return head_scores(columns, R, named, n_dis, method=used)


def named_spans(
    n: int,
    *,
    response: SpanLike,
    spans: Mapping[str, SpansLike] | None,
    distractors: Sequence[SpanLike] | None,
    sink: SpanLike | int | None,
) -> tuple[Span, dict[str, list[Span]], int]:
    """The response span and every named key span of :func:`score_spans` (shared with the backends).

    Returns ``(response, name -> spans, number of distractors)``; names are the user's spans, ``sink``
    and ``distractor_1``.. (``distractors_total``/``distractors_max`` are added by :func:`head_scores`).
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


def head_scores(
    columns: Float[Tensor, "layer head pos"], response: Span, named: dict[str, list[Span]], n_distractors: int,
    *, method: str,
) -> HeadScores:
    """Sum ``columns`` over every named span (and the distractor aggregates) into a :class:`HeadScores`."""
    N = columns.shape[-1]
    scores = {n: columns[..., union_mask(s, N)].sum(-1) for n, s in named.items()}
    if n_distractors:
        all_d = [s for i in range(1, n_distractors + 1) for s in named[f"distractor_{i}"]]
        scores[DISTRACTORS_TOTAL] = columns[..., union_mask(all_d, N)].sum(-1)
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


def _check_room(model, ex, i: int, mode, max_new_tokens: int) -> None:
    """The context-length check before example ``i`` is used (generation may run up to the budget)."""
    n_prompt = len(ex.prompt.tokens)
    if mode in ("generate", "gold_only"):
        check_context(model, n_prompt + max_new_tokens,
                      what=f"example {i} (prompt {n_prompt} tokens + max_new_tokens {max_new_tokens})")
    else:
        check_context(model, ex.prompt.tokens, what=f"example {i}'s prompt")


def responses_for(model, exs: Sequence[Any], mode, *, max_new_tokens: int, batch_size: int) -> list[Tensor | str]:
    """Each example's response rows: generated together for ``"generate"`` / ``"gold_only"``."""
    tok = model.tokenizer
    if callable(mode):
        return [mode(ex) for ex in exs]
    if mode == "gold":
        out: list[Tensor | str] = []
        for ex in exs:
            if not ex.answers:
                raise ValueError("response='gold' needs examples with at least one gold answer.")
            out.append(" " + ex.answers[0].strip() if not ex.prompt.chat else ex.answers[0].strip())
        return out
    if mode == "generate":
        prompts = [ex.prompt.tokens for ex in exs]
    elif mode == "gold_only":
        from ..tasks.records import render

        prompts = [render(ex.example, tok, variant="gold_only", chat=ex.prompt.chat).prompt.tokens for ex in exs]
    else:
        raise ValueError(f"response must be 'generate', 'gold', 'gold_only' or a callable, got {mode!r}.")
    return list(generate_responses(model, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size))


def respan(ex: Any, full: LabelledPrompt) -> tuple[Span, list[Span]]:
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
    batch_size: int = 8,
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
        max_new_tokens: generation budget (the library default, :data:`~focuslens.core.generation.DEFAULT_MAX_NEW_TOKENS`; the paper used 100).
        sink, method: as in :func:`score_spans`.
        progress: a tqdm bar over examples.
        batch_size: responses generated together (``"generate"`` / ``"gold_only"``), through
            :func:`~focuslens.core.generation.generate_responses`: the one-by-one responses up to float
            near-ties, ≈ 1.5× faster on a CPU (``benchmarks/bench_responses.py``); 1 = one at a
            time, which bounds the prefill's ``[batch, head, pos, pos]`` pattern on long prompts.

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
    check_count(batch_size, name="batch_size", what="score_dataset")
    check_count(max_new_tokens, name="max_new_tokens", what="score_dataset")
    _check_rendered(examples)
    per: dict[str, list[Tensor]] = {}
    texts: list[str] = []
    used: list[int] = []
    skipped: list[str] = []
    it: Iterable = examples
    bar = None
    if progress:
        from tqdm.auto import tqdm

        it = bar = tqdm(examples, desc=f"scoring heads ({mode_name} responses)", unit="ex")
    pending: dict[int, Tensor | str] = {}  # responses of the current chunk, generated together
    for i, ex in enumerate(it):
        if getattr(ex, "relevant", None) is None:
            skipped.append(f"example {i}: no relevant span (variant {getattr(ex, 'variant', '?')!r})")
            continue
        if i not in pending:  # the next chunk: check and generate batch_size responses at once
            pending = _chunk_responses(model, examples, i, response, max_new_tokens, batch_size)
        resp = pending[i]
        if (isinstance(resp, str) and not resp.strip()) or (not isinstance(resp, str) and len(resp) == 0):
            skipped.append(f"example {i}: empty response")
            continue
        hs, text = _score_with_response(model, ex, resp, sink=sink, method=method)
        for name in ("relevant", "sink", DISTRACTORS_TOTAL, DISTRACTORS_MAX):
            if name in hs:
                per.setdefault(name, []).append(hs[name])
        texts.append(text)
        used.append(i)
        if bar is not None:
            bar.set_postfix(used=len(texts), skipped=len(skipped))
    return _dataset_scores(model, per, texts, used, skipped, mode_name=mode_name, n_examples=len(examples))


def _check_rendered(examples: Sequence[Any]) -> None:
    """Every example is rendered (a prompt with spans): a raw ``TaskExample`` has no token spans to score."""
    from ..core.errors import UsageError
    from ..tasks.records import TaskExample

    for i, ex in enumerate(examples):
        if isinstance(ex, TaskExample):
            raise UsageError(
                f"score_dataset: example {i} is a TaskExample (question and documents), not a rendered prompt: "
                "render them first, [render(e, model.tokenizer) for e in examples] (focuslens.tasks.render).")
        if not hasattr(ex, "prompt"):
            raise UsageError(
                f"score_dataset: example {i} is a {type(ex).__name__}, not a rendered example "
                "(focuslens.tasks.RenderedExample: render(e, model.tokenizer)).")


def _chunk_responses(
    model: HookedModel, examples: list[Any], i: int, response: Any, max_new_tokens: int, batch_size: int
) -> dict[int, Tensor | str]:
    """Responses of the usable examples among ``examples[i : i + batch_size]``, generated together
    (each checked to fit the context first), by example index."""
    chunk = [j for j in range(i, min(i + batch_size, len(examples)))
             if getattr(examples[j], "relevant", None) is not None]
    for j in chunk:
        _check_room(model, examples[j], j, response, max_new_tokens)
    return dict(zip(chunk, responses_for(model, [examples[j] for j in chunk], response,
                                         max_new_tokens=max_new_tokens, batch_size=batch_size)))


def _score_with_response(model: HookedModel, ex: Any, resp: Tensor | str, *, sink: Any, method: Any
                         ) -> tuple[dict[str, Tensor], str]:
    """One example's head scores with ``resp`` appended as the response, and the response's text."""
    full = ex.prompt.with_response(model.tokenizer, resp)
    relevant, distractors = respan(ex, full)
    hs = score_spans(model, full.tokens, response=full.response, spans={"relevant": relevant},
                     distractors=distractors or None, sink=sink, method=method)
    return hs, model.tokenizer.decode(full.tokens[full.response.slice].tolist())


def _dataset_scores(model: HookedModel, per: dict[str, list[Tensor]], texts: list[str], used: list[int],
                    skipped: list[str], *, mode_name: str, n_examples: int) -> DatasetScores:
    """Mean and standard error over the usable examples of the scores present in every one of them."""
    n = len(texts)
    if n == 0:
        raise ValueError(
            f"score_dataset: 0 of {n_examples} examples were usable, nothing to rank. Reasons: "
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
