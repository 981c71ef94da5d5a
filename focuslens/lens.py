"""``FocusLens(model)``: the notebook wrapper around a hooked model (the design card's shape).

Why a wrapper, when every capability is a module-level function? In a notebook the same model is
scored, ranked, plotted, intervened on and evaluated dozens of times; each call re-derives the
architecture, the query/key sites, the attention scale and the stop tokens. ``FocusLens`` derives
them once, remembers the last ranking (so ``lens.heads(20)`` needs no argument), and gives every
capability one short name — while returning exactly the result types of the functions underneath
(:class:`~focuslens.score.ranking.HeadScores`, :class:`~focuslens.score.ranking.DatasetScores`,
:class:`~focuslens.core.hooks.HookHandle`, :class:`~focuslens.evaluation.runner.EvalResult`, ``[layer, head]``
tensors), so code moves freely between the two styles.

A thin layer: every method lists the parameters of the function or spec underneath (same names,
defaults and types; ``help(lens.score_dataset)`` or ``lens.score_dataset?`` shows them all), and the
interventions build the spec (:class:`~focuslens.intervene.span_specs.SplitSoftmax`,
:class:`~focuslens.intervene.span_specs.Pasta`, :class:`~focuslens.intervene.vector_specs.InjectVectors`,
:class:`~focuslens.intervene.specs.Ablate`, :class:`~focuslens.directions.artefact.Steer`) and attach it, so a
mistake (bool or float heads, a bool or NaN τ/α) is refused exactly as the spec refuses it.

Example:
    >>> import focuslens as fl
    >>> lens = fl.FocusLens(fl.load_model())
    >>> ds = lens.score_dataset(examples)            # [layer, head] contextual scores, ranked
    >>> lens.heatmap()                               # the head-location figure
    >>> with lens.split_softmax(lens.heads(20), r.relevant, tau=0.2):
    ...     print(lens.generate(r.tokens))
    >>> lens.evaluate(test, intervene=fl.SplitSoftmax(lens.heads(20), tau=0.2))

Backends: a TransformerLens model (bridge or legacy ``HookedTransformer``) supports everything. The
fused-attention backend (:class:`focuslens.engine.FusedModel`) and the nnsight scorer are
built for long contexts and large models; they implement scoring, split softmax and vector injection
(and generation for the fused backend) with the same result types. Patching, ablation and the
evaluator need hook points and raise a ``TypeError`` saying so on those backends.
"""

from __future__ import annotations

import inspect
import numbers
import os
from functools import cached_property
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal, Mapping, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .core.checks import Head, check_count, check_heads, validate_heads
from .core.generation import DEFAULT_MAX_NEW_TOKENS, greedy_generate, stop_ids
from .core.hooks import HookHandle
from .core.models import ModelInfo, model_info
from .core.prompts import LabelledPrompt, SpanLike
from .directions.artefact import FocusDirections, Steer
from .directions.config import TrainConfig
from .engine import EngineChoice
from .evaluation.runner import Decoding, evaluate
from .intervene.span_specs import Pasta, SplitSoftmax
from .intervene.specs import Ablate, InterventionSpec
from .intervene.vector_specs import InjectVectors
from .score.contextual import SpansLike
from .score.ranking import DatasetScores, HeadScores, check_model_match, check_scores, contextual_heads

if TYPE_CHECKING:  # annotations only
    import plotly.graph_objects as go

    from .directions.data import DirectionExample
    from .directions.train import QKCache
    from .evaluation.intervention import Intervene
    from .evaluation.runner import EvalResult
    from .tasks.records import RenderedExample, TaskExample

__all__ = ["FocusLens"]

Ranking = DatasetScores | HeadScores | Float[Tensor, "layer head"]  # a [layer, head] table source

# evaluate's decoding keywords default to "keep the decoding bundle's value" (the runner's own marker)
_KEEP_DECODING = {n: p.default for n, p in inspect.signature(evaluate).parameters.items()}

# find_heads: which finder takes which option (the contextual finder passes the rest to score_dataset)
def _changed(cls: type, given: Mapping[str, Any]) -> dict[str, Any]:
    """The keywords of ``given`` that differ from ``cls``'s field defaults (type included: ``True`` is not ``1.0``)."""
    import dataclasses

    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    return {k: v for k, v in given.items() if not (type(v) is type(defaults[k]) and v == defaults[k])}


def _is_count(x: Any) -> bool:
    """A scalar given where heads go: an int k (or a bool/float/0-dim tensor, which check_count refuses)."""
    return isinstance(x, numbers.Number) or (isinstance(x, Tensor) and x.dim() == 0)


class FocusLens:
    """A hooked model with focuslens' analyses as methods; every result is the module functions' type.

    Args:
        model: a TransformerLens model (``fl.load_model()``), or a backend object with the
            focuslens protocol (``FusedModel``, ``NNsightScorer``); a ``FocusLens`` is unwrapped.

    Attributes:
        model: the wrapped model (use it directly for anything not wrapped here).
        info: the architecture (:class:`~focuslens.core.models.ModelInfo`), read once.
        scores: the last :class:`~focuslens.score.ranking.DatasetScores` computed by :meth:`score_dataset`
            (or given to :meth:`use_scores`); :meth:`heads` and :meth:`heatmap` default to it.

    Example:
        >>> lens = fl.FocusLens(fl.load_model())
        >>> lens                                      # <FocusLens SmolLM2-135M-Instruct: 30 layers × 9 heads ...>
    """

    def __init__(self, model: Any) -> None:
        if isinstance(model, FocusLens):
            model = model.model
        self.model = model
        self.hooked = hasattr(model, "hook_dict")
        if not self.hooked and not callable(getattr(model, "score_spans", None)):
            raise TypeError(
                f"FocusLens needs a TransformerLens hooked model (fl.load_model(...)) or a focuslens backend "
                f"(focuslens.engine.FusedModel, NNsightScorer); got {type(model).__name__}."
            )
        self.scores: DatasetScores | HeadScores | Tensor | None = None

    # ---------------------------------------------------------------------------------------------
    # What is derived once
    # ---------------------------------------------------------------------------------------------

    @cached_property
    def info(self) -> ModelInfo:
        """The architecture, read once: :class:`~focuslens.core.models.ModelInfo`.

        Fields ``name``, ``n_layers``, ``n_heads``, ``n_kv_heads``, ``d_head``, ``d_model``, ``n_ctx``,
        ``rotary``; ``.fingerprint()`` is what saved artefacts (rankings, directions) are checked
        against. A backend's info is read from its attributes.

        Example:
            >>> lens.info.n_layers, lens.info.n_heads       # SmolLM2-135M: (30, 9)
        """
        if self.hooked:
            return model_info(self.model)
        m = self.model
        return ModelInfo(name=str(getattr(m, "name", type(m).__name__)), n_layers=m.n_layers, n_heads=m.n_heads,
                         n_kv_heads=getattr(m, "n_kv_heads", m.n_heads), d_head=getattr(m, "d_head", 0),
                         d_model=getattr(m, "d_model", 0), n_ctx=getattr(m, "n_ctx", 0),
                         rotary=True)  # both backends take rotary HF decoders only (post-RoPE query sites)

    @cached_property
    def attention(self) -> list:
        """How each layer computes attention: one :class:`~focuslens.core.attention.LayerAttention` per layer.

        Each says which hooks carry the query and key (``q_hook``/``k_hook``), the score ``scale``,
        ``sliding_window``, ``softcap``, ``qk_norm`` and whether attention can be recomputed exactly
        from the hooks (``exact``; what direction training needs). Hooked models only.

        Example:
            >>> lens.attention[0].q_hook, lens.attention[0].scale   # ('blocks.0.attn.hook_rot_q', 0.125)
        """
        self._need_hooks("attention")
        from .core.attention import layer_attention

        return [layer_attention(self.model, l) for l in range(self.info.n_layers)]

    @cached_property
    def stop_ids(self) -> set[int]:
        """The token ids that end a generated answer: EOS and the chat template's end-of-turn tokens.

        :meth:`generate` stops at them by default (read once from the tokenizer with
        :func:`focuslens.core.generation.stop_ids`).

        Example:
            >>> sorted(lens.stop_ids)                      # SmolLM2: [0, 2] (<|endoftext|>, <|im_end|>)
        """
        return stop_ids(self.model.tokenizer)

    @property
    def tokenizer(self) -> Any:
        """The wrapped model's Hugging Face tokenizer (``model.tokenizer``).

        Use it to build your own prompts (``fl.build_prompt(lens.tokenizer, parts)``), to render task
        records (``render(example, lens.tokenizer)``) and to decode token ids.

        Example:
            >>> p = fl.build_prompt(lens.tokenizer, [("doc", "The sky is blue."), "\nQ: What colour is the sky?"])
            >>> lens.tokenizer.decode(p.tokens[p["doc"].slice])
            'The sky is blue.'
        """
        return self.model.tokenizer

    def _need_hooks(self, what: str) -> None:
        if not self.hooked:
            raise TypeError(
                f"{what} needs a TransformerLens hooked model (hook points); {type(self.model).__name__} "
                "implements scoring, split softmax and vector injection only. Load the model with "
                "fl.load_model(...) for this."
            )

    def _backend(self, method: str) -> Callable[..., Any]:
        fn = getattr(self.model, method, None)
        if not callable(fn):
            raise TypeError(
                f"{type(self.model).__name__} does not implement {method} (the nnsight scorer only scores); "
                "use the fused backend (focuslens.backends.fused.load_fused) or a TransformerLens model.")
        return fn

    def _heads(self, heads: Iterable[Sequence[int]] | int, what: str) -> Iterable[Sequence[int]]:
        """An int k: the top-k heads of the last ranking (``check_count`` refuses bools and floats);
        a list is passed on as given (the spec or the function underneath validates it)."""
        return self._top(heads, None, "relevant", what=what, arg="heads (a count k)") if _is_count(heads) else heads

    def _top(self, k: Any, scores: Ranking | None, name: str, *, what: str, arg: str = "k") -> list[Head]:
        if scores is None and self.scores is None:
            check_count(k, name=arg, what=what)  # a bad k is named before the missing ranking
        table = self._matrix(scores, name)
        return contextual_heads(table, check_count(k, name=arg, what=what, upper=table.numel()))

    # ---------------------------------------------------------------------------------------------
    # Contextual scores, ranking, heatmap
    # ---------------------------------------------------------------------------------------------

    def score(
        self,
        tokens: Int[Tensor, "pos"] | Int[Tensor, "1 pos"] | RenderedExample,
        *,
        response: SpanLike | Literal["generate", "gold", "gold_only"] | str | None = None,
        relevant: SpansLike | None = None,
        spans: Mapping[str, SpansLike] | None = None,
        distractors: Sequence[SpanLike] | None = None,
        sink: SpanLike | int | None = 1,
        method: Literal["auto", "qk", "pattern"] = "auto",
        stop_early: bool = True,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    ) -> HeadScores:
        """Contextual scores of one sequence (:func:`~focuslens.score.contextual.score_spans`), ``[layer, head]`` each.

        Args:
            tokens: token ids with explicit spans (``response=`` and ``relevant=``/``spans=``); or a
                rendered task example (:class:`~focuslens.tasks.records.RenderedExample`): then the
                model's own greedy answer (``response=None``/``"generate"``), ``"gold"``/``"gold_only"``
                (as :func:`~focuslens.score.contextual.score_dataset`) or a given text is appended, and the
                gold document, the distractors and the sink are scored.
            response: the query rows (a span) for ``tokens``; the response mode for an example.
            relevant: the gold span(s), scored as ``"relevant"`` (same as ``spans={"relevant": ...}``).
            spans, distractors, sink, method, stop_early: as :func:`~focuslens.score.contextual.score_spans`
                (backends take ``method``/``stop_early`` as their own route).
            max_new_tokens: generation budget of a generated response (rendered examples only).

        Returns:
            :class:`~focuslens.score.ranking.HeadScores`: ``[layer, head]`` masses per named span
            (``.relevant``, ``.sink``...) and ``.mass(span)`` for any other span of the same pass.

        Example:
            >>> hs = lens.score(p.tokens, response=p.response, relevant=p["doc_2"])
            >>> hs.relevant.shape                     # [n_layers, n_heads]
            >>> hs = lens.score(rendered, response="gold")
        """
        from .score.contextual import respan, responses_for, score_spans

        kw: dict[str, Any] = {"sink": sink, "method": method, "stop_early": stop_early}
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
                               distractors=dis or None, **kw)
        if response is None:
            raise ValueError("score(tokens, ...) needs response=<span of the response rows>; or pass a rendered example.")
        named = dict(spans or {})
        if relevant is not None:
            named["relevant"] = relevant
        return score_spans(self.model, tokens, response=response, spans=named or None, distractors=distractors,
                           **kw)

    def score_dataset(
        self,
        examples: Sequence[RenderedExample],
        *,
        response: (Literal["generate", "gold", "gold_only"]
                   | Callable[[Any], str | Tensor | Sequence[int]]) = "generate",
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        sink: SpanLike | int | None = 1,
        method: Literal["auto", "qk", "pattern"] = "auto",
        progress: bool = True,
        batch_size: int = 8,
    ) -> DatasetScores:
        """Contextual scores of every head averaged over ``examples``, kept as :attr:`scores` for :meth:`heads`.

        :func:`~focuslens.score.contextual.score_dataset` on this model; the arguments are its own.

        Args:
            examples: rendered examples with a ``relevant`` span (the gold document).
            response: ``"generate"`` (the model's own greedy answer, the paper's default), ``"gold"``
                (the gold answer text), ``"gold_only"`` (the answer to the gold-only prompt) or a
                callable ``f(example) -> str | token ids``.
            max_new_tokens: generation budget of generated responses.
            sink, method: as :func:`~focuslens.score.contextual.score_spans`.
            progress: a tqdm bar over examples.
            batch_size: responses generated together.

        Returns:
            :class:`~focuslens.score.ranking.DatasetScores` (mean, SE and per-example tables; ``.top_k``),
            also kept as :attr:`scores`, so :meth:`heads` and :meth:`heatmap` need no argument.

        Example:
            >>> ds = lens.score_dataset([render(e, lens.tokenizer) for e in examples], response="gold")
            >>> lens.heads(20) == ds.top_k(20)
            True
        """
        self._need_hooks("score_dataset")
        from .score.contextual import score_dataset

        self.scores = score_dataset(self.model, examples, response=response, max_new_tokens=max_new_tokens,
                                    sink=sink, method=method, progress=progress, batch_size=batch_size)
        return self.scores

    def use_scores(
        self, scores: DatasetScores | HeadScores | Float[Tensor, "layer head"] | str | os.PathLike,
    ) -> FocusLens:
        """Use a ranking computed elsewhere: :class:`DatasetScores`, a saved ranking file's path, or a tensor.

        The ranking's ``[layer, head]`` tables must have this model's shape ``(n_layers, n_heads)``;
        another shape (a ranking of another model) is refused with a ``ValueError`` naming both.

        Args:
            scores: :class:`DatasetScores`, :class:`HeadScores`, a ``[layer, head]`` tensor or the path of a
                ranking saved with ``DatasetScores.save`` / written by ``focuslens score``.

        Returns:
            This lens (so calls chain), with :attr:`scores` set.

        Example:
            >>> lens.use_scores("runs/ranking.json").heads(20)   # written by `focuslens score`
        """
        source = ""
        if isinstance(scores, str) or hasattr(scores, "__fspath__"):
            source = f" (from {os.fspath(scores)})"
            scores = DatasetScores.load(scores)
        if not isinstance(scores, (DatasetScores, HeadScores, Tensor)):
            raise TypeError(f"use_scores takes DatasetScores, HeadScores, a [layer, head] tensor or a ranking "
                            f"file's path; got {type(scores).__name__}.")
        check_scores(scores, self.info, what=f"the ranking{source}")
        self.scores = scores
        return self

    def _table(self, scores: Ranking | None, name: str) -> Float[Tensor, "layer head"]:
        s = self.scores if scores is None else scores
        if s is None:
            raise ValueError("No scores yet: call lens.score_dataset(examples) first, or pass scores=.")
        if isinstance(s, Tensor):
            return s
        if not isinstance(s, (DatasetScores, HeadScores)):
            raise TypeError(f"scores must be DatasetScores, HeadScores or a [layer, head] tensor, got "
                            f"{type(s).__name__}.")
        names = list(s.mean if isinstance(s, DatasetScores) else s.scores)
        if name not in names:
            raise ValueError(f"name={name!r}: these scores have no {name!r} table; they have {names}.")
        return s.mean[name] if isinstance(s, DatasetScores) else s.scores[name]

    def _matrix(self, scores: Ranking | None, name: str) -> Float[Tensor, "layer head"]:
        """The ``[layer, head]`` table that heads are picked from or drawn: it must belong to this model
        (:func:`~focuslens.score.ranking.check_scores`: its shape, and a ranking's fingerprint)."""
        table = self._table(scores, name)
        check_scores(self.scores if scores is None else scores, self.info,
                     what="scores" if scores is not None else "the ranking")
        return table

    def heads(
        self,
        k: int = 20,
        *,
        scores: DatasetScores | HeadScores | Float[Tensor, "layer head"] | None = None,
        name: str = "relevant",
    ) -> list[Head]:
        """The top-``k`` heads (:func:`~focuslens.score.ranking.contextual_heads`) of ``scores`` or the last ranking.

        ``k`` is a count (:func:`~focuslens.core.checks.check_count`: an int in ``1..n_layers·n_heads``;
        a bool or a float is refused); ``name`` picks the score (``"relevant"``, ``"sink"``...).

        Args:
            k: how many heads.
            scores: a ranking or ``[layer, head]`` tensor; default the last ranking (:attr:`scores`).
            name: which table of a ranking (``"relevant"``, ``"sink"``...).

        Returns:
            ``[(layer, head), ...]``, best first (ties by layer, then head).

        Example:
            >>> lens.score_dataset(examples); top20 = lens.heads(20)
            >>> lens.heads(5, scores=other_ranking)
        """
        return self._top(k, scores, name, what="FocusLens.heads")

    def heatmap(
        self,
        scores: DatasetScores | HeadScores | Float[Tensor, "layer head"] | None = None,
        *,
        name: str = "relevant",
        top_k: int = 20,
        title: str | None = None,
        colorbar_title: str = "score",
        colorscale: str = "Blues",
        zmin: float | None = None,
        zmax: float | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> go.Figure:
        """The head-location figure (:func:`~focuslens.plot.figures.head_heatmap`) of ``scores`` or the last ranking.

        Args:
            scores: a ranking or any ``[layer, head]`` tensor (default: :attr:`scores`).
            name: which score of a ranking to draw.
            title: default ``"Contextual scores (<model>, n=<examples>)"``.
            top_k, colorbar_title, colorscale, zmin, zmax, height, width: as ``head_heatmap``.

        Returns:
            A plotly ``go.Figure`` (shown when it is a cell's last value; save it with
            :func:`~focuslens.plot.figures.save_figure`, see docs/figures.md for static export).

        Example:
            >>> lens.heatmap(top_k=20)
            >>> lens.heatmap(lens.patch(corrupt, clean, metric), title="patching", top_k=10)
        """
        from .plot.figures import head_heatmap

        table = self._matrix(scores, name)
        n = getattr(self.scores if scores is None else scores, "n", None)
        default = f"Contextual scores ({self.info.name}{f', n={n}' if n else ''})"
        return head_heatmap(table, top_k=top_k, title=default if title is None else title,
                            colorbar_title=colorbar_title, colorscale=colorscale, zmin=zmin, zmax=zmax,
                            height=height, width=width)

    # ---------------------------------------------------------------------------------------------
    # Interventions: build the spec (its validation), attach it; a handle: .remove() or a with block
    # ---------------------------------------------------------------------------------------------

    def split_softmax(
        self, heads: Iterable[Sequence[int]] | int, span: SpanLike | Sequence[SpanLike], tau: float,
    ) -> HookHandle:
        """Split softmax on ``heads``: their attention mass on ``span`` becomes π^τ (``docs/method.md`` §3).

        Builds :class:`~focuslens.intervene.span_specs.SplitSoftmax` ``(heads, tau, span=span)`` (which
        refuses bool/float heads and a bool, NaN or non-positive τ) and attaches it.

        Args:
            heads: ``(layer, head)`` pairs, or an int k: the top-k heads of the last ranking.
            span: the relevant context: a Span, ``(start, end)`` or a list of them (their union).
            tau: > 0; 1 is the identity, < 1 moves attention onto the span.

        Returns:
            A :class:`~focuslens.core.hooks.HookHandle`: the edit is active until ``.remove()`` or the
            end of a ``with`` block (which removes it even on an error).

        Example:
            >>> with lens.split_softmax(lens.heads(20), r.relevant, tau=0.2):
            ...     print(lens.generate(r))
        """
        spec = SplitSoftmax(self._heads(heads, "SplitSoftmax"), tau, span=span)
        if not self.hooked:
            return self._backend("split_softmax")(list(spec.heads), span, spec.tau)
        return spec.attach(self.model)

    def pasta(
        self, heads: Iterable[Sequence[int]] | int, span: SpanLike | Sequence[SpanLike], coefficient: float = 0.01,
    ) -> HookHandle:
        """PASTA attention steering on ``heads``: attention outside ``span`` × ``coefficient``, renormalised.

        Builds :class:`~focuslens.intervene.span_specs.Pasta` ``(heads, coefficient=, span=)`` and attaches it.

        Args:
            heads: ``(layer, head)`` pairs, or an int k: the top-k heads of the last ranking.
            span: the span to emphasise (a Span, ``(start, end)`` or a list of them).
            coefficient: > 0; PASTA's default 0.01, 1 the identity.

        Returns:
            A :class:`~focuslens.core.hooks.HookHandle`: the edit is active until ``.remove()`` or the
            end of a ``with`` block (which removes it even on an error).

        Example:
            >>> with lens.pasta(lens.heads(20), r.relevant, coefficient=0.01):
            ...     print(lens.generate(r))
        """
        spec = Pasta(self._heads(heads, "Pasta"), coefficient=coefficient, span=span)
        if not self.hooked:
            raise TypeError(
                "pasta needs a hooked model (TransformerBridge/HookedTransformer); this FocusLens wraps a "
                "backend without hook_pattern. Use FocusLens(fl.load_model(name)) instead."
            )
        return spec.attach(self.model)

    def inject(
        self,
        vectors: Mapping[tuple[int, int], Float[Tensor, "d_head"] | Float[Tensor, "batch d_head"]],
        *,
        alpha: float = 1.0,
        site: Literal["query", "key"] = "query",
        pre_rope: bool = False,
    ) -> HookHandle:
        """Add ``alpha · v`` to chosen heads' queries (or keys) at every position.

        Builds :class:`~focuslens.intervene.vector_specs.InjectVectors` ``(vectors, alpha=, site=, pre_rope=)``
        (a real, finite α; ``site="key"`` vectors are keyed by KV head; ``pre_rope`` adds before the
        rotary embedding, a different method) and attaches it. The backends inject post-RoPE queries only.

        Args:
            vectors: ``{(layer, head): [d_head]}`` (or ``[batch, d_head]``, one row per prompt).
            alpha: the factor on every vector.
            site: ``"query"`` or ``"key"`` (keys: KV-head indices).
            pre_rope: add before the rotary embedding instead of after it.

        Returns:
            A :class:`~focuslens.core.hooks.HookHandle`: the edit is active until ``.remove()`` or the
            end of a ``with`` block (which removes it even on an error).

        Example:
            >>> with lens.inject({(17, 3): torch.randn(64) * 0.1}, alpha=0.3):
            ...     print(lens.generate(r))
        """
        spec = InjectVectors(vectors, alpha=alpha, site=site, pre_rope=pre_rope)
        if not self.hooked:
            if site != "query" or pre_rope:
                raise TypeError(f"{type(self.model).__name__} injects post-RoPE query vectors only (site='query', "
                                "pre_rope=False); use a TransformerLens model for key or pre-RoPE vectors.")
            return self._backend("inject_vectors")(dict(spec.vectors), alpha=spec.alpha)
        return spec.attach(self.model)

    def steer(
        self,
        directions: FocusDirections,
        *,
        alpha: float | Literal["auto"] | None = None,
        heads: Iterable[Sequence[int]] | int | None = None,
        tokens: Int[Tensor, "pos"] | LabelledPrompt | None = None,
        target: float = 0.5,
        alpha_max: float = 4.0,
        per: Literal["head", "input"] = "head",
    ) -> HookHandle:
        """Apply focus directions with a factor α (as :meth:`FocusDirections.apply <focuslens.directions.FocusDirections.apply>`).

        Builds :class:`~focuslens.directions.artefact.Steer` and attaches it; on a backend, injects the
        scaled vectors (fixed α only).

        Args:
            alpha: a number (default ``directions.alpha``) or ``"auto"`` (the sink-target magnitude
                control; needs ``tokens``).
            heads: a subset of the directions' heads, or an int k: the directions' top-k (``Steer(k=)``).
            tokens: the prompt, for ``alpha="auto"`` only.
            target, alpha_max, per: settings of ``alpha="auto"``, as :class:`Steer`.

        Returns:
            A :class:`~focuslens.core.hooks.HookHandle`: the edit is active until ``.remove()`` or the
            end of a ``with`` block (which removes it even on an error).

        Example:
            >>> d = fl.FocusDirections.load("runs/fd")
            >>> with lens.steer(d, alpha=0.5, heads=10):
            ...     print(lens.generate(r))
        """
        k, subset = (heads, None) if _is_count(heads) else (None, heads)
        spec = Steer(directions, alpha=alpha, heads=subset, k=k, target=target, alpha_max=alpha_max, per=per)
        if not self.hooked:
            if spec.alpha == "auto":
                raise TypeError("alpha='auto' needs a TransformerLens hooked model (the sink probe uses hooks).")
            d = spec.directions  # a backend has no cfg for d.check_model: the same rule on what it says
            check_model_match(self.info, what="these focus directions", fingerprint=d.fingerprint,
                              source_model=d.model_name, relation="were learned on",
                              fix="Train or load the directions made for this model.")
            validate_heads(d.heads, n_layers=self.info.n_layers, n_heads=self.info.n_heads, what="steer")
            return self._backend("inject_vectors")(d.as_dict(), alpha=float(spec.alpha))
        if spec.alpha == "auto" and tokens is None:
            raise ValueError("alpha='auto' needs the prompt: "
                             "lens.steer(directions, alpha='auto', tokens=prompt.tokens).")
        return spec.attach(self.model, tokens)

    def ablate(
        self,
        heads: Iterable[Sequence[int]] | int,
        *,
        mode: Literal["zero", "mean"] = "zero",
        mean_over: Int[Tensor, "batch pos"] | Sequence[Tensor] | None = None,
        means: dict[tuple[int, int], Tensor] | None = None,
    ) -> HookHandle:
        """Knock out ``heads``: their output ``hook_z`` becomes 0 (``mode="zero"``) or its mean (``"mean"``).

        Builds :class:`~focuslens.intervene.specs.Ablate` and attaches it (as
        :func:`~focuslens.heads.patching.ablate_heads`); with ``mode="mean"`` give ``means``
        (:func:`~focuslens.heads.patching.head_means`) or ``mean_over`` reference tokens to compute them.

        Args:
            heads: ``(layer, head)`` pairs, or an int k: the top-k heads of the last ranking.
            mode: ``"zero"`` or ``"mean"``.
            mean_over: reference token ids (a ``[batch, pos]`` tensor or a list of ``[pos]``) whose
                mean head outputs replace the heads' outputs (``mode="mean"``).
            means: precomputed means ``{(layer, head): [d_head]}`` instead of ``mean_over``.

        Returns:
            A :class:`~focuslens.core.hooks.HookHandle`: the edit is active until ``.remove()`` or the
            end of a ``with`` block (which removes it even on an error).

        Example:
            >>> with lens.ablate(lens.heads(20), mode="mean", mean_over=[r.tokens for r in ref]):
            ...     res = lens.evaluate(test, progress=False)
        """
        self._need_hooks("ablate")
        heads = self._heads(heads, "Ablate")
        if mode == "zero" and mean_over is not None:
            raise ValueError("Ablate: mean_over/means are only used with mode='mean'.")
        if mode == "mean" and means is None:
            if mean_over is None:
                raise ValueError("Ablate(mode='mean') needs mean_over=<reference tokens> (or means=head_means(...)).")
            from .heads.patching import head_means

            heads = check_heads(self.model, heads, what="Ablate")
            means = head_means(self.model, heads, mean_over)
        return Ablate(heads, mode=mode, means=means).attach(self.model)

    def attach(self, spec: InterventionSpec,
               example: RenderedExample | LabelledPrompt | Int[Tensor, "pos"] | None = None) -> HookHandle:
        """Attach an intervention spec (:mod:`focuslens.intervene.specs`) for ``example``; returns its handle.

        ``example`` gives the spec what it reads per example (a span rule such as ``"relevant"``, the
        prompt for ``alpha="auto"``).

        Args:
            spec: a :class:`~focuslens.intervene.specs.InterventionSpec` (``fl.SplitSoftmax``, ``fl.Pasta``,
                ``fl.InjectVectors``, ``fl.Ablate``, ``fl.Steer``, ``fl.Compose``).
            example: the rendered example, prompt or ``[pos]`` ids the spec reads its spans from.

        Returns:
            A :class:`~focuslens.core.hooks.HookHandle`: the edit is active until ``.remove()`` or the
            end of a ``with`` block (which removes it even on an error).

        Example:
            >>> with lens.attach(fl.SplitSoftmax(lens.heads(20), tau=0.2), r):
            ...     print(lens.generate(r))
        """
        self._need_hooks("attach")
        if not isinstance(spec, InterventionSpec):
            raise TypeError(f"attach takes an intervention spec (focuslens.intervene), got {type(spec).__name__}.")
        return spec.attach(self.model, example)

    # ---------------------------------------------------------------------------------------------
    # Patching, head finders, generation, evaluation, training
    # ---------------------------------------------------------------------------------------------

    def patch(
        self,
        corrupted_tokens: Int[Tensor, "batch pos"],
        clean: Int[Tensor, "batch pos"] | dict[str, Tensor],
        metric: Callable[[Float[Tensor, "batch pos d_vocab"]], Tensor | float],
        *,
        site: Literal["z", "q", "k", "v", "pattern"] = "z",
        per_position: bool = False,
        layers: Iterable[int] | None = None,
        positions: Iterable[int] | None = None,
        method: Literal["batched", "loop"] = "batched",
        batch_size: int | None = None,
        progress: bool = False,
    ) -> Float[Tensor, "layer head"] | Float[Tensor, "layer pos head"]:
        """Per-head activation patching: each head's ``site`` copied from the clean run into the corrupted run.

        For every head (and position, with ``per_position``), the corrupted prompt is run with that
        head's activation at ``site`` replaced by the clean run's, and ``metric`` is read from the
        logits: a head whose patch restores the clean behaviour carries the information that the
        corruption removed. Equal to TransformerLens' ``get_act_patch_attn_head_out_all_pos`` for
        ``site="z"`` (:func:`~focuslens.heads.patching.patch_heads` underneath; docs/patching.md).

        Args:
            corrupted_tokens: ``[batch, pos]`` ids of the corrupted prompt(s).
            clean: the clean ``[batch, pos]`` ids (same shape: position-aligned prompts), or a cache
                from :func:`~focuslens.heads.patching.cache_sites` holding ``site`` (reuse it across metrics).
            metric: ``logits [batch, pos, d_vocab] -> scalar``, e.g. a logit difference between the
                clean and the corrupted answer's first token at the last position.
            site: ``"z"`` (head output), ``"q"``, ``"k"``, ``"v"`` (``k``/``v`` indexed by KV head) or
                ``"pattern"``.
            per_position: one value per (layer, position, head) instead of all positions at once.
            layers, positions: restrict the patched layers / positions (the others are NaN).
            method: ``"batched"`` (several patched runs per forward pass) or the reference ``"loop"``.
            batch_size: patched runs per forward pass with ``method="batched"`` (default: sized to
                about 1 GiB of logits).
            progress: a tqdm bar over patched runs.

        Returns:
            The metric of every patched corrupted run, ``[layer, head]`` (or ``[layer, pos, head]``);
            compare it with the metric of the clean and the corrupted run.

        Example:
            >>> clean, corrupt = make_corrupted_pair(model, example)
            >>> metric = logit_diff_metric(model, clean.answers[0], corrupt.answers[0])
            >>> res = lens.patch(corrupt.tokens, clean.tokens, metric, site="z")   # [layer, head]
        """
        self._need_hooks("patch")
        from .heads.patching import patch_heads

        return patch_heads(self.model, corrupted_tokens, clean, metric, site=site, per_position=per_position,
                           layers=layers, positions=positions, method=method, batch_size=batch_size,
                           progress=progress)

    def find_heads(
        self,
        examples: Sequence[Any],
        *,
        finder: Literal["contextual", "retrieval", "qrhead", "patching"] = "contextual",
        progress: bool = True,
        response: Literal["generate", "gold", "gold_only"] = "generate",
        qr_score: Literal["gold", "contrast"] = "gold",
        min_gap: float = 1.0,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        sink: SpanLike | int | None = 1,
        method: Literal["auto", "qk", "pattern"] = "auto",
        batch_size: int = 8,
    ) -> DatasetScores:
        """One head finder's ``[layer, head]`` scores over ``examples`` (:func:`~focuslens.heads.finders.find_heads`).

        Each finder's own options, with its defaults: ``"contextual"`` (the paper's score:
        ``response`` and :func:`~focuslens.score.contextual.score_dataset`'s ``max_new_tokens``, ``sink``,
        ``method``, ``batch_size``), ``"retrieval"`` (none), ``"qrhead"`` (``qr_score``), ``"patching"``
        (``min_gap``). An option changed for a finder that does not take it is refused.

        Args:
            examples: rendered task examples (spans known).
            finder: ``"contextual"``, ``"retrieval"``, ``"qrhead"`` or ``"patching"``.
            progress: a tqdm bar.
            response, max_new_tokens, sink, method, batch_size: the contextual finder's options.
            qr_score: the QRHead finder's score; min_gap: the patching finder's option.

        Returns:
            :class:`~focuslens.score.ranking.DatasetScores` of that finder (``.top_k(k)``); give it to
            :meth:`use_scores` to make it the ranking that :meth:`heads` reads.

        Example:
            >>> ds = lens.find_heads(examples, finder="qrhead", qr_score="contrast")
            >>> ds.top_k(20)
        """
        self._need_hooks("find_heads")
        from .heads.finders import find_heads

        return find_heads(self.model, examples, finder=finder, progress=progress, response=response,
                          qr_score=qr_score, min_gap=min_gap, max_new_tokens=max_new_tokens, sink=sink,
                          method=method, batch_size=batch_size)

    def attribute(
        self,
        corrupted_tokens: Int[Tensor, "batch pos"],
        clean_tokens: Int[Tensor, "batch pos"],
        metric: Callable[[Float[Tensor, "batch pos d_vocab"]], Tensor | float],
        *,
        site: Literal["z", "q", "k", "v", "pattern"] = "z",
        per_position: bool = False,
        layers: Iterable[int] | None = None,
        qk_fix: bool = True,
    ) -> Float[Tensor, "layer head"] | Float[Tensor, "layer pos head"]:
        """Attribution patching: the gradient estimate of :meth:`patch` for all heads at ≈ 3 forward passes.

        :func:`~focuslens.heads.attribution.attribution_patch_heads` on this model: same ``[layer, head]``
        contract as :meth:`patch` (``site``, ``per_position``, ``layers``); ``qk_fix`` as there. Patch the
        heads it ranks highest exactly before trusting a number (docs/patching.md).

        Args:
            corrupted_tokens, clean_tokens: ``[batch, pos]`` ids of the two runs (same shape).
            metric: ``logits -> scalar`` (e.g. a logit difference), differentiable.
            site, per_position, layers: as :meth:`patch`.
            qk_fix: AtP*'s QK fix, the exact softmax for ``"q"``/``"k"`` sites (default); ``False``: plain AtP.

        Returns:
            The estimated metric change of patching each head, ``[layer, head]`` (or
            ``[layer, pos, head]``): the same units as :meth:`patch`'s result minus the corrupted metric.

        Example:
            >>> est = lens.attribute(corrupt.tokens, clean.tokens, metric, site="z")
            >>> exact = lens.patch(corrupt.tokens, clean.tokens, metric, layers=[17])
        """
        self._need_hooks("attribute")
        from .heads.attribution import attribution_patch_heads

        return attribution_patch_heads(self.model, corrupted_tokens, clean_tokens, metric, site=site,
                                       per_position=per_position, layers=layers, qk_fix=qk_fix)

    @torch.no_grad()
    def generate(
        self,
        tokens: Int[Tensor, "pos"] | Sequence[int] | RenderedExample | LabelledPrompt,
        *,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        stop_at_newline: bool = True,
        stop_ids: Iterable[int] | None = None,
    ) -> str:
        """The greedy answer (:func:`~focuslens.core.generation.greedy_generate`) to a prompt or rendered example.

        Stops at an end-of-turn token (``stop_ids``, default :attr:`stop_ids`), after ``max_new_tokens``,
        or at the first newline once text started (``stop_at_newline``).

        Args:
            tokens: ``[pos]`` prompt ids, a rendered example or a :class:`~focuslens.core.prompts.LabelledPrompt`.
            max_new_tokens: the generation budget.
            stop_at_newline: cut the answer at its first newline.
            stop_ids: token ids that end the answer (default :attr:`stop_ids`).

        Returns:
            The decoded answer text (special tokens dropped). Active interventions apply.

        Example:
            >>> lens.generate(r, max_new_tokens=16)
            'Paris'
        """
        if isinstance(tokens, (str, bytes)):
            raise TypeError("generate takes token ids or a rendered example, not text: tokenize it first "
                            "(lens.tokenizer(text).input_ids, or fl.build_prompt for a labelled prompt).")
        toks = tokens.tokens if hasattr(tokens, "tokens") else torch.as_tensor(tokens)
        stops = self.stop_ids if stop_ids is None else set(stop_ids)
        if not self.hooked:
            out = self._backend("generate")(toks.reshape(1, -1), max_new_tokens=max_new_tokens, do_sample=False)
            new = [t for t in out[0, toks.numel():].tolist()]
            cut = next((i for i, t in enumerate(new) if t in stops), len(new))
            text = self.tokenizer.decode(new[:cut], skip_special_tokens=True)
            return text.lstrip().split("\n")[0] if stop_at_newline else text
        return greedy_generate(self.model, toks, max_new_tokens=max_new_tokens, stop_at_newline=stop_at_newline,
                               stop_ids=stops)[1]

    def evaluate(
        self,
        examples: Sequence[TaskExample | RenderedExample],
        *,
        intervene: Intervene = None,
        output: str | os.PathLike | None = None,
        id: str | None = None,
        resume: bool = True,
        decoding: Decoding | None = None,
        tag: str | dict[str, Any] | None = None,
        batch_size: int = 8,
        progress: bool = True,
        engine: EngineChoice = "auto",
        variant: Literal["original", "gold_only", "negative"] | str = _KEEP_DECODING["variant"],
        max_new_tokens: int = _KEEP_DECODING["max_new_tokens"],
        chat: bool = _KEEP_DECODING["chat"],
        system: str | None = _KEEP_DECODING["system"],
        gold_position: int | None = _KEEP_DECODING["gold_position"],
        stop_at_newline: bool = _KEEP_DECODING["stop_at_newline"],
    ) -> EvalResult:
        """Greedy answers scored with best-subspan EM (:func:`~focuslens.evaluation.runner.evaluate`; resumable).

        Args:
            examples: task records (rendered here with ``decoding``) or rendered examples.
            intervene: a spec (``fl.SplitSoftmax(heads, tau=0.2)``, ``fl.Steer(d, alpha=1)``...), or
                a callable / context manager (then ``id`` names it when ``output`` is given).
            output, id, resume, tag, batch_size, progress: as ``evaluate``.
            engine: ``"auto"`` (the fused engine where it expresses ``intervene`` exactly, else the
                bridge), ``"fused"`` or ``"eager"`` (:func:`~focuslens.evaluation.runner.evaluate`).
            decoding: a :class:`~focuslens.evaluation.runner.Decoding` bundle (default ``Decoding()``).
            variant, max_new_tokens, chat, system, gold_position, stop_at_newline: override that field
                of ``decoding``; left out, the bundle's value is kept.

        Returns:
            An :class:`~focuslens.evaluation.runner.EvalResult`: accuracy ± SE, distractor-copy rate,
            one record per example (``.records``); ``.summary()`` as a dict, ``.table()`` as text.

        Example:
            >>> res = lens.evaluate(test, intervene=fl.SplitSoftmax(lens.heads(20), tau=0.2),
            ...                     output="runs/ss.jsonl", max_new_tokens=16)
            >>> res.summary()
        """
        self._need_hooks("evaluate")
        return evaluate(self.model, examples, intervene=intervene, output=output, id=id, resume=resume,
                        decoding=decoding, tag=tag, batch_size=batch_size, progress=progress, engine=engine,
                        variant=variant,
                        max_new_tokens=max_new_tokens, chat=chat, system=system, gold_position=gold_position,
                        stop_at_newline=stop_at_newline)

    def train_directions(
        self,
        examples: Sequence[DirectionExample],
        *,
        heads: Iterable[Sequence[int]] | int = 20,
        config: TrainConfig | None = None,
        val_examples: Sequence[DirectionExample] | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        progress: bool = True,
        caches: tuple[QKCache, QKCache | None] | None = None,
        cache_batch_size: int = 8,
        objective: Literal["attention", "likelihood", "both"] = "attention",
        method: Literal["batched", "per_layer"] | None = "batched",
        alpha: float = 1.0,
        lr: float | None = None,
        steps: int | None = 300,
        epochs: int | None = None,
        init_std: float = 0.01,
        max_norm: float | Literal["query"] | None = "query",
        weight_decay: float | None = None,
        patience: int | None = None,
        eval_every: int | None = 10,
        live_eval_every: int | None = None,
        attention_weight: float | None = 1.0,
        seed: int = 0,
        cache_precision: Literal["model", "bfloat16"] = "model",
    ) -> FocusDirections:
        """Learn one query vector per head (:func:`~focuslens.directions.train.train_focus_directions`).

        Args:
            examples: :class:`~focuslens.directions.data.DirectionExample` s, built from task records
                by :func:`~focuslens.directions.data.make_direction_examples` (prompt + the response to read).
            heads: ``(layer, head)`` pairs in rank order, or an int k: the top-k of the last ranking.
            config, val_examples, checkpoint_dir, progress, caches, cache_batch_size: as
                ``train_focus_directions``.
            objective, method, alpha, lr, steps, epochs, init_std, max_norm, weight_decay, patience,
                eval_every, live_eval_every, attention_weight, seed, cache_precision: the
                :class:`~focuslens.directions.config.TrainConfig` fields (defaults shown); a value other
                than the default overrides ``config``'s.

        Returns:
            :class:`~focuslens.directions.artefact.FocusDirections` (heads in rank order, one
            ``[d_head]`` vector each, training summary in ``.training``); ``.save(path)`` keeps them.

        Example:
            >>> d = lens.train_directions(train, heads=20, objective="likelihood", val_examples=val)
            >>> with lens.steer(d, alpha=0.5):
            ...     print(lens.generate(r))
        """
        self._need_hooks("train_directions")
        from .directions.train import train_focus_directions

        fields = _changed(TrainConfig, {
            "objective": objective, "method": method, "alpha": alpha, "lr": lr, "steps": steps, "epochs": epochs,
            "init_std": init_std, "max_norm": max_norm, "weight_decay": weight_decay, "patience": patience,
            "eval_every": eval_every, "live_eval_every": live_eval_every, "attention_weight": attention_weight,
            "seed": seed, "cache_precision": cache_precision})
        return train_focus_directions(
            self.model, examples, heads=self._heads(heads, "train_directions"),
            config=config, val_examples=val_examples, checkpoint_dir=checkpoint_dir, progress=progress,
            caches=caches, cache_batch_size=cache_batch_size, **fields)

    def __repr__(self) -> str:
        i = self.info
        ranked = f", ranking of n={getattr(self.scores, 'n', '?')}" if self.scores is not None else ""
        kind = "hooked" if self.hooked else type(self.model).__name__
        return f"<FocusLens {i.name}: {i.n_layers} layers × {i.n_heads} heads ({i.n_kv_heads} KV), {kind}{ranked}>"
