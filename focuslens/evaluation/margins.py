"""Teacher-forced margins: log p(gold answer) − max log p(distractor answer), no generation.

The cheap companion of :func:`focuslens.evaluation.runner.evaluate` for sweeps: the log-probability of the
gold answer minus that of the best distractor answer, both as continuations of the prompt, from one
prefill and one batched forward pass per example. Interventions are the same as for ``evaluate``
(a spec, a per-example callable, or a context manager).

Batching and padding: the batch here is one example's candidate answers, right-padded after the
shared prompt and run on copies of the prompt's KV cache. A per-example spec is therefore attached
once per example with ``spec.attach(model, example)``: every row has the same prompt, so the span
sits at the same positions in every row, and right padding comes after the answer tokens, where the
causal mask keeps it invisible to them (pad rows are edited too but never read). On a
sliding-window layer the span is found from the call's cache length, also for the reused copies.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from .intervention import Intervene, intervention_entry, split_intervene
from ..core.generation import model_device as _device
from ..core.forward import forward_with_cache, repeat_cache
from ..core.models import HookedModel
from ..tasks.metrics import clean_distractor_answers
from ..tasks.records import RenderedExample

__all__ = ["MarginResult", "teacher_forced_margins"]


@dataclass
class MarginResult:
    """Teacher-forced log-probabilities of gold vs distractor answers, one entry per example.

    Attributes:
        margin: ``[n]`` gold log-prob minus best distractor log-prob (NaN without distractor answers).
        gold_logprob: ``[n]`` max over the gold answers of the summed log-prob of their tokens.
        distractor_logprob: ``[n]`` max over the distractor answers (``-inf`` when there are none).
        best_distractor: the distractor answer with the highest log-prob (``None`` when none).
    """

    margin: Float[Tensor, "n"]
    gold_logprob: Float[Tensor, "n"]
    distractor_logprob: Float[Tensor, "n"]
    best_distractor: list[str | None] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        """Fraction of examples (with distractor answers) whose gold answer wins."""
        ok = ~torch.isnan(self.margin)
        return float((self.margin[ok] > 0).float().mean()) if ok.any() else float("nan")

    def __len__(self) -> int:
        return int(self.margin.shape[0])

    def __repr__(self) -> str:
        """One line: n, accuracy and the mean margin (not the per-example tensors)."""
        ok = ~torch.isnan(self.margin)
        mean = f"{float(self.margin[ok].mean()):.3f}" if ok.any() else "nan"
        return f"MarginResult(n={len(self)}, accuracy={self.accuracy:.3f}, mean margin={mean}, with distractors={int(ok.sum())})"


@torch.no_grad()
def _continuation_logprobs(
    model: HookedModel, prompt: Tensor, candidates: list[list[int]], *, batch_size: int
) -> list[float]:
    """Summed log-probs of each candidate token sequence as a continuation of ``prompt``.

    The tokens that all candidates share at their start (e.g. ``"The capital of Veloria is"``) are
    scored once, as part of the prefill; the rest of every candidate is right-padded in batches
    that reuse the prefill's KV cache (the causal mask keeps padding invisible to real tokens).
    """
    dev = _device(model)
    common: list[int] = []
    for col in zip(*candidates):
        if len(set(col)) != 1:
            break
        common.append(col[0])
    # Every candidate keeps at least one token of its own.
    common = common[: min(len(c) for c in candidates) - 1]
    k = len(common)
    full = torch.cat([prompt.to(dev), torch.tensor(common, dtype=torch.long, device=dev)])[None]
    logits, cache = forward_with_cache(model, full, logits_to_keep=k + 1)
    head = torch.log_softmax(logits[0].float(), dim=-1)  # [k + 1, vocab]
    shared = sum(float(head[t, common[t]]) for t in range(k))
    first = head[-1]
    rests = [c[k:] for c in candidates]
    out: list[float] = []
    for b in range(0, len(rests), batch_size):
        chunk = rests[b : b + batch_size]
        lp = [shared + float(first[c[0]]) for c in chunk]
        longest = max(len(c) for c in chunk)
        if longest > 1:
            ids = torch.zeros(len(chunk), longest - 1, dtype=torch.long, device=dev)
            for j, c in enumerate(chunk):
                ids[j, : len(c) - 1] = torch.tensor(c[:-1], device=dev)
            c_cache = repeat_cache(model, cache, len(chunk))
            lo, _ = forward_with_cache(model, ids, c_cache)
            lsm = torch.log_softmax(lo.float(), dim=-1)  # [batch, pos, vocab]
            for j, c in enumerate(chunk):
                for t in range(1, len(c)):
                    lp[j] += float(lsm[j, t - 1, c[t]])
        out += lp
    return out


def teacher_forced_margins(
    model: HookedModel,
    rendered_examples: Sequence[RenderedExample],
    *,
    answer_prefix: str | Callable[[RenderedExample], str] | None = None,
    intervene: Intervene = None,
    batch_size: int = 32,
    progress: bool = False,
) -> MarginResult:
    """Gold-vs-distractor log-prob margins as continuations of each prompt (no generation).

    For each example: ``log p(gold | prompt) - max_d log p(d | prompt)`` where the answers are
    scored as the tokens of ``answer_prefix + answer`` right after the prompt (summed log-probs;
    the gold term is the max over accepted answers). Distractor answers that overlap a gold answer
    are dropped (:func:`~focuslens.tasks.metrics.clean_distractor_answers`). About one prefill per
    example: use it to sweep many settings quickly, then confirm with :func:`evaluate`.

    Args:
        answer_prefix: text before the answer; default: the record's ``meta["answer_prefix"]``
            when it has one (synthetic QA records do: ``"The capital of Veloria is "``, the way
            chat models phrase the answer), else ``""`` for chat prompts (the assistant turn starts
            right after the template's header) and ``" "`` for plain prompts (after ``"Answer:"``). A callable gets the rendered example (e.g. to score
            ``"The capital of Veloria is " + answer``).
        intervene: as in :func:`evaluate` (a spec, a callable per example, or a context manager
            around all).
        batch_size: candidates scored per batched forward pass.
    """
    tok = model.tokenizer
    intervene, _ = intervention_entry(intervene, id=None, output=None)
    per_example, outer = split_intervene(model, intervene)
    gold_lp, dist_lp, best = [], [], []
    from tqdm.auto import tqdm

    with outer():
        for r in tqdm(rendered_examples, disable=not progress, desc="margins", leave=False):
            if answer_prefix is None:
                prefix = r.example.meta.get("answer_prefix") or ("" if r.prompt.chat else " ")
            elif callable(answer_prefix):
                prefix = answer_prefix(r)
            else:
                prefix = answer_prefix
            golds = list(dict.fromkeys(r.answers))
            dists = clean_distractor_answers(r.distractor_answers, golds)
            cands = [tok(prefix + a, add_special_tokens=False).input_ids for a in golds + dists]
            if any(len(c) == 0 for c in cands):
                raise ValueError(f"Example {r.id!r}: an answer tokenises to nothing.")
            cm = per_example(r) if per_example is not None else contextlib.nullcontext()
            with cm:
                lps = _continuation_logprobs(model, r.tokens, cands, batch_size=batch_size)
            g = max(lps[: len(golds)])
            gold_lp.append(g)
            if dists:
                d_lps = lps[len(golds):]
                k = max(range(len(d_lps)), key=lambda j: d_lps[j])
                dist_lp.append(d_lps[k])
                best.append(dists[k])
            else:
                dist_lp.append(float("-inf"))
                best.append(None)
    gl = torch.tensor(gold_lp, dtype=torch.float64)
    dl = torch.tensor(dist_lp, dtype=torch.float64)
    margin = torch.where(torch.isinf(dl), torch.full_like(gl, float("nan")), gl - dl)
    return MarginResult(margin=margin, gold_logprob=gl, distractor_logprob=dl, best_distractor=best)
