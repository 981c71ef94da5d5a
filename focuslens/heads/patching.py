"""Activation patching and ablation of single attention heads.

Why this module exists
----------------------
Contextual scores are correlational: a head that *looks* at the gold document need not *use* what
it reads. Activation patching asks the causal question. Run the model on a **clean** prompt (the
gold document states the answer) and on a **corrupted** prompt of exactly the same token length (the
gold document replaced, e.g. by one that states another value); then re-run the corrupted prompt
while copying one head's activation from the clean run. If the metric (say the logit difference
between the clean and the corrupted answer) moves back toward its clean value, that head carries the
information. Sweeping every head gives a ``[layer, head]`` map, as in TransformerLens' ``patching.py``
(Heimersheim & Nanda, "How to use and interpret activation patching", 2024), which this module
follows: one generic routine (:func:`patch_heads`) with the site as a parameter.

Sites (TransformerLens hook names; ``b`` batch, ``p`` positions, ``H`` query heads, ``G`` KV heads):

============  ==================  ===============  ====================================================
site          hook                shape            result indexed by
============  ==================  ===============  ====================================================
``"z"``       ``hook_z``          [b, p, H, d]     query head: the head's whole output (before W_O)
``"q"``       ``hook_q``          [b, p, H, d]     query head (pre-RoPE: same position, so patching it
                                                   equals patching the rotated query)
``"k"``       ``hook_k``          [b, p, G, d]     **KV head** under grouped-query attention: one key
                                                   head feeds ``H/G`` query heads, so it is patched
                                                   (and reported) once, as ``[layer, kv_head]``
``"v"``       ``hook_v``          [b, p, G, d]     **KV head**, as for ``"k"``
``"pattern"`` ``hook_pattern``    [b, H, q, k]     query head (its full attention pattern, or one row)
============  ==================  ===============  ====================================================

Only the hook sites that are patched are cached from the clean run (``names_filter``), so memory is
one site per layer, never the whole activation cache.

Ablation (:func:`ablate_heads`) is the other standard intervention: replace chosen heads' output by
zero or by its mean over a reference set of tokens, and keep it that way during generation.

Which one should you use?
-------------------------
* ``site="z"`` first: does the head matter at all? Then ``"q"`` vs ``"k"``/``"v"``: does it matter
  because of *where it looks* (q, k, pattern) or *what it reads* (v)?
* ``per_position=True`` to find *which positions* carry it (``[layer, pos, head]``); it costs
  ``p`` times more patched runs.
* ``method="batched"`` (default) runs many patched runs per forward pass and shares the layers
  below the patched one and the unchanged position prefix (:mod:`focuslens.heads.patch_jobs`); it
  is exact, ``method="loop"`` (one
  forward per run) is kept as the reference. To screen every head and site cheaply first, use
  attribution patching (:mod:`focuslens.heads.attribution`: 3 forward-equivalents, a first-order
  estimate), then confirm the top heads here. Guide and measurements: ``docs/patching.md``.
* Mean ablation is gentler than zero ablation (the head keeps its average contribution); zero
  ablation can push the residual stream off-distribution.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..core.hooks import HookHandle, attach_hooks
from ..core.errors import UsageError
from ..core.models import HookedModel, check_context, hook_name, model_info
from ..core.checks import check_heads, check_token_ids, frozen_vectors, is_index

__all__ = [
    "PatchSite",
    "PatchMethod",
    "AblationMode",
    "patch_heads",
    "patch_head_z",
    "patch_head_q",
    "patch_head_k",
    "patch_head_v",
    "patch_head_pattern",
    "cache_sites",
    "ablate_heads",
    "head_means",
    "make_corrupted_pair",
    "logit_diff_metric",
    "LogitDiff",
]

PatchSite = Literal["z", "q", "k", "v", "pattern"]
PatchMethod = Literal["batched", "loop"]
AblationMode = Literal["zero", "mean"]
_HOOK = {"z": "hook_z", "q": "hook_q", "k": "hook_k", "v": "hook_v", "pattern": "hook_pattern"}


def _as_batch(tokens: Tensor | Sequence[int], name: str, model: HookedModel | None = None) -> Int[Tensor, "batch pos"]:
    """``[batch, pos]`` integer ids (floats and bools refused, never truncated); with ``model`` also inside
    its vocabulary and context (:func:`~focuslens.core.models.check_context`)."""
    try:
        if isinstance(tokens, (str, bytes)):
            raise TypeError
        t = torch.as_tensor(tokens)
    except (TypeError, ValueError, RuntimeError):
        raise UsageError(f"{name} must be [pos] or [batch, pos] token ids (a tensor or a list of ints), got "
                         f"{type(tokens).__name__}; tokenize the text first (model.tokenizer(text).input_ids).") from None
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2:
        raise ValueError(f"{name} must be [pos] or [batch, pos] token ids, got shape {tuple(t.shape)}.")
    if model is not None:
        check_context(model, t, what=name)
    else:
        check_token_ids(t, 0, what=name)
    return t.long()


def _n_slots(model: HookedModel, site: PatchSite) -> int:
    info = model_info(model)
    return info.n_kv_heads if site in ("k", "v") else info.n_heads


def cache_sites(
    model: HookedModel,
    tokens: Int[Tensor, "batch pos"],
    sites: Iterable[PatchSite],
    *,
    layers: Iterable[int] | None = None,
) -> dict[str, Tensor]:
    """Run ``tokens`` once and keep only the named head sites (``names_filter``): ``{hook_name: act}``."""
    info = model_info(model)
    layer_list = list(range(info.n_layers)) if layers is None else list(layers)
    names = [hook_name(l, _HOOK[s]) for s in sites for l in layer_list]
    with torch.no_grad():
        _, cache = model.run_with_cache(_as_batch(tokens, "tokens", model), names_filter=lambda n: n in names)
    return {n: cache[n].detach().clone() for n in names}


def _setter(site: PatchSite, clean: Tensor, head: int, pos: int | None):
    """A hook that copies head ``head`` (at position ``pos`` if given) from ``clean``.

    Axis order assumed: ``[batch, pos, head, d]`` for z/q/k/v and ``[batch, head, q_pos, k_pos]`` for
    the pattern (where ``pos`` is the query row).
    """

    def hook(x: Tensor, hook=None):
        out = x.clone()
        if site == "pattern":
            if pos is None:
                out[:, head] = clean[:, head]
            else:
                out[:, head, pos] = clean[:, head, pos]
        else:
            if pos is None:
                out[:, :, head] = clean[:, :, head]
            else:
                out[:, pos, head] = clean[:, pos, head]
        return out

    return hook


def patch_heads(
    model: HookedModel,
    corrupted_tokens: Int[Tensor, "batch pos"],
    clean: Int[Tensor, "batch pos"] | dict[str, Tensor],
    metric: Callable[[Float[Tensor, "batch pos d_vocab"]], Tensor | float],
    *,
    site: PatchSite = "z",
    per_position: bool = False,
    layers: Iterable[int] | None = None,
    positions: Iterable[int] | None = None,
    method: PatchMethod = "batched",
    batch_size: int | None = None,
    progress: bool = False,
) -> Float[Tensor, "layer head"] | Float[Tensor, "layer pos head"]:
    """Patch each head's ``site`` activation from the clean run into the corrupted run; record metric.

    Args:
        model: a hooked model.
        corrupted_tokens: ``[pos]`` or ``[batch, pos]`` ids of the corrupted prompt(s).
        clean: the clean prompt ids (same shape: patching needs position-aligned prompts), or a
            cache from :func:`cache_sites` that holds this ``site`` (reuse it across sites/metrics).
        metric: ``logits [batch, pos, d_vocab] -> scalar`` (e.g. :func:`logit_diff_metric`). It is
            called once per patched run on that run's own logits (``batch`` = the corrupted
            prompts), with both methods, so any such metric gives the same numbers either way.
        site: ``"z"`` (default), ``"q"``, ``"k"``, ``"v"`` or ``"pattern"`` (see the module table).
            For ``"k"``/``"v"`` under grouped-query attention the head axis is the **KV head**
            (``n_kv_heads`` entries), not the query head.
        per_position: patch one position at a time (query row for ``"pattern"``), giving
            ``[layer, pos, head]``; otherwise all positions at once, ``[layer, head]``.
        layers: restrict to these layers (others are NaN in the result).
        positions: with ``per_position``, restrict to these positions (others are NaN).
        method: ``"batched"`` (default): many patched runs per forward pass, one batch row each;
            the layers below the patched one and the positions before the first clean/corrupted
            difference run once (:mod:`focuslens.heads.patch_jobs`); equal to ``"loop"`` (one
            forward pass per run, the reference) up to float32 rounding (~1e-7 on tiny models,
            2e-5 on a SmolLM2 logit difference of ~9.5).
        batch_size: patched runs per forward pass with ``method="batched"`` (default:
            :func:`~focuslens.heads.patch_jobs.default_batch_size`, ~1 GiB of logits and
            activations). Lower it if memory is short.
        progress: a tqdm bar over patched runs.

    Returns:
        ``[n_layers, n_heads]`` (or ``[n_layers, pos, n_heads]``), with ``n_heads`` replaced by
        ``n_kv_heads`` for ``site`` ``"k"``/``"v"``. Entry = metric of the patched corrupted run.
        Normalise it yourself, e.g. ``(r - m_corrupt) / (m_clean - m_corrupt)``.

    Raises:
        ValueError: shapes differ, unknown site/layer, or a cache without the site.

    Example:
        >>> clean, corrupt = make_corrupted_pair(model, example)
        >>> metric = logit_diff_metric(model, clean.answers[0], corrupt.answers[0])
        >>> res = patch_heads(model, corrupt.tokens, clean.tokens, metric, site="z")  # [layer, head]
    """
    if site not in _HOOK:
        raise ValueError(f"Unknown site {site!r}; use one of {sorted(_HOOK)}.")
    if method not in ("batched", "loop"):
        raise ValueError(f"method must be 'batched' or 'loop', got {method!r}.")
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int (patched runs per forward pass), got {batch_size!r}.")
    info = model_info(model)
    corrupted = _as_batch(corrupted_tokens, "corrupted_tokens")
    layer_list = _checked_layers(info, layers)
    cache = _clean_site_cache(model, clean, corrupted, site, layer_list)
    n_pos = corrupted.shape[1]
    slots = _n_slots(model, site)
    pos_list, result = _patch_grid(info.n_layers, n_pos, slots, per_position, positions)
    jobs = [(l, p, h) for l in layer_list for p in pos_list for h in range(slots)]
    if method == "batched":
        from .patch_jobs import default_batch_size, run_patch_jobs

        bs = batch_size or default_batch_size(model, n_pos, n_prompts=corrupted.shape[0])
        values = run_patch_jobs(
            model, corrupted, cache, metric, site=site, hook=_HOOK[site], jobs=jobs, batch_size=bs, progress=progress
        )
        for (l, p, h), value in zip(jobs, values):
            _store(result, l, p, h, value)
        return result
    _patch_loop(model, corrupted, cache, metric, site, jobs, result, progress)
    return result


def _checked_layers(info, layers: Iterable[int] | None) -> list[int]:
    """The layers asked for (all by default), sorted and deduplicated; an unknown layer raises."""
    layer_list = list(range(info.n_layers)) if layers is None else sorted(set(int(l) for l in layers))
    for l in layer_list:
        if not 0 <= l < info.n_layers:
            raise ValueError(f"Unknown layer {l}: this model has layers 0..{info.n_layers - 1}.")
    return layer_list


def _clean_site_cache(
    model: HookedModel, clean: Tensor | Sequence[int] | dict[str, Tensor], corrupted: Tensor, site: PatchSite,
    layer_list: list[int],
) -> dict[str, Tensor]:
    """The clean activations at ``site``: a given cache (checked to hold the layers) or one run of the clean tokens."""
    if isinstance(clean, dict):
        missing = [hook_name(l, _HOOK[site]) for l in layer_list if hook_name(l, _HOOK[site]) not in clean]
        if missing:
            raise ValueError(f"The clean cache lacks {missing[:3]}...: build it with cache_sites(..., [{site!r}]).")
        return clean
    clean_t = _as_batch(clean, "clean tokens")
    if clean_t.shape != corrupted.shape:
        raise ValueError(
            f"Clean {tuple(clean_t.shape)} and corrupted {tuple(corrupted.shape)} token tensors must have "
            "the same shape: patching copies activations position by position. Build pairs of equal "
            "token length (make_corrupted_pair does)."
        )
    return cache_sites(model, clean_t, [site], layers=layer_list)


def _patch_grid(
    n_layers: int, n_pos: int, slots: int, per_position: bool, positions: Iterable[int] | None
) -> tuple[list[int | None], Tensor]:
    """The positions patched (``[None]``: all at once) and the NaN-filled result they are written into."""
    if not per_position:
        return [None], torch.full((n_layers, slots), float("nan"))
    pos_list: list[int | None] = list(range(n_pos)) if positions is None else sorted(set(int(p) for p in positions))
    for p in pos_list:
        if not 0 <= p < n_pos:
            raise ValueError(f"Position {p} is outside the prompt of {n_pos} tokens.")
    return pos_list, torch.full((n_layers, n_pos, slots), float("nan"))


def _store(result: Tensor, l: int, p: int | None, h: int, value: float) -> None:
    if p is None:
        result[l, h] = value
    else:
        result[l, p, h] = value


def _patch_loop(
    model: HookedModel, corrupted: Tensor, cache: dict[str, Tensor], metric: Callable, site: PatchSite,
    jobs: list[tuple[int, int | None, int]], result: Tensor, progress: bool,
) -> None:
    """``method="loop"``: one forward pass per patched run (the reference for the batched method)."""
    it: Iterable = jobs
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(jobs, desc=f"patching {site}", unit="run")
    with torch.no_grad():
        for l, p, h in it:
            name = hook_name(l, _HOOK[site])
            with attach_hooks(model, [(name, _setter(site, cache[name], h, p))], label=f"patch {site} L{l}H{h}"):
                logits = model(corrupted)
            _store(result, l, p, h, float(metric(logits)))

def patch_head_z(model, corrupted_tokens, clean, metric, **kw):
    """:func:`patch_heads` at ``site="z"``: each query head's output. ``[layer, head]``."""
    return patch_heads(model, corrupted_tokens, clean, metric, site="z", **kw)


def patch_head_q(model, corrupted_tokens, clean, metric, **kw):
    """:func:`patch_heads` at ``site="q"``: each query head's queries. ``[layer, head]``."""
    return patch_heads(model, corrupted_tokens, clean, metric, site="q", **kw)


def patch_head_k(model, corrupted_tokens, clean, metric, **kw):
    """:func:`patch_heads` at ``site="k"``: each **KV head**'s keys. ``[layer, kv_head]`` under GQA."""
    return patch_heads(model, corrupted_tokens, clean, metric, site="k", **kw)


def patch_head_v(model, corrupted_tokens, clean, metric, **kw):
    """:func:`patch_heads` at ``site="v"``: each **KV head**'s values. ``[layer, kv_head]`` under GQA."""
    return patch_heads(model, corrupted_tokens, clean, metric, site="v", **kw)


def patch_head_pattern(model, corrupted_tokens, clean, metric, **kw):
    """:func:`patch_heads` at ``site="pattern"``: each query head's attention pattern. ``[layer, head]``."""
    return patch_heads(model, corrupted_tokens, clean, metric, site="pattern", **kw)


# --------------------------------------------------------------------------------------------------
# Metrics and pairs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogitDiff:
    """A patching metric: ``logits -> logit[good] - logit[bad]`` at position ``pos``, averaged over the batch.

    Built by :func:`logit_diff_metric`; its ``repr`` says exactly which tokens it compares (and when an
    answer was reduced to its first token). Callable as ``metric(logits)`` by :func:`patch_heads`,
    :func:`~focuslens.heads.attribution.attribution_patch_heads` and ``FocusLens.patch``/``attribute``.

    Attributes:
        good, bad: the token ids compared.
        pos: the position whose next-token logits are read (``-1``: the last).
        good_token, bad_token: those tokens as text.
        good_text, bad_text: the answers as given (equal to the token text for a one-token answer).
    """

    good: int
    bad: int
    pos: int = -1
    good_token: str = ""
    bad_token: str = ""
    good_text: str = ""
    bad_text: str = ""

    def __call__(self, logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, ""]:
        if logits.dim() != 3:
            raise ValueError(f"LogitDiff expects logits [batch, pos, d_vocab], got shape {tuple(logits.shape)}.")
        vocab = logits.shape[-1]
        if not (self.good < vocab and self.bad < vocab):
            raise ValueError(f"Token ids {self.good} / {self.bad} are outside this model's vocabulary ({vocab} "
                             "tokens): build the metric with the same model that produces the logits.")
        if not -logits.shape[1] <= self.pos < logits.shape[1]:
            raise ValueError(f"LogitDiff reads position {self.pos}, but the logits have {logits.shape[1]} positions "
                             f"(valid: -{logits.shape[1]}..{logits.shape[1] - 1}); build the metric with a pos "
                             "inside the prompt (-1: the last).")
        return (logits[:, self.pos, self.good] - logits[:, self.pos, self.bad]).mean()

    def __repr__(self) -> str:
        def side(tid: int, tok: str, text: str) -> str:
            first = f" (first token of {text!r})" if text and text != tok else ""
            return f"{tok!r} [{tid}]{first}"

        return (f"LogitDiff({side(self.good, self.good_token, self.good_text)} - "
                f"{side(self.bad, self.bad_token, self.bad_text)}, pos={self.pos})")


def logit_diff_metric(
    model: HookedModel,
    good: str | int,
    bad: str | int,
    *,
    pos: int = -1,
    multi_token: Literal["first", "error"] = "first",
) -> LogitDiff:
    """The logit-difference metric for patching: ``logit[good] - logit[bad]`` at ``pos``, batch mean.

    The one metric helper of :mod:`focuslens.heads`: pass it to :func:`patch_heads`,
    :func:`~focuslens.heads.attribution.attribution_patch_heads`, ``lens.patch`` or ``lens.attribute``.

    Args:
        model: the hooked model (its tokenizer turns answer strings into ids).
        good, bad: the clean and the corrupted answer, as token ids or strings. A string is tokenised
            without special tokens, exactly as written: mind the leading space (``" Paris"`` is the
            token after ``"The capital is"``; ``"Paris"`` starts an assistant turn).
        pos: the position whose next-token logits are compared (``-1``: the last, i.e. the prompt
            ends right before the answer).
        multi_token: an answer of several tokens stands for its **first** token (``"first"``, the
            default: the token the model must produce next; the metric's ``repr`` says so), or is
            refused (``"error"``).

    Returns:
        A :class:`LogitDiff` (callable ``metric(logits) -> scalar tensor``, differentiable).

    Raises:
        ValueError: an answer tokenises to nothing, to several tokens with ``multi_token="error"``,
            or both answers start with the same token (the difference would always be 0).

    Example:
        >>> metric = logit_diff_metric(model, " Paris", " Rome")
        >>> metric
        LogitDiff(' Paris' [7042] - ' Rome' [7268], pos=-1)   # SmolLM2's token ids
        >>> lens.patch(corrupt_tokens, clean_tokens, metric)
    """
    if multi_token not in ("first", "error"):
        raise ValueError(f"multi_token must be 'first' or 'error', got {multi_token!r}.")
    if not is_index(pos):  # pos=True would read position 1, pos=1.5 fail deep inside the metric
        raise UsageError(f"logit_diff_metric: pos must be an int position (-1: the last), got {pos!r}.")
    pos = int(pos)
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise UsageError(f"logit_diff_metric needs a hooked model with its tokenizer (fl.load_model(...)), got "
                         f"{type(model).__name__}" + (" without a tokenizer." if model is not None else "."))
    d_vocab = int(getattr(getattr(model, "cfg", None), "d_vocab", 0) or 0)

    def first(x: str | int, role: str) -> tuple[int, str, str]:
        if not (is_index(x) or isinstance(x, str)):
            raise TypeError(f"{role} must be a token id (int) or an answer string, got {type(x).__name__}.")
        if not isinstance(x, str):
            x = int(x)
            if x < 0:
                raise ValueError(f"{role} token id must be >= 0, got {x}.")
            if d_vocab and x >= d_vocab:
                raise UsageError(f"{role} token id {x} is outside this model's vocabulary (ids 0..{d_vocab - 1}); "
                                 "give an id from model.tokenizer, or the answer text.")
            return x, tok.decode([x]), ""
        ids = tok(x, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"{role} {x!r} tokenises to nothing: give the answer text (or a token id).")
        pieces = [tok.decode([i]) for i in ids]
        if len(ids) > 1 and multi_token == "error":
            raise ValueError(
                f"{role} {x!r} is {len(ids)} tokens {pieces}, not one. Pick answers that are single tokens "
                "(a leading space often helps: ' Paris'), pass multi_token='first' to compare first tokens, "
                "or write your own metric over the answer's log-probability.")
        return int(ids[0]), pieces[0], x

    g, g_tok, g_text = first(good, "good")
    b, b_tok, b_text = first(bad, "bad")
    if g == b:
        raise ValueError(f"{good!r} and {bad!r} start with the same token ({g_tok!r}): the logit difference is "
                         "always 0. Pick answers whose first tokens differ.")
    return LogitDiff(good=g, bad=b, pos=pos, good_token=g_tok, bad_token=b_tok, good_text=g_text, bad_text=b_text)


def make_corrupted_pair(
    model_or_tokenizer,
    example,
    *,
    chat: bool = True,
    candidates: Sequence[str] | None = None,
):
    """A clean/corrupted pair of :class:`~focuslens.tasks.RenderedExample` of equal token length.

    The corrupted prompt is the clean one with the *answer value inside the gold document* replaced
    by another value (by default the distractors' values, tried in order) that tokenises to the same
    length, so every span (documents, question) is at the same positions in both and activations can
    be patched position by position. The gold document then states a wrong value: the model's answer
    should flip from the clean answer to ``corrupted.answers[0]`` (the substituted value).

    Args:
        model_or_tokenizer: a hooked model (its ``tokenizer`` is used) or a tokenizer.
        example: a :class:`~focuslens.tasks.TaskExample` (rendered here, ``variant="original"``) or a
            :class:`~focuslens.tasks.RenderedExample` (its record is re-rendered with ``chat``).
        chat: render in the chat template.
        candidates: replacement values to try (default: the distractors' values, then 200 seeded
            made-up names).

    Returns:
        ``(clean, corrupted)``; ``corrupted.answers == [substituted value]``,
        ``corrupted.distractor_answers`` holds the clean answers.

    Raises:
        ValueError: the gold document does not contain the answer text verbatim, or no candidate
            gives an equal-length prompt (pass ``candidates=`` with more values).
    """
    from ..tasks.records import RenderedExample, render

    tok = getattr(model_or_tokenizer, "tokenizer", model_or_tokenizer)
    record = example.example if isinstance(example, RenderedExample) else example
    if record.gold_index is None:
        raise ValueError("make_corrupted_pair needs an example with a gold document (gold_index).")
    clean = render(record, tok, variant="original", chat=chat)
    gold_doc = record.ctxs[record.gold_index]
    answer = next((a for a in record.answers if a and a in gold_doc.text), None)
    if answer is None:
        raise ValueError(
            "The gold document does not contain any accepted answer verbatim, so it cannot be corrupted "
            "by substitution. Build the corrupted prompt by hand with equal token length."
        )
    tried = []
    if candidates is None:
        # the distractors' values first, then made-up names (seeded): enough to find an equal length
        import random

        from ..tasks.synthetic import made_up_name

        rng = random.Random(len(answer))
        candidates = list(record.distractor_answers) + [made_up_name(rng, "city") for _ in range(200)]
    for value in candidates:
        if not value or value == answer or value in record.answers:
            continue
        bad = copy.deepcopy(record)
        doc = bad.ctxs[bad.gold_index]
        doc.text = re.sub(re.escape(answer), value, doc.text)
        bad.answers = [value]
        bad.distractor_answers = list(record.answers)
        corrupted = render(bad, tok, variant="original", chat=chat)
        if len(tried) < 10:
            tried.append(value)
        if len(corrupted.prompt) == len(clean.prompt) and corrupted.prompt.spans == clean.prompt.spans:
            return clean, corrupted
    raise ValueError(
        f"No replacement value gives a prompt of the same token length ({len(clean.prompt)} tokens); "
        f"tried {tried}.... Pass candidates=[...] with values of the same length as {answer!r}."
    )


# --------------------------------------------------------------------------------------------------
# Ablation
# --------------------------------------------------------------------------------------------------


def head_means(
    model: HookedModel,
    heads: Iterable[Sequence[int]],
    mean_over: Int[Tensor, "batch pos"] | Sequence[Tensor],
) -> dict[tuple[int, int], Float[Tensor, "d_head"]]:
    """Mean of each head's output ``hook_z`` over every position of the reference token sequences."""
    head_list = check_heads(model, heads)
    layers = sorted({l for l, _ in head_list})
    seqs = [mean_over] if isinstance(mean_over, Tensor) else list(mean_over)
    if not seqs:
        raise ValueError("mean_over is empty: give reference token sequences to average over.")
    sums: dict[int, Tensor] = {}
    count = 0
    for s in seqs:
        t = _as_batch(s, "mean_over", model)
        cache = cache_sites(model, t, ["z"], layers=layers)
        for l in layers:
            z = cache[hook_name(l, "hook_z")].double()  # [b, p, H, d]
            sums[l] = sums.get(l, 0) + z.sum((0, 1))
        count += t.shape[0] * t.shape[1]
    return {(l, h): (sums[l][h] / count).float() for l, h in head_list}


def ablate_heads(
    model: HookedModel,
    heads: Iterable[Sequence[int]],
    *,
    mode: AblationMode = "zero",
    mean_over: Int[Tensor, "batch pos"] | Sequence[Tensor] | None = None,
    means: dict[tuple[int, int], Tensor] | None = None,
) -> HookHandle:
    """Knock out chosen heads: their output ``hook_z`` becomes 0 or its mean, at every position.

    Acts in forward passes and at the prefill and every decoding step of ``generate``. Other heads
    are untouched (bit for bit).

    Args:
        heads: ``(layer, head)`` query heads.
        mode: ``"zero"`` or ``"mean"`` (the head's mean output over ``mean_over``: all positions of
            those reference sequences, e.g. a few task prompts; or pass precomputed ``means``).
        mean_over: ``[batch, pos]`` ids or a list of ``[pos]`` sequences (``mode="mean"``).
        means: precomputed ``{(layer, head): Tensor[d_head]}`` from :func:`head_means`.

    Returns:
        A :class:`HookHandle` (``.remove()``, context manager).

    Example:
        >>> with ablate_heads(model, top20, mode="mean", mean_over=[r.tokens for r in ref]):
        ...     res = evaluate(model, test_examples)
    """
    # The checks of the Ablate spec (focuslens.core.checks): ints in range, no bools/floats/duplicates,
    # at least one; given means finite [d_head] vectors.
    head_list = check_heads(model, heads, what="ablate_heads")
    if mode not in ("zero", "mean"):
        raise ValueError(f"mode must be 'zero' or 'mean', got {mode!r}.")
    if mode == "mean":
        if means is not None:
            means = dict(frozen_vectors(means, what="ablate_heads means", d_head=model_info(model).d_head))
        else:
            if mean_over is None:
                raise ValueError("mode='mean' needs mean_over=<reference tokens> (or means=head_means(...)).")
            means = head_means(model, head_list, mean_over)
        missing = [h for h in head_list if h not in means]
        if missing:
            raise ValueError(f"means has no entry for heads {missing}.")
    elif mean_over is not None or means is not None:
        raise ValueError("mean_over/means are only used with mode='mean'.")
    by_layer: dict[int, list[int]] = {}
    for l, h in head_list:
        by_layer.setdefault(l, []).append(h)

    def make(l: int, hs: list[int]):
        idx = torch.tensor(sorted(hs))
        fill = None if mode == "zero" else torch.stack([means[(l, h)] for h in sorted(hs)])  # [n, d]

        def hook(z: Float[Tensor, "batch pos head d_head"], hook=None):
            out = z.clone()
            if fill is None:
                out[:, :, idx.to(z.device)] = 0
            else:
                out[:, :, idx.to(z.device)] = fill.to(z.device, z.dtype)
            return out

        return hook

    hooks = [(hook_name(l, "hook_z"), make(l, hs)) for l, hs in sorted(by_layer.items())]
    return attach_hooks(model, hooks, label=f"ablate_heads({mode}, {len(head_list)} heads)")
