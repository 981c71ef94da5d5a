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
the query, builds those rows of the causal attention pattern (``[H, |R|, N]``, fp32), and sums them over
each span. The trace body uses only ``torch`` operations and plain Python values, so it runs
unchanged on NDIF (the server has no focuslens).

nnsight is an optional dependency, imported lazily: ``pip install nnsight==0.8.1``.

What was tested where: locally (CPU, offline) on tiny random Llama/Qwen2 models and SmolLM2-135M, where
the scores equal the fused backend and HF eager attention. ``remote=True`` needs an NDIF API key
(``nnsight.login()`` or ``nnsight.CONFIG.set_default_api_key(key)``) and network access, and was not
run here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..prompts import SpanLike, as_span
from ..prompts import normalise_spans
from .fused import SpansLike

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
        self.scaling = self.d_head**-0.5

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
        spans: Mapping[str, SpansLike],
        remote: bool = False,
        **trace_kwargs: Any,
    ) -> dict[str, Float[Tensor, "layer head"]]:
        """Mean attention mass from the response rows to each named span, per head (fp32, CPU).

        ``s[name][l, h] = (1/|R|) Σ_{t∈R} Σ_{j∈span} A^{l,h}_{t,j}`` — the same definition as
        :func:`focuslens.backends.fused.FusedModel.score_spans`. Only the ``[n_spans, layer, head]``
        result leaves the trace.

        Args:
            tokens: token ids ``[pos]`` or ``[1, pos]``.
            response: the scoring rows (half-open span).
            spans: named key spans; a value may be a list of spans (their union). Spans must end at
                or before ``response.start``.
            remote: run on NDIF (needs an API key and network).
            trace_kwargs: passed to ``model.trace`` (e.g. ``backend=...``).
        """
        if hasattr(tokens, "tokens") and not isinstance(tokens, Tensor):
            tokens = tokens.tokens
        ids = torch.as_tensor(tokens)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise ValueError(f"Scoring takes one sequence of token ids, [pos] or [1, pos]; got {tuple(ids.shape)}.")
        n = ids.shape[1]
        rows = as_span(response, seq_len=n, name="response")
        if not spans:
            raise ValueError("spans is empty: name at least one key span, e.g. {'relevant': (10, 40)}.")
        names = list(spans)
        km = torch.zeros(len(names), n, dtype=torch.float32)  # [S, N] key masks (unions allowed)
        for i, k in enumerate(names):
            for sp in normalise_spans(spans[k], seq_len=n, before=rows, name=f"span {k!r}"):
                km[i, sp.slice] = 1.0
        r0, r1 = rows.start, rows.end
        group = self.n_heads // self.n_kv_heads
        scaling = float(self.scaling)
        site = self.rope_site
        layers = self._layers()
        n_layers = self.n_layers
        neg = float(torch.finfo(torch.float32).min)  # masked logits (HF convention), a plain float
        if not remote:
            dev = getattr(self.model, "device", None)
            if isinstance(dev, torch.device) and dev.type != "meta":
                ids = ids.to(dev)

        # Everything inside the trace is plain torch on values from the model: it runs on NDIF as is.
        with self.model.trace(ids, remote=remote, **trace_kwargs):
            per_layer = []
            for l in range(n_layers):
                src = getattr(layers[l].self_attn.source, site)
                q, k = src.output  # [b, H, N, d], [b, G, N, d] post-RoPE
                qr = q[0, :, r0:r1].float()  # [H, r, d]
                kf = k[0].float().repeat_interleave(group, dim=0)  # [H, N, d]
                sc = (qr @ kf.transpose(-1, -2)) * scaling  # [H, r, N]
                key_pos = torch.arange(kf.shape[1], device=sc.device)
                row_pos = torch.arange(r0, r1, device=sc.device)
                sc = sc.masked_fill(key_pos[None, :] > row_pos[:, None], neg)
                pat = sc.softmax(dim=-1).sum(dim=1)  # [H, N]: Σ over response rows
                per_layer.append(km.to(pat.device) @ pat.T)  # [S, H]
            result = (torch.stack(per_layer, dim=1) / (r1 - r0)).save()  # [S, L, H]
        out = _value(result).detach().float().cpu()
        if out.shape != (len(names), self.n_layers, self.n_heads):
            raise RuntimeError(f"nnsight trace returned shape {tuple(out.shape)}; expected {(len(names), self.n_layers, self.n_heads)}.")
        return {k: out[i] for i, k in enumerate(names)}

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
        return self.score_spans(tokens, response=response, spans={"relevant": relevant}, remote=remote, **trace_kwargs)[
            "relevant"
        ]


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
        from ..models import _ensure_default_checkpoint

        src = str(_ensure_default_checkpoint())
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
