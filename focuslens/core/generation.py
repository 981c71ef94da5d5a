"""Greedy generation: one stop rule, one default budget, one decoding loop for the whole library.

Why one module: the evaluator, contextual scoring (the model's own response rows), focus-direction
training data (the gold-only response) and the CLI all need "the model's greedy answer". When each
wrote its own loop they stopped at different token sets and had budgets of 14 to 100 tokens, so the
"same" response differed between entry points. Here:

* :data:`STOP_TOKENS` + the tokenizer's EOS are the end-of-turn tokens (:func:`stop_ids`); the stop
  token is never part of the output;
* :data:`DEFAULT_MAX_NEW_TOKENS` is the one default budget (the answers of every task here are one
  short line; pass more for long-form responses, e.g. the paper's 100);
* :func:`greedy_generate` / :func:`greedy_generate_batch` decode with the model's KV cache;
  ``stop_at_newline`` ends an *answer* at its first line (what the metrics read), while
  :func:`generate_response` / :func:`generate_responses` (rows to score or train on) decode to the
  end of the turn.
"""

from __future__ import annotations

from typing import Any, Iterable, Protocol, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from .checks import check_count
from .errors import UsageError
from .forward import forward_with_cache
from .models import HookedModel, check_context

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "STOP_TOKENS",
    "stop_ids",
    "greedy_generate",
    "greedy_generate_batch",
    "left_pad_offsets",
    "left_pad",
    "generate_response",
    "generate_responses",
    "model_device",
    "Forward",
]

DEFAULT_MAX_NEW_TOKENS = 24
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "</s>")


def stop_ids(model_or_tokenizer) -> set[int]:
    """End-of-turn token ids: the tokenizer's EOS and those of :data:`STOP_TOKENS` it knows."""
    tok = getattr(model_or_tokenizer, "tokenizer", None) or model_or_tokenizer
    ids: set[int] = set()
    if getattr(tok, "eos_token_id", None) is not None:
        ids.add(int(tok.eos_token_id))
    vocab = tok.get_vocab()
    for t in STOP_TOKENS:
        if t in vocab:
            ids.add(int(vocab[t]))
    return ids


class Forward(Protocol):
    """One cached forward pass: the contract of :func:`focuslens.core.forward.forward_with_cache`.

    ``forward(tokens [batch, new], cache, attention_mask=[batch, past + new] | None, logits_to_keep=int | None)
    -> (logits, cache)``; ``cache`` is None at the prefill. The decoding loops take one as ``forward=``
    (default: the hooked model's own pass), so another engine (``FusedModel.forward_with_cache``,
    :mod:`focuslens.engine`) decodes with the same loop and stops by the same rule.
    """

    def __call__(self, tokens: Tensor, cache: Any = None, *, attention_mask: Tensor | None = None,
                 logits_to_keep: int | None = None) -> tuple[Tensor, Any]: ...


def _forward_of(model: HookedModel, forward: Forward | None) -> Forward:
    if forward is not None:
        return forward

    def run(tokens: Tensor, cache: Any = None, *, attention_mask: Tensor | None = None,
            logits_to_keep: int | None = None) -> tuple[Tensor, Any]:
        return forward_with_cache(model, tokens, cache, attention_mask=attention_mask, logits_to_keep=logits_to_keep)

    return run


def _model_stop_ids(model: HookedModel) -> set[int]:
    return stop_ids(model.tokenizer)


def model_device(model: HookedModel) -> torch.device:
    try:
        return next(model.parameters()).device  # type: ignore[attr-defined]
    except (AttributeError, StopIteration):
        return torch.device(getattr(model.cfg, "device", "cpu") or "cpu")


@torch.no_grad()
def greedy_generate(
    model: HookedModel,
    tokens: Tensor,
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    stop_at_newline: bool = True,
    stop_ids: Iterable[int] | None = None,
    forward: Forward | None = None,
) -> tuple[list[int], str]:
    """Greedy decoding of one prompt with the KV cache; returns ``(new_token_ids, text)``.

    Stops at an end-of-turn token (EOS, ``<|im_end|>``...; not included in the output), after
    ``max_new_tokens``, or — with ``stop_at_newline`` — at the first newline once non-whitespace
    text has been generated (metrics read the first line only). Hooks attached to the model fire at
    the prefill (``[batch, head, P, P]`` patterns) and at every step (``[batch, head, 1, P+i]``),
    exactly as in ``model.generate``.

    Args:
        tokens: ``[pos]`` or ``[1, pos]`` prompt ids.
        forward: the cached forward pass to decode with (:class:`Forward`); default the model's own
            (:func:`~focuslens.core.forward.forward_with_cache`). ``model`` still gives the tokenizer,
            the stop tokens and the context check.
    """
    if not isinstance(tokens, Tensor):
        raise UsageError(f"greedy_generate takes the prompt's token ids as a torch tensor ([pos] or [1, pos]), got "
                         f"{type(tokens).__name__}: pass torch.tensor(ids) or model.to_tokens(text)[0].")
    if tokens.dim() == 1:
        tokens = tokens[None]
    if tokens.dim() != 2 or tokens.shape[0] != 1:
        raise ValueError(f"greedy_generate takes one prompt ([pos] or [1, pos]), got {tuple(tokens.shape)}.")
    max_new_tokens = check_count(max_new_tokens, name="max_new_tokens", what="greedy_generate")
    check_context(model, tokens, what="the prompt")
    check_context(model, tokens.shape[1] + max_new_tokens,
                  what=f"the prompt ({tokens.shape[1]} tokens) + max_new_tokens ({max_new_tokens})")
    tok = model.tokenizer
    stops = set(_model_stop_ids(model) if stop_ids is None else stop_ids)
    tokens = tokens.to(model_device(model))
    fwd = _forward_of(model, forward)
    logits, cache = fwd(tokens, logits_to_keep=1)
    out: list[int] = []
    while True:
        nxt = int(logits[0, -1].argmax())
        if nxt in stops:
            break
        out.append(nxt)
        if len(out) >= max_new_tokens:
            break
        if stop_at_newline:
            text = tok.decode(out, skip_special_tokens=True).lstrip()
            if "\n" in text:
                break
        step = torch.tensor([[nxt]], device=tokens.device)
        logits, cache = fwd(step, cache)
    return out, tok.decode(out, skip_special_tokens=True)


def left_pad_offsets(prompts: Sequence[Tensor]) -> list[int]:
    """Pad tokens before each prompt in :func:`greedy_generate_batch`'s left-padded batch.

    Row i holds ``prompts[i]`` at padded positions ``offsets[i] .. width-1`` (``width`` = the longest
    prompt), so a span ``[s, e)`` of prompt i sits at ``[s + offsets[i], e + offsets[i])`` in the
    batch: what :meth:`InterventionSpec.attach_batch <focuslens.intervene.specs.InterventionSpec.attach_batch>` takes.
    """
    width = max(int(p.numel()) for p in prompts) if len(prompts) else 0
    return [width - int(p.numel()) for p in prompts]


def left_pad(prompts: Sequence[Tensor], *, pad_id: int = 0, device: "torch.device | str | None" = None
             ) -> tuple[Int[Tensor, "batch width"], Int[Tensor, "batch width"], list[int]]:
    """The left-padded batch of :func:`greedy_generate_batch`: ``(ids, attention_mask, offsets)``.

    Row i holds ``prompts[i]`` at positions ``offsets[i] ..`` (:func:`left_pad_offsets`), ``pad_id``
    before it and mask 0 there; one definition for the decoder, the tests and the benchmarks.
    """
    offsets = left_pad_offsets(prompts)
    width = max(int(p.numel()) for p in prompts) if len(prompts) else 0
    ids = torch.full((len(prompts), width), int(pad_id), dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for b, (p, off) in enumerate(zip(prompts, offsets)):
        ids[b, off:] = p.flatten().to(ids.device)
        mask[b, off:] = 1
    return ids, mask, offsets


@torch.no_grad()
def greedy_generate_batch(
    model: HookedModel,
    prompts: Sequence[Tensor],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    stop_at_newline: bool = True,
    stop_ids: Iterable[int] | None = None,
    forward: Forward | None = None,
) -> list[tuple[list[int], str]]:
    """:func:`greedy_generate` for several prompts at once (left-padded, one shared KV cache).

    Decoding steps are memory-bound on a CPU, so a batch of 8 costs about as much per step as one
    prompt: this is where batching saves time. Prompts are left-padded with an attention mask; the
    bridge derives each row's position ids from the mask, so every row sees the positions it would
    see alone (RoPE and learned positions). Results equal the one-by-one ones up to float rounding
    (which can flip an argmax between two near-tied tokens: the *near-tie rule*; the tests on tiny
    models and the benchmarks find identical tokens, and ``benchmarks/bench_batched_eval.py`` counts
    and shows any mismatch). Hooks see ``[batch, ...]`` tensors with padding columns (pad key columns
    are masked, pattern exactly 0); an intervention that depends on the example must be attached for
    the whole batch with ``spec.attach_batch(model, examples, offsets=left_pad_offsets(prompts))``.

    Args:
        prompts: ``[pos]`` token ids, one per prompt (lengths may differ).
        forward: the cached forward pass (:class:`Forward`), as in :func:`greedy_generate`.
    """
    if len(prompts) == 0:
        return []
    if len(prompts) == 1:
        return [greedy_generate(model, prompts[0], max_new_tokens=max_new_tokens,
                                stop_at_newline=stop_at_newline, stop_ids=stop_ids, forward=forward)]
    max_new_tokens = check_count(max_new_tokens, name="max_new_tokens", what="greedy_generate_batch")
    if not all(isinstance(p, Tensor) for p in prompts):
        raise UsageError("greedy_generate_batch takes a list of [pos] token-id tensors; pass torch.tensor(ids) "
                         "or model.to_tokens(text)[0] for each prompt.")
    for i, p in enumerate(prompts):
        check_context(model, p, what=f"prompt {i}")
    check_context(model, max(int(p.numel()) for p in prompts) + max_new_tokens,
                  what=f"the longest prompt + max_new_tokens ({max_new_tokens})")
    tok = model.tokenizer
    stops = set(_model_stop_ids(model) if stop_ids is None else stop_ids)
    dev = model_device(model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else next(iter(stops), 0)
    n = len(prompts)
    ids, mask, _ = left_pad(prompts, pad_id=int(pad), device=dev)
    fwd = _forward_of(model, forward)
    logits, cache = fwd(ids, attention_mask=mask, logits_to_keep=1)
    outs: list[list[int]] = [[] for _ in range(n)]
    done = [False] * n
    while True:
        nxt = logits[:, -1].argmax(-1).tolist()
        for b in range(n):
            if done[b]:
                continue
            if nxt[b] in stops:
                done[b] = True
                continue
            outs[b].append(int(nxt[b]))
            if len(outs[b]) >= max_new_tokens:
                done[b] = True
            elif stop_at_newline and "\n" in tok.decode(outs[b], skip_special_tokens=True).lstrip():
                done[b] = True
        if all(done):
            break
        step = torch.tensor([[x if not d else int(pad)] for x, d in zip(nxt, done)], device=dev)
        mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=dev)], dim=1)
        logits, cache = fwd(step, cache, attention_mask=mask)
    return [(o, tok.decode(o, skip_special_tokens=True)) for o in outs]


def generate_response(
    model: HookedModel,
    tokens: Int[Tensor, "pos"] | Sequence[int],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    stop_at_newline: bool = False,
) -> Int[Tensor, "new"]:
    """The model's greedy continuation of ``tokens`` up to the end of its turn, as token ids.

    The response rows that :func:`focuslens.score.contextual.score_dataset` scores and that focus directions
    train on. Same decoding loop and stop tokens as the evaluator; by default it does not stop at a
    newline (a response is the whole turn). May be empty (the model ended its turn at once).
    """
    ids, _ = greedy_generate(model, torch.as_tensor(tokens).long(), max_new_tokens=max_new_tokens,
                             stop_at_newline=stop_at_newline)
    return torch.tensor(ids, dtype=torch.long)


def generate_responses(
    model: HookedModel,
    prompts: Sequence[Int[Tensor, "pos"] | Sequence[int]],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    stop_at_newline: bool = False,
    batch_size: int = 8,
    progress: bool | str = False,
) -> list[Int[Tensor, "new"]]:
    """:func:`generate_response` for many prompts, ``batch_size`` at a time, in the given order.

    Why: contextual scoring (``response="generate"`` / ``"gold_only"``) and focus-direction training
    data need one greedy response per example before anything else can run, and one prompt at a
    time is the slowest way to get them on a CPU (a decoding step costs about as much for 8 rows as
    for 1). Each chunk goes through :func:`greedy_generate_batch` (left padding; every row sees the
    positions it would see alone), so the responses are the one-by-one ones up to float rounding
    (the near-tie rule of :func:`greedy_generate_batch`); ``batch_size=1`` is exactly
    :func:`generate_response` per prompt.

    Args:
        progress: a tqdm bar over prompts (a string: its label).

    Returns:
        one ``[new]`` tensor of token ids per prompt (possibly empty), in the order of ``prompts``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    ps = [torch.as_tensor(p).long().flatten() for p in prompts]
    bar = None
    if progress and ps:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(ps), desc=progress if isinstance(progress, str) else "responses", unit="ex")
    out: list[Tensor] = []
    try:
        for a in range(0, len(ps), batch_size):
            for ids, _ in greedy_generate_batch(model, ps[a:a + batch_size], max_new_tokens=max_new_tokens,
                                                stop_at_newline=stop_at_newline):
                out.append(torch.tensor(ids, dtype=torch.long))
            if bar is not None:
                bar.update(len(ps[a:a + batch_size]))
    finally:
        if bar is not None:
            bar.close()
    return out
