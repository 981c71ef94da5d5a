"""Contextual scoring through nnsight tracing: locally, or remotely on NDIF-hosted large models.

Why this exists
---------------
Models such as Llama-3.1-70B do not fit on one workstation, and NDIF (the National Deep Inference
Fabric) runs them for researchers through `nnsight <https://nnsight.net>`_: the intervention code of a
``model.trace(...)`` block is shipped to the server and executed next to the model. Contextual scoring
fits this well because its result is tiny — one ``[layer, head]`` matrix per span — while the
attention patterns it is computed from are huge. So the reduction runs **inside** the trace and only
the ``[n_spans, layer, head]`` tensor is ``.save()``-d and sent back.

How it works
------------
For every layer the trace reads the post-RoPE query and key, the output of the attention module's
``apply_rotary_pos_emb`` call (nnsight's ``.source`` view of the forward), keeps the response rows of
the query, builds those rows of the attention pattern with :mod:`focuslens.core.attention` (the layer's
scale, soft-cap and causal + sliding-window visibility, read from the HF module before the trace;
``row_softmax`` in fp32, ``[H, |R|, N]``), and sums them over each span. The trace body uses torch,
plain values and two :mod:`focuslens.core.attention` functions; for NDIF (where focuslens is not installed)
that module is registered with ``nnsight.register`` so that it is shipped by value.

nnsight is an optional dependency, imported lazily: ``pip install nnsight==0.8.1``.

What was tested where: locally (CPU, offline) on tiny random Llama/Qwen2 models and SmolLM2-135M, where
the scores equal the fused backend and HF eager attention. ``remote=True`` needs an NDIF API key
(``nnsight.login()`` or ``nnsight.CONFIG.set_default_api_key(key)``) and network access, and was not
run here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..core.prompts import SpanLike
from ..score.contextual import HeadScores
from ..engine.fused import SpansLike

__all__ = ["NNsightScorer", "load_nnsight", "nnsight_contextual_scores", "nnsight_score_spans", "NNSIGHT_PIN"]

#: The nnsight version this backend was written and tested against.
NNSIGHT_PIN = "nnsight==0.8.1"
_INSTALL = f"pip install '{NNSIGHT_PIN}'"


def _require_nnsight():
    try:
        import nnsight  # noqa: F401
    except ImportError as e:  # pragma: no cover - exercised only without nnsight
        raise ImportError(
            "The nnsight backend needs the optional dependency nnsight. Install it with:  "
            f"{_INSTALL}   (it keeps the pinned torch/transformers versions)."
        ) from e
    return nnsight


class NNsightScorer:
    """Contextual scores of every head, computed inside an nnsight trace (local or NDIF).

    Args:
        model: an nnsight model (``nnsight.TransformersModel`` / ``LanguageModel``; for NDIF a hub
            name loaded without weights, e.g. ``TransformersModel("meta-llama/Llama-3.1-70B",
            task="text-generation")``), or an in-memory Hugging Face causal LM, which is wrapped.
        tokenizer: the tokenizer when wrapping an HF model.
        rope_site: name of the post-RoPE call in the attention module's ``.source`` view
            (``apply_rotary_pos_emb_0`` for Llama, Qwen2, Mistral, Gemma...).
        layers_path: dotted path from the nnsight model to the list of decoder layers.

    Example:
        >>> sc = load_nnsight()                                      # SmolLM2, local
        >>> sc.contextual_scores(p.tokens, relevant=p["doc_3"], response=p.response).shape
        torch.Size([30, 9])
        >>> from nnsight import TransformersModel                    # NDIF (needs an API key)
        >>> big = NNsightScorer(TransformersModel("meta-llama/Llama-3.1-70B", task="text-generation"))
        >>> big.contextual_scores(tokens, relevant=..., response=..., remote=True)
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        rope_site: str = "apply_rotary_pos_emb_0",
        layers_path: str = "model.layers",
    ):
        nnsight = _require_nnsight()
        if isinstance(model, torch.nn.Module) and not hasattr(model, "trace"):
            if not hasattr(model, "config"):
                raise TypeError(f"Expected an nnsight model or an HF PreTrainedModel, got {type(model).__name__}.")
            if tokenizer is None:  # token ids only: the generic wrapper needs no tokenizer
                model = nnsight.NNsight(model)
            else:
                model = nnsight.TransformersModel(model, task="text-generation", tokenizer=tokenizer)
        if not hasattr(model, "trace"):
            raise TypeError(f"Expected an nnsight model (with .trace) or an HF model, got {type(model).__name__}.")
        self.model = model
        self.rope_site = rope_site
        self.layers_path = layers_path
        cfg = model.config
        self.n_layers = int(cfg.num_hidden_layers)
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        self.d_head = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads)

    def _layers(self):
        obj = self.model
        for part in self.layers_path.split("."):
            obj = getattr(obj, part)
        return obj

    def score_spans(
        self,
        tokens: Int[Tensor, "pos"] | Int[Tensor, "1 pos"],
        *,
        response: SpanLike,
        spans: Mapping[str, SpansLike] | None = None,
        distractors: Sequence[SpanLike] | None = None,
        sink: SpanLike | int | None = 1,
        remote: bool = False,
        keep_columns: bool | None = None,
        **trace_kwargs: Any,
    ) -> HeadScores:
        """Mean attention mass from the response rows to each named span, per head (fp32, CPU).

        Same protocol and result type as :func:`focuslens.score.contextual.score_spans`
        (:class:`~focuslens.score.contextual.HeadScores` with ``sink``, ``distractor_i``, ``distractors_total``,
        ``distractors_max``; ``method="nnsight"``). The rows are recomputed by
        :mod:`focuslens.core.attention` (each layer's scale, sliding window and soft-cap read from the HF
        attention module; :func:`~focuslens.core.attention.row_softmax`) and reduced inside the trace.

        Args:
            tokens: token ids ``[pos]`` or ``[1, pos]``.
            response: the scoring rows (half-open span).
            spans: named key spans; a value may be a list of spans (their union). Spans must end at
                or before ``response.start``.
            distractors, sink: as in :func:`focuslens.score.contextual.score_spans`.
            remote: run on NDIF (needs an API key and network); :mod:`focuslens.core.attention` is then
                registered with nnsight so that its functions are shipped by value.
            keep_columns: also bring back the ``[layer, head, pos]`` columns (``HeadScores.columns``,
                needed by ``.mass()``). Default: locally yes; remotely no — only the
                ``[n_spans, layer, head]`` masses leave the server (the columns are then ``[L, H, 0]``).
            trace_kwargs: passed to ``model.trace`` (e.g. ``backend=...``).
        """
        from ..core import attention as fa

        ids = _one_sequence(tokens)
        n = ids.shape[1]
        if not spans and not distractors and sink is None:
            raise ValueError("spans is empty and sink=None: nothing to score; name a span, e.g. {'relevant': (10, 40)}.")
        rows, named, n_dis, names, km = _key_masks(n, response, spans, distractors, sink)
        keep = (not remote) if keep_columns is None else bool(keep_columns)
        r0, r1 = rows.start, rows.end
        group = self.n_heads // self.n_kv_heads
        site = self.rope_site
        layers = self._layers()
        setup = self._trace_setup(layers, r0, r1, n)
        attention_logits, row_softmax = fa.attention_logits, fa.row_softmax
        if remote:
            nnsight = _require_nnsight()
            nnsight.register(fa)
        if not remote:
            dev = getattr(self.model, "device", None)
            if isinstance(dev, torch.device) and dev.type != "meta":
                ids = ids.to(dev)

        with self.model.trace(ids, remote=remote, **trace_kwargs):
            per_layer, cols = [], []
            for l in range(self.n_layers):
                scale, cap, vis = setup[l]
                q, k = getattr(layers[l].self_attn.source, site).output  # [b, H, N, d], [b, G, N, d] post-RoPE
                kf = k[0].repeat_interleave(group, dim=0)  # [H, N, d]
                lg = attention_logits(q[0, :, r0:r1], kf, scale=scale, softcap=cap)  # [H, r, N] fp32
                pat = row_softmax(lg, vis.to(lg.device)).sum(dim=1)  # [H, N]: Σ over response rows
                per_layer.append(km.to(pat.device) @ pat.T)  # [S, H]
                if keep:
                    cols.append(pat)
            result = (torch.stack(per_layer, dim=1) / (r1 - r0)).save()  # [S, L, H]
            columns = (torch.stack(cols) / (r1 - r0)).save() if keep else None
        return self._head_scores(result, columns if keep else None, names, n_dis, rows, named)

    def _trace_setup(self, layers, r0: int, r1: int, n: int) -> list[tuple[Any, Any, Tensor]]:
        """Plain values for the trace: per-layer scale, soft-cap and ``[R, N]`` visibility (causal +
        window), read from the HF attention modules; attention that q/k cannot recompute exactly raises."""
        from ..core import attention as fa

        plans = [fa.module_attention(layers[l].self_attn, layer=l, head_dim=self.d_head) for l in range(self.n_layers)]
        bad = next((p for p in plans if not p.exact), None)
        if bad is not None:
            raise ValueError(f"The nnsight scorer recomputes attention from q/k, which is not exact here ({bad.why}).")
        qpos = torch.arange(r0, r1)
        return [(p.scale, p.softcap, fa.visible_keys(qpos, n, sliding_window=p.sliding_window)) for p in plans]

    def _head_scores(self, result: Any, columns: Any, names: list[str], n_dis: int, rows, named) -> HeadScores:
        """The trace's saved ``[S, L, H]`` masses (and columns, unless ``None``) as :class:`HeadScores`."""
        from ..score.contextual import DISTRACTORS_MAX

        out = _value(result).detach().float().cpu()
        if out.shape != (len(names), self.n_layers, self.n_heads):
            raise RuntimeError(f"nnsight trace returned shape {tuple(out.shape)}; expected {(len(names), self.n_layers, self.n_heads)}.")
        scores = {k: out[i] for i, k in enumerate(names)}
        if n_dis:
            scores[DISTRACTORS_MAX] = torch.stack([scores[f"distractor_{i}"] for i in range(1, n_dis + 1)]).amax(0)
        colt = _value(columns).detach().float().cpu() if columns is not None else torch.zeros(self.n_layers, self.n_heads, 0)
        return HeadScores(scores=scores, columns=colt, response=rows, method="nnsight", spans=named)

    def contextual_scores(
        self,
        tokens: Int[Tensor, "pos"] | Int[Tensor, "1 pos"],
        *,
        relevant: SpansLike,
        response: SpanLike,
        remote: bool = False,
        **trace_kwargs: Any,
    ) -> Float[Tensor, "layer head"]:
        """Contextual score of every head (``Tensor[n_layers, n_heads]``, fp32, CPU)."""
        return self.score_spans(tokens, response=response, spans={"relevant": relevant}, sink=None, remote=remote,
                                keep_columns=False, **trace_kwargs)["relevant"]


def _one_sequence(tokens: Any) -> Tensor:
    """Token ids (or an object with ``.tokens``) as ``[1, pos]``; anything but one sequence raises."""
    if hasattr(tokens, "tokens") and not isinstance(tokens, Tensor):
        tokens = tokens.tokens
    ids = torch.as_tensor(tokens)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"Scoring takes one sequence of token ids, [pos] or [1, pos]; got {tuple(ids.shape)}.")
    return ids


def _key_masks(n: int, response: SpanLike, spans: Any, distractors: Any, sink: Any):
    """``(response rows, named spans, number of distractors, score names, [S, N] float key masks)``; the
    distractors' union is scored as ``distractors_total``."""
    from ..score.contextual import DISTRACTORS_TOTAL, named_spans, union_mask

    rows, named, n_dis = named_spans(n, response=response, spans=spans, distractors=distractors, sink=sink)
    masks = dict(named)
    if n_dis:
        masks[DISTRACTORS_TOTAL] = [s for i in range(1, n_dis + 1) for s in named[f"distractor_{i}"]]
    names = list(masks)
    km = torch.stack([union_mask(masks[k], n) for k in names]).float()  # [S, N] key masks
    return rows, named, n_dis, names, km


def _value(saved: Any) -> Tensor:
    """A saved value after the trace (older nnsight returns a proxy with ``.value``)."""
    return saved.value if hasattr(saved, "value") and not isinstance(saved, Tensor) else saved


def load_nnsight(
    name_or_path: str | os.PathLike | None = None,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    **scorer_kwargs: Any,
) -> NNsightScorer:
    """Load a local HF checkpoint (default: embedded SmolLM2) with SDPA and wrap it for nnsight scoring.

    For NDIF-hosted models construct the nnsight model yourself (no weights are downloaded) and pass
    it to :class:`NNsightScorer`.
    """
    _require_nnsight()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path is None:
        from ..core.models import ensure_default_checkpoint

        src = str(ensure_default_checkpoint())
    else:
        p = Path(str(name_or_path)).expanduser()
        src = str(p) if p.exists() else str(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    return NNsightScorer(model, AutoTokenizer.from_pretrained(src), **scorer_kwargs)


def nnsight_score_spans(model: Any, tokens: Any, *, response: SpanLike, spans: Mapping[str, SpanLike], remote: bool = False, **kw: Any):
    """Functional form of :meth:`NNsightScorer.score_spans` (wraps ``model`` on each call)."""
    return NNsightScorer(model).score_spans(tokens, response=response, spans=spans, remote=remote, **kw)


def nnsight_contextual_scores(model: Any, tokens: Any, *, relevant: SpanLike, response: SpanLike, remote: bool = False, **kw: Any):
    """Functional form of :meth:`NNsightScorer.contextual_scores`."""
    return NNsightScorer(model).contextual_scores(tokens, relevant=relevant, response=response, remote=remote, **kw)
