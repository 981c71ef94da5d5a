"""Label-free steering as intervention specs: the baselines focus directions are compared with (issue #36).

Why this module exists
----------------------
The oracle :class:`~focuslens.intervene.span_specs.SplitSoftmax` is told where the answer is (the gold
document, ``r.relevant``). A method a user can deploy is not. The specs here need at most the document
boundaries of the prompt (``RenderedExample.doc_spans``), never the gold label, and each is a small
edit at one hook point focuslens already owns, so that they compare with focus directions and the
oracle like for like, on the same heads, through the same ``evaluate``:

* :class:`PositionalCalibration` — "Found in the Middle" (Hsieh et al. 2024, arXiv 2406.16008): a
  document's relevance is its attention minus the attention the *same slot* gets when it holds a dummy
  document (positional bias measured, then removed); each document's attention mass is then set
  proportional to the softmax of calibrated relevance (their Eq. 5).
* :class:`SinkRedistribution` — move a fraction ρ of the attention on the sink (the first token(s)) onto
  everything else, proportionally: the mechanism the revised focus-directions paper credits, as a direct
  control with a fixed budget.
* :class:`Temperature` — scale the pre-softmax logits of chosen heads by a fixed factor, or by
  ``s·log n`` (scalable softmax, Nakanishi 2025, arXiv 2501.19399): "sharper attention" alone.
* :class:`SelfLocatedSpan` — the model's own heads pick the document (:func:`locate_span`, one partial
  pass over the prompt), then split softmax or PASTA on it: the oracle with the label replaced by the
  model's guess. The guess is exposed (:func:`locate_span`, :meth:`SelfLocatedSpan.locate`) so that an
  experiment reports how often it is the gold document.

Each spec has a content identity, batches (``attach_batch``: each row its own spans under left padding,
equal to attaching it alone), leaves untouched heads bit-identical, and is the exact identity at its
neutral setting (ρ = 0, factor = 1, strength = 0, τ = 1). The measuring passes (calibration, locating)
run when the spec is attached, under whatever is attached before it (a :class:`Compose` member before it
included, as ``Steer(alpha="auto")`` probes); they stop after the last layer they read
(:func:`~focuslens.core.forward.run_until`). ``docs/label_free.md`` gives each method, its source and the
choices made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..core.checks import Head, check_count, check_heads, head_list, positive, real
from ..core.errors import UsageError
from ..core.forward import run_until
from ..core.generation import model_device
from ..core.hooks import HookHandle, attach_hooks
from ..core.models import HookedModel, hook_name
from ..core.prompts import Span
from ..core.attention import layer_attention
from .edits import _Clock, _apply_scales, _group_by_layer, _span_masses, attach_span_edit
from .span_specs import Pasta, SplitSoftmax
from .specs import InterventionSpec, check_batch, format_heads, measuring_model, tokens_of

__all__ = [
    "QueryRows",
    "TemperatureForm",
    "DUMMY_TEXT",
    "query_rows",
    "dummy_tokens",
    "document_attention",
    "LocatedSpan",
    "locate_span",
    "sink_redistribution_pattern",
    "temperature_scores",
    "SinkRedistribution",
    "Temperature",
    "PositionalCalibration",
    "SelfLocatedSpan",
]

QueryRows = Literal["question", "last"]
"""Which prompt rows read the documents: the question's tokens, or the last ``n_last`` prompt tokens."""

TemperatureForm = Literal["fixed", "log_length"]
"""``"fixed"``: logits · factor; ``"log_length"``: logits · factor · log n (scalable softmax)."""

#: The dummy document of :class:`PositionalCalibration`: the classic needle-in-a-haystack filler
#: (Kamradt's test, RULER's ``noise`` haystack): fluent, and relevant to no question.
DUMMY_TEXT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


# --------------------------------------------------------------------------------------------------
# Measuring: query rows, the dummy prompt, document attention, the located span
# --------------------------------------------------------------------------------------------------


def _doc_spans(example: Any, *, what: str) -> list[Span]:
    spans = getattr(example, "doc_spans", None)
    if example is None or spans is None:
        raise ValueError(
            f"{what} needs the document boundaries of the prompt: attach(model, example) with a RenderedExample "
            "(focuslens.tasks.render), whose doc_spans it reads (never its gold label)."
        )
    spans = list(spans)
    if not spans:
        raise ValueError(f"{what}: example {getattr(example, 'id', None)!r} has no documents.")
    return spans


def query_rows(example: Any, *, query: QueryRows, n_last: int = 1, what: str = "query_rows") -> Span:
    """The prompt rows whose attention is read: the question's tokens, or the last ``n_last`` prompt tokens.

    The rows must come after every document (each row then sees every document under the causal mask);
    a template that puts the question first is refused, not silently read as zero attention.
    """
    tokens = tokens_of(example)
    if tokens is None:
        raise ValueError(f"{what}: the example has no prompt tokens (give a RenderedExample).")
    n = int(tokens.shape[-1])
    if query == "question":
        spans = getattr(getattr(example, "prompt", example), "spans", {}) or {}
        if "question" not in spans:
            raise ValueError(f"{what}(query='question'): the prompt has no 'question' span ({sorted(spans)}).")
        rows = spans["question"]
    elif query == "last":
        k = check_count(n_last, name="n_last", what=what, upper=n)
        rows = Span(n - k, n)
    else:
        raise ValueError(f"{what}: query must be 'question' or 'last', got {query!r}.")
    last_doc_end = max(s.end for s in _doc_spans(example, what=what))
    if rows.start < last_doc_end:
        raise ValueError(
            f"{what}: the query rows {rows} start before the last document ends ({last_doc_end}); they must "
            "come after every document to see all of them (query='last' with a smaller n_last)."
        )
    return rows


def dummy_tokens(model: HookedModel, example: Any, *, text: str = DUMMY_TEXT) -> Int[Tensor, "pos"]:
    """The prompt with every document replaced by the same dummy text of equal token length.

    Why token-level: every slot keeps its exact positions and length (the positional bias measured is the
    bias of *that* slot), and the rest of the prompt (instruction, question, template) is bit-identical.
    The dummy text is tokenised once (no special tokens) and tiled from its start in every slot, so every
    slot holds the same dummy document (Hsieh et al. use "a consistent dummy document").
    """
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("dummy_tokens needs the model's tokenizer (model.tokenizer is None).")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"dummy_tokens: the dummy text must be a non-empty string, got {text!r}.")
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if ids.numel() == 0:
        raise ValueError(f"dummy_tokens: the dummy text {text!r} has no tokens.")
    out = tokens_of(example).clone()
    for s in _doc_spans(example, what="dummy_tokens"):
        reps = -(-len(s) // ids.numel())
        out[s.start:s.end] = ids.repeat(reps)[: len(s)].to(out.dtype)
    return out


@torch.no_grad()
def document_attention(
    model: HookedModel,
    example: Any,
    *,
    heads: Sequence[Head],
    rows: Span,
    tokens: Int[Tensor, "batch pos"] | None = None,
    engine: Any = None,
) -> Float[Tensor, "batch n_heads n_docs"]:
    """Each head's attention mass on each document, averaged over the query ``rows`` (float64).

    ``mass[b, i, k] = mean_{t ∈ rows} Σ_{j ∈ doc k} A^{(heads[i])}_{t, j}`` of prompt ``tokens[b]``
    (default: the example's own tokens, batch 1). On the hooked ``model``: one partial forward pass that
    stops after the last layer of ``heads`` (:func:`~focuslens.core.forward.run_until`) and keeps only the
    ``rows`` of the chosen heads (not the whole ``[H, P, P]`` patterns).

    ``engine``: a fused engine built for ``model`` (:func:`focuslens.engine.engine_for`): the same masses
    from its one-pass scoring (:meth:`FusedModel.score_spans <focuslens.engine.FusedModel.score_spans>`, the
    ``[H, |rows|, N]`` rows of each layer, fp32), each batch row alone, with whatever edits are attached to
    the engine applied. Why: the bridge's pass costs 2-3x the engine's on CPU and it runs once per prompt
    for every measuring spec; the numbers agree to float rounding
    (``tests/intervene/test_label_free.py::test_document_attention_engine_equals_bridge``).
    """
    docs = _doc_spans(example, what="document_attention")
    toks = tokens_of(example)[None] if tokens is None else tokens
    if toks.dim() == 1:
        toks = toks[None]
    if engine is not None:
        return _engine_document_attention(engine, docs, heads=list(heads), rows=rows, tokens=toks)
    by_layer = _group_by_layer(heads)
    got: dict[int, Tensor] = {}

    def grab(layer: int, idx: Tensor) -> Callable[..., Tensor]:
        def fn(pattern: Float[Tensor, "batch head q k"], hook=None):
            got[layer] = pattern[:, idx.to(pattern.device), rows.start:rows.end, :].detach().double().cpu()
            return pattern

        return fn

    hooks = [(hook_name(l, "hook_pattern"), grab(l, torch.tensor(hs))) for l, hs in by_layer.items()]
    run_until(model, toks.to(model_device(model)), hooks=hooks)
    n = toks.shape[-1]
    member = torch.zeros(len(docs), n, dtype=torch.float64)
    for k, s in enumerate(docs):
        member[k, s.start:s.end] = 1.0
    out = torch.empty(toks.shape[0], len(heads), len(docs), dtype=torch.float64)
    for i, (layer, head) in enumerate(heads):
        p = got[layer][:, by_layer[layer].index(head)]  # [batch, rows, k]
        out[:, i] = (p @ member.T).mean(1)
    return out


def _engine_document_attention(engine: Any, docs: list[Span], *, heads: list[Head], rows: Span,
                               tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch n_heads n_docs"]:
    """:func:`document_attention` on a fused engine: one scoring pass per batch row."""
    score = getattr(engine, "score_spans", None)
    if score is None or not hasattr(engine, "hf_model"):
        raise TypeError(f"document_attention: engine must be a focuslens FusedModel "
                        f"(focuslens.engine.engine_for(model)), got {type(engine).__name__}.")
    out = torch.empty(tokens.shape[0], len(heads), len(docs), dtype=torch.float64)
    names = [f"doc_{k}" for k in range(len(docs))]
    for b in range(tokens.shape[0]):
        hs = score(tokens[b], response=rows, spans=dict(zip(names, docs)), sink=None)
        for k, name in enumerate(names):
            t = hs.scores[name]
            out[b, :, k] = torch.stack([t[l, h] for l, h in heads]).double()
    return out


def _no_prior_on_engine(prior: Any, engine: Any, what: str) -> None:
    if prior is not None and engine is not None:
        raise ValueError(f"{what}.measure: a prior spec is attached to the hooked model, so the pass must run "
                         "there: pass engine=None with prior (Compose does).")


@dataclass(frozen=True)
class LocatedSpan:
    """Where the model's own heads say the answer is (:func:`locate_span`).

    Attributes:
        scores: one score per document, in prompt order (mean over the heads of the attention mass from
            the query rows; minus the dummy-document mass with ``baseline="dummy"``).
        ranking: document indices (0-based, prompt order), highest score first (ties: earlier first).
        picked: the ``top`` first of ``ranking``.
        spans: the token spans of ``picked``.
    """

    scores: tuple[float, ...]
    ranking: tuple[int, ...]
    picked: tuple[int, ...]
    spans: tuple[Span, ...]

    @property
    def doc(self) -> int:
        """The top document (0-based, prompt order)."""
        return self.picked[0]

    def hit(self, gold: int | None) -> bool:
        """Whether the gold document (``r.gold_position``) is among the picked ones."""
        return gold is not None and gold in self.picked


def locate_span(
    model: HookedModel,
    example: Any,
    *,
    heads: Sequence[Sequence[int]],
    query: QueryRows = "question",
    n_last: int = 8,
    top: int = 1,
    baseline: Literal["none", "dummy"] = "none",
    dummy: str = DUMMY_TEXT,
    engine: Any = None,
) -> LocatedSpan:
    """The document(s) the chosen heads attend to most from the query rows: no gold label needed.

    Why: on SmolLM2 the top-20 contextual heads' attention from the question's tokens picked the gold
    paragraph in 28 of 32 real-text questions (issue #36), while the model's answer missed it: the heads
    know where the answer is. The score of document k is the mean over ``heads`` and the query rows of the
    attention mass on its tokens (mass, not a per-token mean: a document is read as a whole). With
    ``baseline="dummy"`` the same mass measured with every document replaced by a dummy text
    (:func:`dummy_tokens`) is subtracted: the positional calibration of :class:`PositionalCalibration`.

    Args:
        heads: the locating heads, e.g. the top contextual heads (``find_heads``).
        query: ``"question"`` (the question's tokens, the probe's best: 28/32) or ``"last"`` (the last
            ``n_last`` prompt tokens: mostly the chat template's tail, 5/32 in the probe).
        top: how many documents to pick (their union is the span).
        baseline: ``"none"`` or ``"dummy"`` (one more row in the same pass).
        engine: a fused engine built for ``model`` to run the pass on (:func:`document_attention`).

    Returns:
        A :class:`LocatedSpan`; ``located.doc == r.gold_position`` says whether the guess is the gold.
    """
    what = "locate_span"
    hs = check_heads(model, head_list(heads, what=what), what=what)
    docs = _doc_spans(example, what=what)
    top = check_count(top, name="top", what=what, upper=len(docs))
    if baseline not in ("none", "dummy"):
        raise ValueError(f"{what}: baseline must be 'none' or 'dummy', got {baseline!r}.")
    rows = query_rows(example, query=query, n_last=n_last, what=what)
    toks = tokens_of(example)[None]
    if baseline == "dummy":
        toks = torch.stack([toks[0], dummy_tokens(model, example, text=dummy)])
    mass = document_attention(model, example, heads=hs, rows=rows, tokens=toks, engine=engine).mean(1)  # [batch, docs]
    scores = mass[0] - mass[1] if baseline == "dummy" else mass[0]
    ranking = tuple(int(i) for i in torch.argsort(-scores, stable=True))
    picked = ranking[:top]
    return LocatedSpan(tuple(float(x) for x in scores), ranking, picked, tuple(docs[i] for i in picked))


# --------------------------------------------------------------------------------------------------
# Sink redistribution
# --------------------------------------------------------------------------------------------------


def sink_redistribution_pattern(
    pattern: Float[Tensor, "... q k"],
    key_mask: Bool[Tensor, "k"] | Bool[Tensor, "batch k"],
    rho: float,
    *,
    query_positions: Int[Tensor, "q"] | Int[Tensor, "batch q"] | None = None,
    min_query: int | Int[Tensor, "batch"] = 0,
) -> Float[Tensor, "... q k"]:
    """Move the fraction ``rho`` of each row's mass on the sink ``key_mask`` onto the other keys, proportionally.

    With π = Σ_{j∈S} A_j (the sink) and σ = Σ_{j∉S} A_j:

        A'_j = (1 − ρ) · A_j                for j ∈ S
        A'_j = A_j · (σ + ρ·π) / σ          for j ∉ S

    so the row sum is unchanged and the proportions inside S and outside S are kept. Factors in float64;
    the guards of :func:`~focuslens.intervene.edits.split_softmax_pattern` (π = 0 or σ = 0, rows before
    ``min_query``: unchanged). ρ = 0 is the identity, ρ = 1 empties the sink.
    """
    m, pi, sigma, ok = _span_masses(pattern, key_mask, query_positions, min_query)
    safe = torch.where(ok, sigma, torch.ones_like(sigma))
    scale_s = torch.full_like(pi, 1.0 - rho)
    scale_r = (safe + rho * pi) / safe
    return _apply_scales(pattern, m, ok, scale_s, scale_r)


class SinkRedistribution(InterventionSpec):
    """On ``heads``, move a fraction ``rho`` of the attention on the sink to the context, proportionally.

    The sink is the first ``sink_tokens`` prompt tokens (position 0, the BOS, by default; each row's own
    first tokens under left padding). "The context" is every other visible key, each gaining in
    proportion to the attention it already has (:func:`sink_redistribution_pattern`), so rows stay
    normalised by construction. Why this control: the revised focus-directions paper attributes their
    effect to mass moved off the sink; this moves exactly that, with a fixed budget ρ and no direction.

    Args:
        heads: ``(layer, head)`` query heads, in order.
        rho: the fraction moved, in [0, 1]; 0 is the identity.
        sink_tokens: how many leading tokens form the sink (>= 1).
    """

    kind = "sink_redistribution"
    __slots__ = ("heads", "rho", "sink_tokens")

    def __init__(self, heads: Sequence[Sequence[int]], *, rho: float, sink_tokens: int = 1):
        what = "SinkRedistribution"
        self.heads = head_list(heads, what=what)
        r = real(rho, name="rho", what=what)
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"{what}: rho must be in [0, 1] (the fraction of the sink's mass moved), got {rho!r}.")
        self.rho = r
        self.sink_tokens = check_count(sink_tokens, name="sink_tokens", what=what)
        self._freeze()

    def _ctor(self):
        return (self.heads,), {"rho": self.rho, "sink_tokens": self.sink_tokens}

    def _identity(self) -> dict[str, Any]:
        return {"heads": [list(h) for h in self.heads], "rho": self.rho, "sink_tokens": self.sink_tokens}

    @property
    def per_example(self) -> bool:
        return True  # the sink of a left-padded row starts at its own offset

    def _edit(self) -> Callable[..., Tensor]:
        rho = self.rho

        def edit(p, mask, *, query_positions, min_query):
            return sink_redistribution_pattern(p, mask, rho, query_positions=query_positions, min_query=min_query)

        return edit

    def _attach(self, model: HookedModel, spans: Any, *, seq_len: int | None,
                offsets: Sequence[int] | None) -> HookHandle:
        batch = f", batch of {len(offsets)}" if offsets is not None else ""
        return attach_span_edit(model, self.heads, spans, edit=self._edit(), identity=self.rho == 0.0,
                                offsets=offsets, seq_len=seq_len, what="SinkRedistribution",
                                label=f"sink_redistribution(rho={self.rho:g}, {len(self.heads)} heads{batch})")

    def attach(self, model: HookedModel, example: Any = None) -> HookHandle:
        tokens = tokens_of(example) if example is not None else None
        return self._attach(model, [Span(0, self.sink_tokens)], offsets=None,
                            seq_len=None if tokens is None else int(tokens.shape[-1]))

    def attach_batch(self, model: HookedModel, examples: Sequence[Any], *, offsets: Sequence[int]) -> HookHandle:
        """Each row's sink at its own left padding: one attach per batch."""
        check_batch(examples, offsets, what="SinkRedistribution")
        return self._attach(model, [[Span(0, self.sink_tokens)] for _ in examples], seq_len=None, offsets=list(offsets))

    def attach_fused(self, engine: Any, examples: Sequence[Any], *, offsets: Sequence[int]) -> HookHandle:
        """The same edit on the fused engine (:meth:`FusedModel.span_edit <focuslens.engine.FusedModel.span_edit>`,
        the span layout of the bridge's hook): each row's sink at its own left padding, only the spec's heads
        recomputed explicitly."""
        check_batch(examples, offsets, what="SinkRedistribution")
        return engine.span_edit(self.heads, [[Span(0, self.sink_tokens)] for _ in examples], edit=self._edit(),
                                identity=self.rho == 0.0, label=f"fused sink_redistribution(rho={self.rho:g}",
                                offsets=list(offsets), seq_len=None)

    def __repr__(self) -> str:
        return f"SinkRedistribution({format_heads(self.heads)}, ρ={self.rho:g}, sink_tokens={self.sink_tokens})"


# --------------------------------------------------------------------------------------------------
# Temperature
# --------------------------------------------------------------------------------------------------


class Temperature(InterventionSpec):
    """Scale the pre-softmax attention logits of ``heads``: a control for "sharper attention" alone.

    Edited at ``hook_attn_scores`` (``[batch, head, q, k]``, already scaled by the model's 1/√d, soft-capped
    where the model caps, masked entries ``finfo.min``). Only visible entries are scaled; masked entries
    stay as they are (a factor > 1 would turn ``finfo.min`` into −inf, and a row of a padding query with
    no visible key into NaN).

    * ``form="fixed"``: ``logits · factor`` (an inverse temperature; 1 is the identity, > 1 sharper).
    * ``form="log_length"``: ``logits · factor · log n``, n the number of keys the row sees (causal,
      window and padding included, counted from the mask itself): scalable softmax (SSMax, Nakanishi 2025,
      arXiv 2501.19399), which keeps attention from flattening as the context grows. SSMax is trained with
      the model; applied post hoc here, ``factor = 1 / log n₀`` leaves rows of length n₀ unchanged and
      sharpens longer ones. It has no identity setting.

    Args:
        heads: ``(layer, head)`` query heads, in order.
        factor: > 0 (``s`` of SSMax in the ``log_length`` form).
        form: ``"fixed"`` or ``"log_length"``.
    """

    kind = "temperature"
    __slots__ = ("heads", "factor", "form")

    def __init__(self, heads: Sequence[Sequence[int]], *, factor: float, form: TemperatureForm = "fixed"):
        what = "Temperature"
        self.heads = head_list(heads, what=what)
        self.factor = positive(factor, name="factor", what=what, why=(
            "the logits are multiplied by it (1 is the identity of form='fixed', > 1 sharpens)."))
        if form not in ("fixed", "log_length"):
            raise ValueError(f"{what}: form must be 'fixed' or 'log_length', got {form!r}.")
        self.form = form
        self._freeze()

    def _ctor(self):
        return (self.heads,), {"factor": self.factor, "form": self.form}

    def _identity(self) -> dict[str, Any]:
        return {"heads": [list(h) for h in self.heads], "factor": self.factor, "form": self.form}

    def attach(self, model: HookedModel, example: Any = None) -> HookHandle:
        by_layer = _group_by_layer(check_heads(model, self.heads, what="Temperature"))
        identity = self.form == "fixed" and self.factor == 1.0
        hooks = [(hook_name(l, "hook_attn_scores"), _scores_hook(hs, self.factor, self.form, identity, layer=l))
                 for l, hs in by_layer.items()]
        handle = attach_hooks(model, hooks, label=f"temperature({self.form}, factor={self.factor:g}, "
                                                  f"{len(self.heads)} heads)")
        handle.hook_names = [n for n, _ in hooks]
        return handle

    def attach_fused(self, engine: Any, examples: Sequence[Any], *, offsets: Sequence[int]) -> HookHandle:
        """The same scaling on the fused engine (:meth:`FusedModel.score_edit
        <focuslens.engine.FusedModel.score_edit>`): the heads' scores are computed explicitly there, scaled by
        :func:`temperature_scores` before the softmax, n each row's own count of visible keys."""
        check_batch(examples, offsets, what="Temperature")
        factor, form = self.factor, self.form
        by_layer = _group_by_layer(self.heads)

        def apply(scores: Tensor, visible: Tensor, layer: int) -> Tensor:
            return temperature_scores(scores, visible, factor, form, heads=by_layer.get(layer, []), layer=layer)

        heads = [(l, h) for l, hs in by_layer.items() for h in hs]  # the engine's order within a layer
        return engine.score_edit(heads, apply, identity=form == "fixed" and factor == 1.0,
                                 label=f"fused temperature({form}, factor={factor:g}")

    def __repr__(self) -> str:
        return f"Temperature({format_heads(self.heads)}, factor={self.factor:g}, {self.form})"


def temperature_scores(
    scores: Float[Tensor, "batch n q k"],
    visible: Bool[Tensor, "batch n q k"],
    factor: float,
    form: TemperatureForm,
    *,
    heads: Sequence[int] = (),
    layer: int = -1,
) -> Float[Tensor, "batch n q k"]:
    """:class:`Temperature`'s edit of the scaled attention logits of some heads (a new tensor).

    Visible entries (``visible``, broadcastable: causal, window and padding) are multiplied by ``factor``
    (``"fixed"``) or by ``factor · log n`` with n the row's own count of visible keys (``"log_length"``,
    at least 1); the others are returned as they are. The one definition both engines apply: the
    bridge's ``hook_attn_scores`` hook and the fused engine's explicit rows
    (:meth:`FusedModel.score_edit <focuslens.engine.FusedModel.score_edit>`). A logit that overflows is
    refused (``UsageError`` naming ``heads`` of ``layer``) instead of giving NaN attention.
    """
    if form == "fixed":
        g: Tensor | float = factor
    else:
        n = visible.sum(-1, keepdim=True).clamp_min(1).to(torch.float64)
        g = (factor * torch.log(n)).to(scores.dtype)
    new = torch.where(visible, scores * g, scores)
    if not bool(torch.isfinite(torch.where(visible, new, 0)).all()):
        # a huge factor overflows the logits to ±inf: the pattern would be NaN (or all on masked keys)
        vis = visible.expand_as(new)
        bad = [h for j, h in enumerate(heads) if not bool(torch.isfinite(new[:, j][vis[:, j]]).all())]
        raise UsageError(
            f"Temperature (factor = {factor:g}, {form}) made the attention logits of heads {bad} of layer "
            f"{layer} non-finite in {str(scores.dtype).replace('torch.', '')} on this forward pass; use a smaller "
            "factor (the pass was stopped instead of returning NaN logits).")
    return new


def _scores_hook(heads_here: list[int], factor: float, form: TemperatureForm, identity: bool, *, layer: int = -1
                 ) -> Callable[..., Tensor]:
    idx_cpu = torch.tensor(heads_here, dtype=torch.long)

    def hook(scores: Float[Tensor, "batch head q k"], hook=None):
        if identity:
            return scores
        idx = idx_cpu.to(scores.device)
        sub = scores.index_select(1, idx)
        visible = sub > torch.finfo(sub.dtype).min / 2  # masked entries are finfo.min (or -inf)
        new = temperature_scores(sub, visible, factor, form, heads=heads_here, layer=layer)
        return scores.index_copy(1, idx, new)  # other heads copied bit for bit

    return hook


# --------------------------------------------------------------------------------------------------
# Positional calibration ("Found in the Middle")
# --------------------------------------------------------------------------------------------------


class PositionalCalibration(InterventionSpec):
    """"Found in the Middle" attention calibration (Hsieh et al. 2024, arXiv 2406.16008) on ``heads``.

    1. Measure (at attach time, one partial pass of batch 2): for each head and document k, the mean
       per-token attention ``Attn(x, k) = mass_k / N_k`` from the query rows (default: the last prompt
       token, "when predicting the next token", as the paper), in the prompt and in the same prompt with
       every document replaced by the same dummy text of equal token length (:func:`dummy_tokens`).
       Calibrated relevance ``rel_k = Attn(x, k) − Attn(dummy, k)`` (their Eq. 4: the slot's positional
       bias removed); ``α_k = softmax_k(rel_k / temperature)``.
    2. Edit (``hook_pattern``, every row that sees all documents: the question, the template's tail and
       every generated token): each document's mass becomes proportional to ``α_k · N_k`` (Eq. 5: the
       per-token mean is rescaled by α_k / Attn_original), their total ``M`` unchanged, the proportions
       inside a document unchanged, every other key (instruction, question, sink) unchanged:

           target_k = M · α_k N_k / Σ_j α_j N_j,     mass'_k = (1 − λ)·mass_k + λ·target_k

       λ = ``strength`` (1 is the paper's method, 0 the identity). A row where some document has no
       attention (outside a sliding window) is left unchanged.

    Per head, not averaged over heads: each head has its own positional bias. The paper intervenes on all
    heads of the last 16 of 32 layers with t = 5e-5 on 7B models; here the heads are chosen (contextual
    heads, or every head of late layers) and t is a hyper-parameter to select on validation (the per-token
    attention scale depends on the model and the prompt length).

    Args:
        heads: ``(layer, head)`` query heads, in order.
        temperature: t > 0 of the softmax over calibrated relevance.
        strength: λ in [0, 1].
        query: the rows the relevance is read from (:func:`query_rows`); ``n_last`` for ``"last"``.
        dummy: the dummy document's text.
    """

    kind = "positional_calibration"
    __slots__ = ("heads", "temperature", "strength", "query", "n_last", "dummy")

    def __init__(self, heads: Sequence[Sequence[int]], *, temperature: float = 5e-5, strength: float = 1.0,
                 query: QueryRows = "last", n_last: int = 1, dummy: str = DUMMY_TEXT):
        what = "PositionalCalibration"
        self.heads = head_list(heads, what=what)
        self.temperature = positive(temperature, name="temperature", what=what, why=(
            "α = softmax(relevance / temperature): small values give all the documents' mass to the most "
            "relevant one."))
        lam = real(strength, name="strength", what=what)
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"{what}: strength must be in [0, 1] (0 is the identity, 1 the paper's method), "
                             f"got {strength!r}.")
        self.strength = lam
        if query not in ("question", "last"):
            raise ValueError(f"{what}: query must be 'question' or 'last', got {query!r}.")
        self.query = query
        self.n_last = check_count(n_last, name="n_last", what=what) if query == "last" else None
        if not isinstance(dummy, str) or not dummy.strip():
            raise ValueError(f"{what}: dummy must be a non-empty text, got {dummy!r}.")
        self.dummy = dummy
        self._freeze()

    def _ctor(self):
        return (self.heads,), {"temperature": self.temperature, "strength": self.strength, "query": self.query,
                               "n_last": self.n_last or 1, "dummy": self.dummy}

    def _identity(self) -> dict[str, Any]:
        return {"heads": [list(h) for h in self.heads], "temperature": self.temperature,
                "strength": self.strength, "query": self.query, "n_last": self.n_last, "dummy": self.dummy}

    @property
    def per_example(self) -> bool:
        return True

    def relevance(self, model: HookedModel, example: Any, *, engine: Any = None
                  ) -> tuple[Float[Tensor, "n_heads n_docs"], Float[Tensor, "n_heads n_docs"]]:
        """``(rel, α)`` of ``example`` per head (float64): calibrated relevance and its softmax (the pass on
        ``engine``, a fused engine built for ``model``, when given: :func:`document_attention`)."""
        what = "PositionalCalibration"
        hs = check_heads(model, self.heads, what=what)
        docs = _doc_spans(example, what=what)
        rows = query_rows(example, query=self.query, n_last=self.n_last or 1, what=what)
        toks = torch.stack([tokens_of(example), dummy_tokens(model, example, text=self.dummy)])
        mass = document_attention(model, example, heads=hs, rows=rows, tokens=toks, engine=engine)  # [2, heads, docs]
        sizes = torch.tensor([len(s) for s in docs], dtype=torch.float64)
        rel = (mass[0] - mass[1]) / sizes
        return rel, torch.softmax(rel / self.temperature, dim=-1)

    @property
    def measures(self) -> bool:
        return True  # the calibration pass of each prompt (none at strength 0)

    def measure(self, model: HookedModel, examples: Sequence[Any],
                prior: InterventionSpec | None = None, *, engine: Any = None) -> Float[Tensor, "batch n_heads n_docs"]:
        """Each row's target share of the documents' mass per head (float64, ``α_k N_k / Σ_j α_j N_j``, in
        :attr:`heads` order, zero-padded to the most documents; zeros at strength 0, where nothing is
        measured): :meth:`relevance` of each row alone, ``prior`` attached around its pass (on ``model``; or
        the pass on ``engine``, a fused engine built for ``model``, with no ``prior``)."""
        what = "PositionalCalibration"
        check_heads(model, self.heads, what=what)
        _no_prior_on_engine(prior, engine, what)
        docs = [_doc_spans(e, what=what) for e in examples]
        weights = torch.zeros(len(examples), len(self.heads), max(len(d) for d in docs), dtype=torch.float64)
        if self.strength == 0.0:
            return weights
        for b, (e, d) in enumerate(zip(examples, docs)):
            handle = prior.attach(model, e) if prior is not None else None
            try:
                _, alpha = self.relevance(model, e, engine=engine)
            finally:
                if handle is not None:
                    handle.remove()
            w = alpha * torch.tensor([len(s) for s in d], dtype=torch.float64)
            weights[b, :, : len(d)] = w / w.sum(-1, keepdim=True)
        return weights

    def _plan(self, measured: Tensor, examples: Sequence[Any], offsets: Sequence[int] | None
              ) -> tuple[dict[int, list[int]], "_DocLayout", dict[int, Tensor]]:
        """``(heads by layer, document layout, weights per layer [batch, heads here, docs])``: what both
        engines edit with, from :meth:`measure`'s weights."""
        what = "PositionalCalibration"
        by_layer = _group_by_layer(self.heads)
        docs = [_doc_spans(e, what=what) for e in examples]
        n_k = max(len(d) for d in docs)
        if tuple(measured.shape) != (len(examples), len(self.heads), n_k):
            raise ValueError(f"{what}: the measurement has shape {tuple(measured.shape)}, not [{len(examples)} rows, "
                             f"{len(self.heads)} heads, {n_k} documents]: measure these examples.")
        starts = torch.zeros(len(examples), n_k, dtype=torch.long)
        ends = torch.zeros(len(examples), n_k, dtype=torch.long)
        offs = list(offsets) if offsets is not None else [0]
        for b, d in enumerate(docs):
            for k, s in enumerate(d):
                starts[b, k], ends[b, k] = s.start + offs[b], s.end + offs[b]
        layout = _DocLayout(starts, ends, batched=offsets is not None)
        index = {h: i for i, h in enumerate(self.heads)}
        per_layer = {l: measured[:, [index[(l, h)] for h in hs]] for l, hs in by_layer.items()}  # [batch, heads, docs]
        return by_layer, layout, per_layer

    def _attach(self, model: HookedModel, examples: Sequence[Any], offsets: Sequence[int] | None,
                measured: Tensor) -> HookHandle:
        check_heads(model, self.heads, what="PositionalCalibration")
        by_layer, layout, per_layer = self._plan(measured, examples, offsets)
        identity = self.strength == 0.0
        sliding = any(layer_attention(model, l).sliding_window is not None for l in by_layer)
        clock = _Clock() if sliding else None
        hooks = []
        for l, hs in by_layer.items():
            hooks.append((hook_name(l, "hook_pattern"),
                          _calibration_hook(l, hs, layout, per_layer[l], self.strength, identity=identity,
                                            clock=clock)))
        batch = f", batch of {len(examples)}" if offsets is not None else ""
        handle = attach_hooks(model, hooks, pre_forward=[clock] if clock is not None else [],
                              label=f"positional_calibration(t={self.temperature:g}, λ={self.strength:g}, "
                                    f"{len(self.heads)} heads{batch})")
        handle.hook_names = [n for n, _ in hooks]
        return handle

    def attach(self, model: HookedModel, example: Any = None) -> HookHandle:
        return self._attach(model, [example], None, self.measure(model, [example]))

    def attach_batch(self, model: HookedModel, examples: Sequence[Any], *, offsets: Sequence[int]) -> HookHandle:
        """Each row measured alone (as :meth:`attach` does), then one hook with each row's documents shifted
        by its left padding."""
        check_batch(examples, offsets, what="PositionalCalibration")
        return self.attach_measured(model, self.measure(model, examples), examples, offsets=offsets)

    def attach_measured(self, model: HookedModel, measured: Any, examples: Sequence[Any], *,
                        offsets: Sequence[int]) -> HookHandle:
        check_batch(examples, offsets, what="PositionalCalibration")
        return self._attach(model, list(examples), list(offsets), measured)

    def attach_fused(self, engine: Any, examples: Sequence[Any], *, offsets: Sequence[int]) -> HookHandle:
        """The edit on the fused engine (:meth:`FusedModel.pattern_edit <focuslens.engine.FusedModel.pattern_edit>`,
        only the spec's heads recomputed); the measuring pass runs on the engine too (``measure(..., engine=)``,
        :func:`document_attention`: the bridge's numbers to float rounding), each row alone, as
        :meth:`attach_batch` measures. Inside a :class:`Compose`, a member measures on the bridge
        (``engine.hooked``) with the members before it attached."""
        check_batch(examples, offsets, what="PositionalCalibration")
        measured = self.measure(measuring_model(engine, "PositionalCalibration"), examples, engine=engine)
        return self.attach_measured_fused(engine, measured, examples, offsets=offsets)

    def attach_measured_fused(self, engine: Any, measured: Any, examples: Sequence[Any], *,
                              offsets: Sequence[int]) -> HookHandle:
        check_batch(examples, offsets, what="PositionalCalibration")
        by_layer, layout, per_layer = self._plan(measured, list(examples), list(offsets))
        strength = self.strength

        def apply(pattern: Tensor, query_positions: Tensor, layer: int) -> Tensor:
            _check_batch_rows(layout, pattern.shape[0])
            return _calibrate_rows(pattern, layout, per_layer[layer], strength, first_key=0,
                                   first=int(query_positions[0]))

        heads = [(l, h) for l, hs in by_layer.items() for h in hs]  # the engine's order within a layer
        return engine.pattern_edit(heads, apply, identity=strength == 0.0,
                                   label=f"fused positional_calibration(t={self.temperature:g}, "
                                         f"λ={strength:g}, batch of {len(examples)}")

    def __repr__(self) -> str:
        return (f"PositionalCalibration({format_heads(self.heads)}, t={self.temperature:g}, λ={self.strength:g}, "
                f"query={self.query!r})")


class _DocLayout:
    """Document spans in absolute (padded) key positions: ``starts``/``ends`` ``[batch, K]`` (``(0, 0)``:
    no document), one row for every forward-pass row (``batched=False``) or one per row."""

    def __init__(self, starts: Tensor, ends: Tensor, *, batched: bool):
        self.starts, self.ends, self.batched = starts, ends, batched
        self.valid = ends > starts  # [batch, K]
        self.row_min = torch.where(self.valid, ends, torch.zeros_like(ends)).amax(-1)  # rows that see every doc
        self.max_end = int(ends.max())


def _calibration_hook(layer: int, heads_here: list[int], lay: _DocLayout, weights: Tensor, strength: float, *,
                      identity: bool, clock: "_Clock | None") -> Callable[..., Tensor]:
    """``hook_pattern`` of one layer: each document's mass moved towards ``M · weights`` on ``heads_here``."""
    idx_cpu = torch.tensor(heads_here, dtype=torch.long)
    state: dict[str, Any] = {}

    def hook(pattern: Float[Tensor, "batch head q k"], hook=None):
        # key column c is at absolute position total - k_len + c; query row r at total - q_len + r
        q_len, k_len = pattern.shape[-2], pattern.shape[-1]
        total = k_len
        if clock is not None and clock.total is not None and clock.total >= k_len:
            total = clock.total
        if lay.max_end > total:
            raise ValueError(f"PositionalCalibration: documents reach position {lay.max_end} but the sequence at "
                             f"layer {layer} has {total} positions: attach it with this prompt.")
        _check_batch_rows(lay, pattern.shape[0])
        if identity:
            return pattern
        dev = pattern.device
        if state.get("device") != dev:
            state.update(device=dev, idx=idx_cpu.to(dev))
        if int(lay.row_min.min()) >= total:  # no row sees every document: untouched
            return pattern
        new = _calibrate_rows(pattern.index_select(1, state["idx"]), lay, weights, strength,
                              first_key=total - k_len, first=total - q_len)
        return pattern.index_copy(1, state["idx"], new)  # other heads copied bit for bit

    return hook


def _check_batch_rows(lay: _DocLayout, batch: int) -> None:
    if lay.batched and batch != lay.starts.shape[0]:
        raise ValueError(f"PositionalCalibration was attached for a batch of {lay.starts.shape[0]} rows but the "
                         f"forward pass has {batch}: attach it with the prompts of this batch.")


def _calibrate_rows(pattern: Float[Tensor, "b n q k"], lay: _DocLayout, weights: Float[Tensor, "B n K"],
                    strength: float, *, first_key: int, first: int) -> Float[Tensor, "b n q k"]:
    """:class:`PositionalCalibration`'s edit of the chosen heads' rows (a new tensor, or ``pattern`` itself).

    ``pattern``: those heads only, in the order of ``weights``; key column c at absolute position
    ``first_key + c``, row r at ``first + r``. Each document's mass moves towards ``M · weights`` in every
    row that sees every document and gives each some attention; other rows are unchanged. The one
    definition both engines apply (the bridge's ``hook_pattern`` hook, the fused engine's explicit rows).
    """
    q_len, k_len = pattern.shape[-2], pattern.shape[-1]
    r0 = max(0, int(lay.row_min.min()) - first)  # earlier rows cannot see every document: untouched
    if r0 >= q_len:
        return pattern
    dev = pattern.device
    st, en, valid0, row_min, w0 = (t.to(dev) for t in (lay.starts, lay.ends, lay.valid, lay.row_min, weights))
    sub = pattern[:, :, r0:]  # [b, n, q', k]
    pos = torch.arange(first_key, first_key + k_len, device=dev)
    member = ((pos >= st[..., None]) & (pos < en[..., None])).double()  # [B, K, k]
    if member.shape[0] != sub.shape[0]:
        member = member.expand(sub.shape[0], -1, -1)
    mass = torch.einsum("bnqk,bjk->bnqj", sub.double(), member)  # [b, n, q', K]
    valid = valid0.expand(sub.shape[0], -1)[:, None, None, :]
    total_mass = mass.sum(-1, keepdim=True)
    w = w0.expand(sub.shape[0], -1, -1)[:, :, None, :]  # [b, n, 1, K]
    new = (1.0 - strength) * mass + strength * total_mass * w
    qpos = torch.arange(first + r0, first + q_len, device=dev)
    row_ok = qpos[None, :] >= row_min.expand(sub.shape[0])[:, None]  # [b, q']
    ok = ((mass > 0) | ~valid).all(-1) & row_ok[:, None, :]  # [b, n, q']
    factor = torch.where(ok[..., None] & valid, new / torch.where(mass > 0, mass, 1.0), 1.0)
    scale = 1.0 + torch.einsum("bnqj,bjk->bnqk", factor - 1.0, member)
    edited = (sub * scale.to(sub.dtype))
    full = pattern.clone()
    full[:, :, r0:] = torch.where(ok[..., None], edited, sub)
    return full


# --------------------------------------------------------------------------------------------------
# Self-located span
# --------------------------------------------------------------------------------------------------


class SelfLocatedSpan(InterventionSpec):
    """Split softmax (or PASTA) on the document the model's own heads pick: the oracle without the label.

    For each example, :func:`locate_span` (one partial pass over the prompt, stopping after the last
    locating head's layer) picks the ``top`` document(s) that ``locate_heads`` attend to most from the
    query rows; then ``edit`` is attached with that span instead of ``r.relevant``. The guess is never the
    gold label, which this spec does not read; :meth:`locate` returns it for reporting.

    Args:
        edit: a :class:`SplitSoftmax` or :class:`Pasta` with the default span rule (``"relevant"``): its heads
            and strength are used, its span is replaced by the located document(s).
        locate_heads: the heads that locate (default: ``edit``'s heads; e.g. the top contextual heads).
        top: 1 (the top document) or more (their union; all the documents of a prompt that has fewer).
        query: ``"question"`` (default, the probe's best) or ``"last"`` (the last ``n_last`` prompt tokens).
        baseline: ``"none"`` or ``"dummy"`` (positionally calibrated scores, :func:`locate_span`).
        dummy: the dummy text for ``baseline="dummy"``.
    """

    kind = "self_located_span"
    __slots__ = ("edit", "locate_heads", "top", "query", "n_last", "baseline", "dummy")

    def __init__(self, edit: SplitSoftmax | Pasta, *, locate_heads: Sequence[Sequence[int]] | None = None,
                 top: int = 1, query: QueryRows = "question", n_last: int = 8,
                 baseline: Literal["none", "dummy"] = "none", dummy: str = DUMMY_TEXT):
        what = "SelfLocatedSpan"
        if not isinstance(edit, (SplitSoftmax, Pasta)):
            raise TypeError(f"{what}: edit must be a SplitSoftmax or a Pasta spec, got {type(edit).__name__}.")
        if edit.span != "relevant":
            raise ValueError(f"{what}: the located document replaces the edit's span; build the edit with the "
                             f"default span rule (got span={edit.span!r}).")
        self.edit = edit
        self.locate_heads = head_list(edit.heads if locate_heads is None else locate_heads, what=what)
        self.top = check_count(top, name="top", what=what)
        if query not in ("question", "last"):
            raise ValueError(f"{what}: query must be 'question' or 'last', got {query!r}.")
        self.query = query
        self.n_last = check_count(n_last, name="n_last", what=what) if query == "last" else None
        if baseline not in ("none", "dummy"):
            raise ValueError(f"{what}: baseline must be 'none' or 'dummy', got {baseline!r}.")
        self.baseline = baseline
        if baseline == "dummy" and (not isinstance(dummy, str) or not dummy.strip()):
            raise ValueError(f"{what}: dummy must be a non-empty text, got {dummy!r}.")
        self.dummy = dummy if baseline == "dummy" else None
        self._freeze()

    @property
    def heads(self) -> tuple[Head, ...]:
        return self.edit.heads

    def _ctor(self):
        return (self.edit,), {"locate_heads": self.locate_heads, "top": self.top, "query": self.query,
                              "n_last": self.n_last or 8, "baseline": self.baseline,
                              "dummy": self.dummy or DUMMY_TEXT}

    def _identity(self) -> dict[str, Any]:
        edit = {k: v for k, v in self.edit.identity.items() if k not in ("span", "focuslens")}
        return {"edit": edit, "locate_heads": [list(h) for h in self.locate_heads], "top": self.top,
                "query": self.query, "n_last": self.n_last, "baseline": self.baseline, "dummy": self.dummy}

    @property
    def per_example(self) -> bool:
        return True

    def locate(self, model: HookedModel, example: Any, *, engine: Any = None) -> LocatedSpan:
        """The guess for ``example`` (what :meth:`attach` edits): compare ``.doc`` with ``r.gold_position``
        (the pass on ``engine``, a fused engine built for ``model``, when given). A prompt with fewer
        documents than ``top`` gets all of them (e.g. a gold-only prompt: its one document)."""
        top = min(self.top, len(_doc_spans(example, what="SelfLocatedSpan")))
        return locate_span(model, example, heads=self.locate_heads, query=self.query, n_last=self.n_last or 8,
                           top=top, baseline=self.baseline, dummy=self.dummy or DUMMY_TEXT, engine=engine)

    def attach(self, model: HookedModel, example: Any = None) -> HookHandle:
        located = self.locate(model, example)
        return self.edit.attach_spans(model, list(located.spans), seq_len=int(tokens_of(example).shape[-1]))

    def attach_batch(self, model: HookedModel, examples: Sequence[Any], *, offsets: Sequence[int]) -> HookHandle:
        """Each row located alone (as :meth:`attach` does), then the edit with each row's span and padding."""
        self._width(examples, offsets, "attach_batch")
        return self.attach_measured(model, self.measure(model, examples), examples, offsets=offsets)

    @property
    def measures(self) -> bool:
        return True  # the locating pass of each prompt

    def measure(self, model: HookedModel, examples: Sequence[Any],
                prior: InterventionSpec | None = None, *, engine: Any = None) -> list[list[Span]]:
        """Each row's located span(s) (:meth:`locate`), each row alone, ``prior`` attached around its pass (on
        ``model``; or the pass on ``engine``, a fused engine built for ``model``, with no ``prior``)."""
        _no_prior_on_engine(prior, engine, "SelfLocatedSpan")
        out = []
        for e in examples:
            handle = prior.attach(model, e) if prior is not None else None
            try:
                out.append(list(self.locate(model, e, engine=engine).spans))
            finally:
                if handle is not None:
                    handle.remove()
        return out

    def attach_measured(self, model: HookedModel, measured: Any, examples: Sequence[Any], *,
                        offsets: Sequence[int]) -> HookHandle:
        width = self._width(examples, offsets, "attach_batch")
        return self.edit.attach_spans(model, list(measured), seq_len=width, offsets=list(offsets))

    def attach_fused(self, engine: Any, examples: Sequence[Any], *, offsets: Sequence[int]) -> HookHandle:
        """The edit on the fused engine (:meth:`SplitSoftmax.attach_spans_fused
        <focuslens.intervene.span_specs.SplitSoftmax.attach_spans_fused>`: only the edit's heads recomputed) on
        the located spans; the locating pass runs on the engine too (``measure(..., engine=)``, the bridge's
        masses to float rounding), each row alone, as :meth:`attach_batch` locates. Inside a
        :class:`Compose`, it locates on the bridge (``engine.hooked``) with the members before it attached."""
        self._width(examples, offsets, "attach_fused")
        measured = self.measure(measuring_model(engine, "SelfLocatedSpan"), examples, engine=engine)
        return self.attach_measured_fused(engine, measured, examples, offsets=offsets)

    def attach_measured_fused(self, engine: Any, measured: Any, examples: Sequence[Any], *,
                              offsets: Sequence[int]) -> HookHandle:
        width = self._width(examples, offsets, "attach_fused")
        return self.edit.attach_spans_fused(engine, list(measured), seq_len=width, offsets=list(offsets))

    @staticmethod
    def _width(examples: Sequence[Any], offsets: Sequence[int], where: str) -> int:
        check_batch(examples, offsets, what="SelfLocatedSpan")
        widths = {int(tokens_of(e).shape[-1]) + o for e, o in zip(examples, offsets)}
        if len(widths) > 1:
            raise ValueError(f"SelfLocatedSpan.{where}: prompt length + offset differs between rows "
                             f"({sorted(widths)}); offsets must left-pad every prompt to the same width.")
        return widths.pop()

    def __repr__(self) -> str:
        return (f"SelfLocatedSpan({self.edit!r}, located by {format_heads(self.locate_heads)}, top={self.top}, "
                f"query={self.query!r}{', calibrated' if self.baseline == 'dummy' else ''})")

