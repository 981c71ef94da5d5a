"""Fused-attention backend: contextual scores and head interventions without N×N patterns.

Why this exists
---------------
A TransformerLens bridge runs attention eagerly: every layer materialises a ``[heads, N, N]`` score
matrix and pattern, so memory grows with N² and long prompts (8k tokens on SmolLM2, 32k on Llama-3.2)
run out of memory long before the model's own context limit. The quantities focuslens needs never
require the full pattern: a contextual score only involves the *response rows*
(``O(heads · |R| · N)``), split softmax only the *selected heads*, and a focus direction is a change
of the selected heads' post-RoPE queries.

How it works
------------
:class:`FusedModel` keeps a plain Hugging Face causal LM on its fast attention (PyTorch SDPA) and,
only while one of its measurements or interventions is active, switches the model to a registered
attention function (``transformers.AttentionInterface``, name :data:`ATTN_IMPL`). Transformers calls
that function in every layer with the **post-RoPE** query ``[b, H, q, d]``, key and value
``[b, G, k, d]`` (``G`` KV heads under grouped-query attention, after the KV-cache update), the mask and
the scaling. The function

1. adds ``α·u`` to the selected heads' queries (:meth:`FusedModel.inject_vectors`),
2. computes the fused SDPA output for all heads (exactly what the model computes without focuslens),
3. recomputes the split-softmax heads explicitly, row block by row block, and overwrites their slices
   of the output (:meth:`FusedModel.split_softmax`),
4. for a scoring pass, computes the response rows of every head's pattern (``[b, H, |R|, N]``, fp32),
   applies the same split-softmax edits to them, and adds their mass on each named span into an fp32
   ``[layer, head]`` accumulator (:meth:`FusedModel.score_spans`).

On exit the previous attention implementation is restored and the registration is removed (also after
exceptions). Numbers agree with the eager TransformerLens path to ~1e-6 in fp32.

Which backend should you use? The TransformerLens bridge for exploration (every hook point, caches,
patching); this backend for long prompts, large models, bf16 on GPU, and batch scoring where only
``[layer, head]`` results matter. ``evaluate`` runs on it by itself (``engine="auto"``): a bridge's
weights are shared with a plain HF model (:func:`focuslens.engine.engine_for`), specs attach with
``spec.attach_fused`` (:meth:`FusedModel.span_edit`, :meth:`FusedModel.inject_vectors`,
:meth:`FusedModel.ablate`), and the library's decoding loop calls :meth:`FusedModel.forward_with_cache`.
:func:`focuslens.backends.fused.load_fused` loads a checkpoint straight into one.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..core.checks import check_count, check_scaled, frozen_vectors, real
from ..core.hooks import HookHandle
from ..core.prompts import SpanLike
from ..intervene.edits import SpanLayout
from ..score.contextual import HeadScores, head_scores, named_spans
from .attention import (
    _OWNERS,
    ATTN_IMPL,
    _Ablation,
    _chunked_forward,
    _Injection,
    _Recorder,
    _register,
    _RowEdit,
    _ScoreEdit,
    _SpanEdit,
    _unregister,
)

SpansLike = SpanLike | Sequence[SpanLike]

__all__ = ["FusedModel", "BackendHandle", "DEFAULT_ROW_BLOCK", "DEFAULT_MLP_CHUNK"]

DEFAULT_ROW_BLOCK = 256
DEFAULT_MLP_CHUNK = 2048

Head = tuple[int, int]

class BackendHandle(HookHandle):
    """An active fused-backend edit: ``.remove()`` (idempotent) or a ``with`` block, like a
    :class:`~focuslens.core.hooks.HookHandle` (it is one, so :func:`focuslens.intervene.eager.compose` takes it).

    While it is active the model runs on the focuslens attention function; removing the last active
    edit restores the previous attention implementation.
    """

    def __init__(self, fm: "FusedModel", registry: list, item: Any, *, label: str):
        self.model = fm
        self.label = label
        self._handles = []  # unused: no TransformerLens hooks
        self._registry = registry
        self._item = item
        self._stack: contextlib.ExitStack | None = contextlib.ExitStack()
        self._stack.enter_context(fm._active())
        registry.append(item)

    @property
    def active(self) -> bool:
        return self._stack is not None

    @property
    def n_hooks(self) -> int:
        return 0

    def remove(self) -> None:
        """Undo the edit (idempotent); other edits stay active."""
        stack, self._stack = self._stack, None
        if stack is None:
            return
        try:
            if any(x is self._item for x in self._registry):
                self._registry[:] = [x for x in self._registry if x is not self._item]
        finally:
            stack.close()

    def __repr__(self) -> str:
        return f"<BackendHandle {self.label}: {'active' if self.active else 'removed'}>"


# --------------------------------------------------------------------------------------------------
# The model wrapper
# --------------------------------------------------------------------------------------------------


class FusedModel:
    """A Hugging Face causal LM scored and steered through its fused (SDPA) attention.

    Mirrors the TransformerLens-path functions of focuslens with ``[layer, head]`` results, but never
    builds an ``[N, N]`` pattern for heads that are not selected. Works with any HF decoder whose
    attention uses ``ALL_ATTENTION_FUNCTIONS`` and has ``layer_idx`` (Llama, Qwen2, Mistral, Gemma...),
    on CPU or GPU, fp32 or bf16 (reductions in fp32), and with ``device_map="auto"`` splits (partial
    results are moved to one device).

    Args:
        hf_model: an HF ``PreTrainedModel`` (``...ForCausalLM``), eval mode. Its attention
            implementation is switched only inside focuslens contexts and restored afterwards.
        tokenizer: its tokenizer (kept for convenience; methods take token ids).
        row_block: query rows per explicit block for split-softmax heads (bounds the explicit
            pattern to ``[heads, row_block, N]``).
        mlp_chunk: in scoring passes, each layer's MLP runs over at most this many positions at a
            time (``None``: all at once). The MLP is position-wise, so the result is the same; its
            ``[N, d_ff]`` intermediates are the largest temporaries of a long-context forward, and
            chunking them keeps the scorer's peak memory below that of a plain forward.

    Example:
        >>> fm = load_fused()                                    # SmolLM2, sdpa, fp32, cpu
        >>> s = fm.contextual_scores(p.tokens, relevant=p["doc_3"], response=p.response)
        >>> s.shape                                              # [layer, head]
        torch.Size([30, 9])
        >>> with fm.split_softmax([(8, 0), (17, 3)], span=p["doc_3"], tau=0.2):
        ...     out = fm.generate(p.tokens[None], max_new_tokens=20, do_sample=False)
    """

    def __init__(self, hf_model: Any, tokenizer: Any = None, *, row_block: int = DEFAULT_ROW_BLOCK,
                 mlp_chunk: int | None = DEFAULT_MLP_CHUNK):
        if not isinstance(hf_model, torch.nn.Module) or not hasattr(hf_model, "config"):
            raise TypeError(f"FusedModel wraps a Hugging Face PreTrainedModel, got {type(hf_model).__name__}.")
        check_count(row_block, name="row_block", what="FusedModel")  # no bool, no truncated float
        if mlp_chunk is not None:
            check_count(mlp_chunk, name="mlp_chunk (or None)", what="FusedModel")
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        #: the hooked model (TransformerLens bridge) whose weights ``hf_model`` shares, when the engine
        #: was built for one (:func:`focuslens.engine.engine_for`); specs check artefacts against it
        self.hooked: Any = None
        self.row_block = int(row_block)
        self.mlp_chunk = None if mlp_chunk is None else int(mlp_chunk)
        # position-wise feed-forward blocks (``...layers[i].mlp``), chunked over positions in scoring passes
        self._mlps = [m for name, m in hf_model.named_modules() if name.endswith(".mlp")]
        cfg = hf_model.config
        self.n_layers = int(cfg.num_hidden_layers)
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        self.d_head = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads)
        layers = {}
        for m in hf_model.modules():
            idx = getattr(m, "layer_idx", None)
            if idx is not None and hasattr(m, "o_proj") and hasattr(m, "q_proj"):
                layers[int(idx)] = m
        if sorted(layers) != list(range(self.n_layers)):
            raise ValueError(
                f"Could not find one attention module with layer_idx per layer (found {sorted(layers)}, "
                f"expected 0..{self.n_layers - 1}); this backend supports HF decoders whose attention "
                "modules have q_proj/o_proj and layer_idx (Llama, Qwen2, Mistral, Gemma...)."
            )
        self._attn_modules = [layers[i] for i in range(self.n_layers)]
        me = weakref.ref(self)
        for i, m in enumerate(self._attn_modules):
            _OWNERS[m] = (me, i)
        self._active_depth = 0
        self._saved_impl: str | None = None
        self._span_edits: list[_SpanEdit | _RowEdit] = []  # post-softmax edits, in the order attached
        self._injections: list[_Injection] = []
        self._ablations: list[_Ablation] = []
        self._score_edits: list[_ScoreEdit] = []
        self._recorder: _Recorder | None = None

    # ---------------------------------------------------------------- plumbing
    @property
    def dtype(self) -> torch.dtype:
        """The model's floating-point dtype (what ``alpha * u`` must be finite in)."""
        return next((p.dtype for p in self.hf_model.parameters() if p.is_floating_point()), torch.float32)

    @property
    def attn_implementation(self) -> str:
        """The attention implementation currently set on the model's config."""
        return self.hf_model.config._attn_implementation

    @property
    def input_device(self) -> torch.device:
        """Device of the input embeddings (where token ids go, and where scores are accumulated)."""
        return self.hf_model.get_input_embeddings().weight.device

    @contextlib.contextmanager
    def _chunked_mlps(self) -> Iterator[None]:
        """Run every ``.mlp`` over ``mlp_chunk`` positions at a time; restore the forwards on exit."""
        chunk = self.mlp_chunk
        if chunk is None or not self._mlps:
            yield
            return
        saved = []
        try:
            for m in self._mlps:
                own = m.__dict__.get("forward")  # an instance-level forward (accelerate's device hooks)
                saved.append((m, own))
                m.forward = _chunked_forward(m.forward, chunk)
            yield
        finally:
            for m, own in reversed(saved):
                if own is None:
                    m.__dict__.pop("forward", None)
                else:
                    m.forward = own

    @contextlib.contextmanager
    def _active(self) -> Iterator[None]:
        """Switch to the focuslens attention function; restore the previous one on exit."""
        if self._active_depth == 0:
            other = _OWNERS.get(self._attn_modules[0])
            other = other[0]() if other is not None else None
            if other is not None and other is not self and other._active_depth:
                raise RuntimeError(
                    "Another FusedModel wrapping the same HF model has an active context; use one "
                    "wrapper per model (nest contexts on it instead)."
                )
            me = weakref.ref(self)
            for i, m in enumerate(self._attn_modules):  # this wrapper now owns the modules
                _OWNERS[m] = (me, i)
            _register()
            try:
                self._saved_impl = self.hf_model.config._attn_implementation
                self.hf_model.set_attn_implementation(ATTN_IMPL)
            except BaseException:
                _unregister()
                raise
        self._active_depth += 1
        try:
            yield
        finally:
            self._active_depth -= 1
            if self._active_depth == 0:
                try:
                    self.hf_model.set_attn_implementation(self._saved_impl or "sdpa")
                finally:
                    _unregister()

    def _tokens(self, tokens: Any) -> Int[Tensor, "1 pos"]:
        if hasattr(tokens, "tokens") and not isinstance(tokens, Tensor):  # LabelledPrompt
            tokens = tokens.tokens
        t = torch.as_tensor(tokens)
        if t.dim() == 1:
            t = t[None]
        if t.dim() != 2 or t.shape[0] != 1:
            raise ValueError(
                f"Scoring takes one sequence of token ids, shaped [pos] or [1, pos]; got {tuple(t.shape)}. "
                "Score a batch one example at a time (spans differ between examples)."
            )
        if t.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be integer ids, got dtype {t.dtype}.")
        return t.to(self.input_device)

    def _check_heads(self, heads: Iterable[Sequence[int]]) -> list[Head]:
        from ..core.checks import validate_heads

        out = validate_heads(heads, n_layers=self.n_layers, n_heads=self.n_heads)
        if not out:
            raise ValueError("No heads given: pass at least one (layer, head) pair.")
        return out

    # ---------------------------------------------------------------- scoring
    @torch.no_grad()
    def score_spans(
        self,
        tokens: Int[Tensor, "pos"] | Int[Tensor, "1 pos"],
        *,
        response: SpanLike,
        spans: Mapping[str, SpansLike] | None = None,
        distractors: Sequence[SpanLike] | None = None,
        sink: SpanLike | int | None = 1,
    ) -> HeadScores:
        """Mean attention mass that the response rows put on each named span, per head.

        Same protocol and result as :func:`focuslens.score.contextual.score_spans` (a
        :class:`~focuslens.score.contextual.HeadScores` with ``sink``, ``distractor_i``, ``distractors_total``,
        ``distractors_max`` and the ``[layer, head, pos]`` columns, ``method="fused"``):
        ``s[name][l, h] = (1/|R|) Σ_{t∈R} Σ_{j∈span} A^{l,h}_{t,j}``, computed in one forward pass
        that builds only the ``[H, |R|, N]`` rows of each layer (fp32). Active split-softmax edits are
        applied to those rows (the score is that of the pattern the model uses).

        Args:
            tokens: token ids ``[pos]`` or ``[1, pos]`` (a ``LabelledPrompt`` works too).
            response: the scoring rows, a half-open token span.
            spans: named key spans (``{"relevant": p["doc_3"]}``); a value may be a list of spans
                (their union, each position counted once). Every span must end at or before
                ``response.start``. ``sink`` and ``distractor_*`` are reserved names.
            distractors: distractor spans (``distractor_1``.. and the aggregates).
            sink: the first ``n`` tokens (default 1), a span, or None.
        """
        ids = self._tokens(tokens)
        n = ids.shape[1]
        if not spans and not distractors and sink is None:
            raise ValueError("spans is empty and sink=None: nothing to score; name a span, e.g. {'relevant': (10, 40)}.")
        rows, named, n_dis = named_spans(n, response=response, spans=spans, distractors=distractors, sink=sink)
        if self._recorder is not None:
            raise RuntimeError("score_spans is already running on this model (nested scoring is not supported).")
        cols = torch.zeros(self.n_layers, self.n_heads, n, dtype=torch.float32, device=self.input_device)
        rec = _Recorder(rows=rows, columns=cols, seen=set())
        # the response-row workspace is allocated once, before the forward's own allocations
        rec.workspace(self.input_device, self.n_heads * len(rows) * n)
        with self._active(), self._chunked_mlps():
            self._recorder = rec
            try:
                self.hf_model(input_ids=ids, use_cache=False, **_logits_kwargs(self.hf_model))
            finally:
                self._recorder = None
        if len(rec.seen) != self.n_layers:
            raise RuntimeError(
                f"Only layers {sorted(rec.seen)} reported response rows; the model's attention did not go "
                f"through {ATTN_IMPL!r} in every layer."
            )
        return head_scores((cols / len(rows)).cpu(), rows, named, n_dis, method="fused")

    def contextual_scores(
        self,
        tokens: Int[Tensor, "pos"] | Int[Tensor, "1 pos"],
        *,
        relevant: SpansLike,
        response: SpanLike,
    ) -> Float[Tensor, "layer head"]:
        """Contextual score of every head: response rows' mean attention mass on ``relevant``.

        Same definition and numbers as the TransformerLens path
        (``focuslens.score.contextual.contextual_scores(bridge, tokens, relevant=..., response=...)``), in
        ``O(heads · |R| · N)`` extra memory instead of ``O(heads · N²)``.

        Returns:
            ``Tensor[n_layers, n_heads]`` fp32 on the CPU.
        """
        return self.score_spans(tokens, response=response, spans={"relevant": relevant}, sink=None)["relevant"]

    # ---------------------------------------------------------------- interventions
    def split_softmax(
        self,
        heads: Iterable[Sequence[int]],
        span: SpanLike | Sequence[SpanLike] | None = None,
        tau: float | None = None,
    ) -> BackendHandle:
        """Split softmax on ``heads``: each query row's mass on ``span`` goes from π to π^τ.

        The edit of :func:`focuslens.intervene.eager.split_softmax` (same arguments, positional or
        keyword; ``span`` may be a list of spans, their union):
        ``A'_{t,j} = A_{t,j}·π^τ/π`` inside the span, ``A_{t,j}·(1−π^τ)/(1−π)`` outside; rows with no
        mass on the span (e.g. before it) or none outside it are unchanged; ``tau = 1`` is the
        identity. Applied at prefill and every decoding step of ``generate`` (the span is in absolute
        key positions, so it holds for the cached prompt keys). Only the selected heads get an explicit
        pattern, in blocks of ``row_block`` query rows; the other heads stay fused.

        Returns:
            a :class:`BackendHandle`: active at once; ``.remove()`` or use it in a ``with`` block.

        Example:
            >>> with fm.split_softmax([(8, 0)], p["doc_3"], 0.2):
            ...     fm.generate(p.tokens[None], max_new_tokens=20, do_sample=False)
        """
        from ..intervene.edits import split_softmax_pattern

        if span is None or tau is None:
            raise TypeError("split_softmax(heads, span, tau) needs a span and tau.")
        tau = float(tau)
        if not math.isfinite(tau) or tau <= 0:
            raise ValueError(f"tau must be a finite number > 0 (1 = identity, < 1 raises attention on the span); got {tau}.")

        def edit(p: Tensor, mask: Tensor, *, query_positions: Tensor, min_query: int | Tensor) -> Tensor:
            return split_softmax_pattern(p, mask, tau, query_positions=query_positions, min_query=min_query)

        return self.span_edit(heads, span, edit=edit, identity=False, label=f"fused split_softmax(tau={tau:g}")

    def span_edit(
        self,
        heads: Iterable[Sequence[int]],
        spans: Any,
        *,
        edit: Callable[..., Tensor],
        identity: bool,
        label: str,
        offsets: Sequence[int] | None = None,
        seq_len: int | None = None,
    ) -> BackendHandle:
        """Apply ``edit(pattern, key_mask, query_positions=, min_query=)`` to ``heads``' attention rows.

        The engine side of :func:`focuslens.intervene.edits.attach_span_edit` (what
        :class:`~focuslens.intervene.span_specs.SplitSoftmax` and :class:`~focuslens.intervene.span_specs.Pasta`
        attach through, :meth:`InterventionSpec.attach_fused <focuslens.intervene.specs.InterventionSpec.attach_fused>`):
        the same arguments and the same span layout. ``spans``: absolute positions of an unpadded
        prompt (a span or a list, their union), or with ``offsets`` (a left-padded batch) one per row in
        that row's unpadded positions, shifted here by its padding. ``identity``: the edit changes
        nothing (τ = 1, coefficient 1): no head is recomputed, the output is the fused one bit for bit.
        Only the edited heads get explicit rows (``row_block`` at a time); applied at the prefill and
        every cached decoding step.
        """
        hs = self._check_heads(heads)
        by_layer: dict[int, list[int]] = {}
        if not identity:
            for l, h in hs:
                by_layer.setdefault(l, []).append(h)
        layout = SpanLayout(spans, offsets=offsets, seq_len=seq_len, what="span_edit")
        item = _SpanEdit(by_layer, edit, layout)
        where = f"spans={layout.spans}" if offsets is None else f"batch of {len(offsets)}"
        return BackendHandle(self, self._span_edits, item, label=f"{label}, {len(hs)} heads, {where})")

    def ablate(
        self,
        heads: Iterable[Sequence[int]],
        *,
        means: Mapping[Head, Float[Tensor, " d_head"]] | None = None,
    ) -> BackendHandle:
        """Zero (``means=None``) or mean-ablate ``heads``: their output before ``o_proj`` (``hook_z``) is
        replaced at every position, as :func:`focuslens.heads.patching.ablate_heads` does on the bridge."""
        hs = self._check_heads(heads)
        by_layer: dict[int, tuple[list[int], list[Tensor]]] = {}
        for l, h in hs:
            by_layer.setdefault(l, ([], []))
            by_layer[l][0].append(h)
            if means is not None:
                if (l, h) not in means:
                    raise ValueError(f"ablate: means has no entry for head ({l}, {h}).")
                v = torch.as_tensor(means[(l, h)]).detach()
                if v.shape != (self.d_head,):
                    raise ValueError(f"Mean for head ({l}, {h}) has shape {tuple(v.shape)}; expected ({self.d_head},).")
                by_layer[l][1].append(v)
        abl = _Ablation({l: (h, torch.stack(v) if v else None) for l, (h, v) in by_layer.items()})
        mode = "zero" if means is None else "mean"
        return BackendHandle(self, self._ablations, abl, label=f"fused ablate({mode}, {len(hs)} heads)")

    def _by_layer(self, heads: Iterable[Sequence[int]], identity: bool) -> tuple[list[Head], dict[int, list[int]]]:
        hs = self._check_heads(heads)
        by_layer: dict[int, list[int]] = {}
        if not identity:
            for l, h in hs:
                by_layer.setdefault(l, []).append(h)
        return hs, by_layer

    def pattern_edit(
        self,
        heads: Iterable[Sequence[int]],
        apply: Callable[[Tensor, Tensor, int], Tensor],
        *,
        identity: bool,
        label: str,
    ) -> BackendHandle:
        """Apply a spec's own post-softmax edit to ``heads``' explicit rows (``hook_pattern`` on the bridge).

        ``apply(pattern, query_positions, layer)``: ``pattern`` ``[b, n, r, k]`` fp32 rows of the layer's heads
        among ``heads`` (in the order given), keys at absolute positions ``0..k-1``, rows at the absolute
        ``query_positions`` ``[r]`` (the last ``r`` of the ``k`` positions, a block of ``row_block`` rows at a
        time); returns the edited rows. For edits that are not around one span per row (the span edits
        go through :meth:`span_edit`), e.g. :class:`~focuslens.intervene.label_free.PositionalCalibration`.
        ``identity``: nothing is recomputed, the output is the fused one bit for bit.
        """
        hs, by_layer = self._by_layer(heads, identity)
        return BackendHandle(self, self._span_edits, _RowEdit(by_layer, apply), label=f"{label}, {len(hs)} heads)")

    def score_edit(
        self,
        heads: Iterable[Sequence[int]],
        apply: Callable[[Tensor, Tensor, int], Tensor],
        *,
        identity: bool,
        label: str,
    ) -> BackendHandle:
        """Edit ``heads``' attention scores before the softmax (``hook_attn_scores`` on the bridge).

        ``apply(scores, visible, layer)``: ``scores`` ``[b, n, r, k]`` fp32, scaled by the layer's scale and
        soft-capped where the model caps, for the layer's heads among ``heads`` (in the order given);
        ``visible`` bool, broadcastable to it: the keys each row sees (causal, window, left padding). Masked
        entries are masked again after it, whatever it returns there. Used by
        :class:`~focuslens.intervene.label_free.Temperature`; only the edited heads get explicit rows.
        """
        hs, by_layer = self._by_layer(heads, identity)
        return BackendHandle(self, self._score_edits, _ScoreEdit(by_layer, apply), label=f"{label}, {len(hs)} heads)")

    def no_edit(self, label: str = "no intervention") -> BackendHandle:
        """A handle that changes nothing (the model still runs on the engine's attention function)."""
        return BackendHandle(self, [], None, label=label)

    def inject_vectors(
        self, vectors: Mapping[Head, Float[Tensor, " d_head"]], *, alpha: float = 1.0
    ) -> BackendHandle:
        """Add ``alpha · u^{l,h}`` to the post-RoPE query of head (l, h) at every position.

        ``vectors`` maps ``(layer, head)`` to a ``[d_head]`` vector (a focus direction). Applied at
        prefill and every decoding step; ``alpha = 0`` is the identity. Returns a :class:`BackendHandle`
        (``.remove()``; context manager), like :func:`focuslens.intervene.eager.inject_vectors`.
        """
        # the bridge's checks (focuslens.core.checks, as InjectVectors): finite [d_head] (or [batch, d_head])
        # vectors of one shape, heads in range, a real finite alpha, alpha * u finite in the model's dtype; a
        # query or an attention output that still overflows on a pass raises in the attention function
        vs = frozen_vectors(vectors, what="inject_vectors", d_head=self.d_head, rows=True)
        hs = self._check_heads(list(vs))
        alpha = real(alpha, name="alpha", what="inject_vectors")
        check_scaled(vs, alpha, dtype=self.dtype, what="inject_vectors")
        by_layer: dict[int, tuple[list[int], list[Tensor]]] = {}
        for l, h in hs:
            by_layer.setdefault(l, ([], []))
            by_layer[l][0].append(h)
            by_layer[l][1].append(vs[(l, h)].to(torch.float64))  # exact; α·u rounded once in the model's dtype
        # [n, d], or [b, n, d] with one vector per batch row
        inj = _Injection({l: (h, torch.stack(v, dim=-2)) for l, (h, v) in by_layer.items()}, alpha)
        return BackendHandle(self, self._injections, inj,
                             label=f"fused inject_vectors(alpha={alpha:g}, {len(hs)} heads)")

    # ---------------------------------------------------------------- running
    @contextlib.contextmanager
    def attached(self, spec: Any, examples: Sequence[Any], offsets: Sequence[int]) -> Iterator[None]:
        """``spec`` (an intervention spec with ``spec.fused``, or None) attached to this engine for one
        left-padded batch (``offsets`` from :func:`focuslens.core.generation.left_pad_offsets`), the engine's
        attention function active; everything removed and the attention implementation restored on
        exit, also after an exception."""
        with self._active():
            if spec is None:
                yield
                return
            handle = spec.attach_fused(self, examples, offsets=list(offsets))
            try:
                yield
            finally:
                handle.remove()

    @torch.no_grad()
    def forward_with_cache(
        self,
        tokens: Int[Tensor, "batch new"],
        cache: Any = None,
        *,
        attention_mask: Int[Tensor, "batch total"] | None = None,
        logits_to_keep: int | None = None,
    ) -> tuple[Float[Tensor, "batch pos vocab"], Any]:
        """One cached forward pass of the HF model: ``(logits, cache)``, the contract of
        :func:`focuslens.core.forward.forward_with_cache` (what :func:`focuslens.core.generation.greedy_generate`
        calls with ``forward=``).

        ``attention_mask`` ``[batch, past + new]`` (1 on real tokens, left padding); each row's position
        ids are derived from it (``cumsum − 1``), as the TransformerLens bridge does, so a padded row
        sees the positions it would see alone.
        """
        kw: dict[str, Any] = {"input_ids": tokens, "use_cache": True}
        if cache is not None:
            kw["past_key_values"] = cache
        if attention_mask is not None:
            pos = attention_mask.long().cumsum(-1) - 1
            pos.masked_fill_(attention_mask == 0, 1)
            kw["attention_mask"] = attention_mask
            kw["position_ids"] = pos[:, -tokens.shape[1]:]
        if logits_to_keep is not None:
            kw["logits_to_keep"] = int(logits_to_keep)
        out = self.hf_model(**kw)
        return out.logits, out.past_key_values

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the HF model (under any active focuslens contexts)."""
        return self.hf_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``hf_model.generate`` (KV cache on by default); active interventions apply at every step."""
        kwargs.setdefault("pad_token_id", getattr(self.hf_model.generation_config, "pad_token_id", None) or getattr(self.hf_model.config, "eos_token_id", None))
        return self.hf_model.generate(*args, **kwargs)

    def __repr__(self) -> str:
        name = getattr(self.hf_model.config, "_name_or_path", "") or type(self.hf_model).__name__
        return (
            f"<FusedModel {name}: {self.n_layers} layers, {self.n_heads} heads ({self.n_kv_heads} KV), "
            f"attn={self.attn_implementation}, dtype={next(self.hf_model.parameters()).dtype}>"
        )


def _logits_kwargs(hf_model: Any) -> dict:
    """Ask for the last position's logits only: scoring needs none, and [N, vocab] is the largest tensor."""
    import inspect

    try:
        if "logits_to_keep" in inspect.signature(hf_model.forward).parameters:
            return {"logits_to_keep": 1}
    except (TypeError, ValueError):
        pass
    return {}
