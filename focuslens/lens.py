"""``FocusLens(model)``: the notebook wrapper around a hooked model (the design card's shape).

Why a wrapper, when every capability is a module-level function? In a notebook the same model is
scored, ranked, plotted, intervened on and evaluated dozens of times; each call re-derives the
architecture, the query/key sites, the attention scale and the stop tokens. ``FocusLens`` derives
them once, remembers the last ranking (so ``lens.heads(20)`` needs no argument), and gives every
capability one short name — while returning exactly the result types of the functions underneath
(:class:`~focuslens.score.contextual.HeadScores`, :class:`~focuslens.score.contextual.DatasetScores`,
:class:`~focuslens.core.hooks.HookHandle`, :class:`~focuslens.evaluation.runner.EvalResult`, ``[layer, head]``
tensors), so code moves freely between the two styles.

Example:
    >>> import focuslens as fl
    >>> lens = fl.FocusLens(fl.load_model())
    >>> ds = lens.score_dataset(examples)            # [layer, head] contextual scores, ranked
    >>> lens.heatmap()                               # the head-location figure
    >>> with lens.split_softmax(lens.heads(20), r.relevant, tau=0.2):
    ...     print(lens.generate(r.tokens))
    >>> lens.evaluate(test, intervene=fl.specs.SplitSoftmax(lens.heads(20), tau=0.2))

Backends: a TransformerLens model (bridge or legacy ``HookedTransformer``) supports everything. The
fused-attention backend (:class:`focuslens.backends.fused.FusedModel`) and the nnsight scorer are
built for long contexts and large models; they implement scoring, split softmax and vector injection
(and generation for the fused backend) with the same result types. Patching, ablation and the
evaluator need hook points and raise a ``TypeError`` saying so on those backends.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Iterable, Literal, Mapping, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .core.generation import DEFAULT_MAX_NEW_TOKENS, greedy_generate, stop_ids
from .core.hooks import HookHandle
from .core.models import ModelInfo, model_info
from .core.checks import Head, check_heads

__all__ = ["FocusLens"]


class FocusLens:
    """A hooked model with focuslens' analyses as methods; every result is the module functions' type.

    Args:
        model: a TransformerLens model (``fl.load_model()``), or a backend object with the
            focuslens protocol (``FusedModel``, ``NNsightScorer``).

    Attributes:
        model: the wrapped model (use it directly for anything not wrapped here).
        info: the architecture (:class:`~focuslens.core.models.ModelInfo`), read once.
        scores: the last :class:`~focuslens.score.contextual.DatasetScores` computed by :meth:`score_dataset`
            (or given to :meth:`use_scores`); :meth:`heads` and :meth:`heatmap` default to it.
    """

    def __init__(self, model: Any):
        if isinstance(model, FocusLens):
            model = model.model
        self.model = model
        self.hooked = hasattr(model, "hook_dict")
        if not self.hooked and not callable(getattr(model, "score_spans", None)):
            raise TypeError(
                f"FocusLens needs a TransformerLens hooked model (fl.load_model(...)) or a focuslens backend "
                f"(focuslens.backends.fused.FusedModel, NNsightScorer); got {type(model).__name__}."
            )
        self.scores: Any = None

    # ---------------------------------------------------------------------------------------------
    # What is derived once
    # ---------------------------------------------------------------------------------------------

    @cached_property
    def info(self) -> ModelInfo:
        if self.hooked:
            return model_info(self.model)
        m = self.model
        return ModelInfo(name=str(getattr(m, "name", type(m).__name__)), n_layers=m.n_layers, n_heads=m.n_heads,
                         n_kv_heads=getattr(m, "n_kv_heads", m.n_heads), d_head=getattr(m, "d_head", 0),
                         d_model=getattr(m, "d_model", 0), n_ctx=getattr(m, "n_ctx", 0),
                         rotary=True)  # both backends take rotary HF decoders only (post-RoPE query sites)

    @cached_property
    def attention(self) -> list:
        """Per layer :class:`~focuslens.core.attention.LayerAttention` (sites, scale, window, exactness)."""
        self._need_hooks("attention")
        from .core.attention import layer_attention

        return [layer_attention(self.model, l) for l in range(self.info.n_layers)]

    @cached_property
    def stop_ids(self) -> set[int]:
        """End-of-turn token ids (:func:`focuslens.core.generation.stop_ids`)."""
        return stop_ids(self.model.tokenizer)

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    def _need_hooks(self, what: str) -> None:
        if not self.hooked:
            raise TypeError(
                f"{what} needs a TransformerLens hooked model (hook points); {type(self.model).__name__} "
                "implements scoring, split softmax and vector injection only. Load the model with "
                "fl.load_model(...) for this."
            )

    def _backend(self, method: str):
        fn = getattr(self.model, method, None)
        if not callable(fn):
            raise TypeError(
                f"{type(self.model).__name__} does not implement {method} (the nnsight scorer only scores); "
                "use the fused backend (focuslens.backends.fused.load_fused) or a TransformerLens model.")
        return fn

    def _heads(self, heads: Iterable[Sequence[int]] | int) -> list[Head]:
        if isinstance(heads, int):
            return self.heads(heads)
        if self.hooked:
            return check_heads(self.model, heads)
        return [tuple(map(int, h)) for h in heads]  # the backend validates

    # ---------------------------------------------------------------------------------------------
    # Contextual scores, ranking, heatmap
    # ---------------------------------------------------------------------------------------------

    def score(
        self,
        tokens: Int[Tensor, "pos"] | Any,
        *,
        response: Any = None,
        relevant: Any = None,
        spans: Mapping[str, Any] | None = None,
        distractors: Sequence[Any] | None = None,
        sink: Any = 1,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    ):
        """Contextual scores of one sequence: :class:`~focuslens.score.contextual.HeadScores` (``[layer, head]`` each).

        ``tokens`` with explicit spans (``response=`` and ``relevant=``/``spans=``), or a rendered
        task example (:class:`~focuslens.tasks.RenderedExample`): then the model's own greedy answer
        (or ``response="gold"``/``"gold_only"``/a text) is appended and the gold document, the
        distractors and the sink are scored, as :func:`~focuslens.score.contextual.score_dataset` does per example.
        """
        from .score.contextual import respan, responses_for, score_spans

        if hasattr(tokens, "prompt") and hasattr(tokens, "relevant"):
            ex = tokens
            mode = "generate" if response is None else response
            resp = mode if isinstance(mode, str) and mode not in ("generate", "gold", "gold_only") else \
                responses_for(self.model, [ex], mode, max_new_tokens=max_new_tokens, batch_size=1)[0]
            full = ex.prompt.with_response(self.tokenizer, resp)
            rel, dis = respan(ex, full)
            named = dict(spans or {})
            if rel is not None:
                named.setdefault("relevant", rel)
            return score_spans(self.model, full.tokens, response=full.response, spans=named,
                               distractors=dis or None, sink=sink)
        if response is None:
            raise ValueError("score(tokens, ...) needs response=<span of the response rows>; or pass a rendered example.")
        named = dict(spans or {})
        if relevant is not None:
            named["relevant"] = relevant
        return score_spans(self.model, tokens, response=response, spans=named or None, distractors=distractors,
                           sink=sink)

    def score_dataset(self, examples: Sequence[Any], **kw: Any):
        """:func:`~focuslens.score.contextual.score_dataset`; the result is kept as :attr:`scores` for :meth:`heads`."""
        self._need_hooks("score_dataset")
        from .score.contextual import score_dataset

        self.scores = score_dataset(self.model, examples, **kw)
        return self.scores

    def use_scores(self, scores: Any) -> "FocusLens":
        """Use a ranking computed elsewhere (:class:`DatasetScores`, a saved ranking file's path, a tensor)."""
        if isinstance(scores, (str,)) or hasattr(scores, "__fspath__"):
            from .score.contextual import DatasetScores

            scores = DatasetScores.load(scores)
        self.scores = scores
        return self

    def _matrix(self, scores: Any, name: str) -> Float[Tensor, "layer head"]:
        s = self.scores if scores is None else scores
        if s is None:
            raise ValueError("No scores yet: call lens.score_dataset(examples) first, or pass scores=.")
        if isinstance(s, Tensor):
            return s
        mean = getattr(s, "mean", None)
        if isinstance(mean, Mapping):
            return mean[name]
        return s[name]

    def heads(self, k: int = 20, *, scores: Any = None, name: str = "relevant") -> list[Head]:
        """The top-``k`` contextual heads (:func:`~focuslens.score.contextual.contextual_heads`) of ``scores`` or the last ranking."""
        from .score.contextual import contextual_heads

        return contextual_heads(self._matrix(scores, name), k)

    def heatmap(self, scores: Any = None, *, name: str = "relevant", top_k: int = 20, title: str | None = None, **kw: Any):
        """The head-location figure (:func:`~focuslens.plot.figures.head_heatmap`) of ``scores`` or the last ranking."""
        from .plot.figures import head_heatmap

        n = getattr(self.scores if scores is None else scores, "n", None)
        default = f"Contextual scores ({self.info.name}{f', n={n}' if n else ''})"
        return head_heatmap(self._matrix(scores, name), top_k=top_k, title=default if title is None else title, **kw)

    # ---------------------------------------------------------------------------------------------
    # Interventions (each returns a handle: .remove(), or use it in a with block)
    # ---------------------------------------------------------------------------------------------

    def split_softmax(self, heads: Iterable[Sequence[int]] | int, span: Any, tau: float) -> HookHandle:
        """:func:`~focuslens.intervene.eager.split_softmax` on ``heads`` (an int k: the top-k heads)."""
        heads = self._heads(heads)
        if not self.hooked:
            return self._backend("split_softmax")(heads, span, tau)
        from .intervene.eager import split_softmax

        return split_softmax(self.model, heads, span, tau)

    def pasta(self, heads: Iterable[Sequence[int]] | int, span: Any, coefficient: float = 0.01) -> HookHandle:
        """:func:`~focuslens.intervene.eager.pasta` (PASTA attention steering) on ``heads`` (an int k: top-k)."""
        heads = self._heads(heads)
        if not self.hooked:
            raise TypeError(
                "pasta needs a hooked model (TransformerBridge/HookedTransformer); this FocusLens wraps a "
                "backend without hook_pattern. Use FocusLens(fl.load_model(name)) instead."
            )
        from .intervene.eager import pasta

        return pasta(self.model, heads, span, coefficient)

    def inject(self, vectors: Mapping[tuple[int, int], Tensor], *, alpha: float = 1.0,
               site: Literal["query", "key"] = "query", pre_rope: bool = False) -> HookHandle:
        """:func:`~focuslens.intervene.eager.inject_vectors`: add ``alpha·v`` to chosen heads' queries/keys."""
        if not self.hooked:
            return self._backend("inject_vectors")(vectors, alpha=alpha)
        from .intervene.eager import inject_vectors

        return inject_vectors(self.model, vectors, alpha=alpha, site=site, pre_rope=pre_rope)

    def steer(self, directions: Any, *, alpha: float | str | None = None, heads: Any = None,
              tokens: Any = None, **kw: Any) -> HookHandle:
        """Apply focus directions (:meth:`FocusDirections.apply`); on a backend, inject them."""
        if not self.hooked:
            d = directions.top(heads) if isinstance(heads, int) else directions
            a = d.alpha if alpha is None else alpha
            if isinstance(a, str):
                raise TypeError("alpha='auto' needs a TransformerLens hooked model (the sink probe uses hooks).")
            return self._backend("inject_vectors")(d.as_dict(), alpha=float(a))
        return directions.apply(self.model, alpha=alpha, heads=heads, tokens=tokens, **kw)

    def ablate(self, heads: Iterable[Sequence[int]] | int, *, mode: Literal["zero", "mean"] = "zero",
               mean_over: Any = None) -> HookHandle:
        """:func:`~focuslens.heads.patching.ablate_heads` (zero or mean ablation of ``hook_z``)."""
        self._need_hooks("ablate")
        from .heads.patching import ablate_heads

        return ablate_heads(self.model, self._heads(heads), mode=mode, mean_over=mean_over)

    def attach(self, spec: Any, example: Any = None) -> HookHandle:
        """Attach an intervention spec (:mod:`focuslens.intervene.specs`) for ``example``; returns its handle."""
        self._need_hooks("attach")
        return spec.attach(self.model, example)

    # ---------------------------------------------------------------------------------------------
    # Patching, generation, evaluation, training
    # ---------------------------------------------------------------------------------------------

    def patch(self, corrupted_tokens: Tensor, clean: Any, metric: Any, *, site: str = "z",
              per_position: bool = False, **kw: Any) -> Tensor:
        """:func:`~focuslens.heads.patching.patch_heads`: per-head activation patching, ``[layer, head]``."""
        self._need_hooks("patch")
        from .heads.patching import patch_heads

        return patch_heads(self.model, corrupted_tokens, clean, metric, site=site, per_position=per_position, **kw)

    def find_heads(self, examples: Sequence[Any], *, finder: str = "contextual", **kw: Any):
        """:func:`~focuslens.heads.finders.find_heads`: ``DatasetScores`` of one head finder (contextual,
        retrieval, qrhead, patching) over ``examples``; ``.top_k(k)`` gives the heads."""
        self._need_hooks("find_heads")
        from .heads.finders import find_heads

        return find_heads(self.model, examples, finder=finder, **kw)

    def attribute(self, corrupted_tokens: Tensor, clean_tokens: Tensor, metric: Any, *, site: str = "z",
                  per_position: bool = False, **kw: Any) -> Tensor:
        """:func:`~focuslens.heads.attribution.attribution_patch_heads`: the gradient estimate of :meth:`patch`.

        Same ``[layer, head]`` contract as :meth:`patch` for all heads at ≈ 3 forward-equivalents;
        patch the heads it ranks highest exactly before trusting a number (docs/patching.md).
        """
        self._need_hooks("attribute")
        from .heads.attribution import attribution_patch_heads

        return attribution_patch_heads(self.model, corrupted_tokens, clean_tokens, metric, site=site,
                                       per_position=per_position, **kw)

    @torch.no_grad()
    def generate(self, tokens: Any, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, stop_at_newline: bool = True) -> str:
        """The greedy answer (:func:`~focuslens.core.generation.greedy_generate`) to a prompt or rendered example."""
        toks = tokens.tokens if hasattr(tokens, "tokens") else torch.as_tensor(tokens)
        if not self.hooked:
            out = self._backend("generate")(toks.reshape(1, -1), max_new_tokens=max_new_tokens, do_sample=False)
            new = [t for t in out[0, toks.numel():].tolist()]
            cut = next((i for i, t in enumerate(new) if t in self.stop_ids), len(new))
            text = self.tokenizer.decode(new[:cut], skip_special_tokens=True)
            return text.lstrip().split("\n")[0] if stop_at_newline else text
        return greedy_generate(self.model, toks, max_new_tokens=max_new_tokens, stop_at_newline=stop_at_newline,
                               stop_ids=self.stop_ids)[1]

    def evaluate(self, examples: Sequence[Any], **kw: Any):
        """:func:`~focuslens.evaluation.runner.evaluate` (greedy EM, resumable; ``intervene=`` a spec)."""
        self._need_hooks("evaluate")
        from .evaluation.runner import evaluate

        return evaluate(self.model, examples, **kw)

    def train_directions(self, examples: Sequence[Any], *, heads: Iterable[Sequence[int]] | int = 20, **kw: Any):
        """:func:`~focuslens.directions.train_focus_directions` on ``heads`` (an int k: the top-k heads)."""
        self._need_hooks("train_directions")
        from .directions import train_focus_directions

        return train_focus_directions(self.model, examples, heads=self._heads(heads), **kw)

    def __repr__(self) -> str:
        i = self.info
        ranked = f", ranking of n={getattr(self.scores, 'n', '?')}" if self.scores is not None else ""
        kind = "hooked" if self.hooked else type(self.model).__name__
        return f"<FocusLens {i.name}: {i.n_layers} layers × {i.n_heads} heads ({i.n_kv_heads} KV), {kind}{ranked}>"
