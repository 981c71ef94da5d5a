"""Evaluation runner: greedy answers on distraction tasks, resumable, with interventions per example.

Why this module exists
----------------------
Every claim in focuslens ("split softmax on the top-20 heads recovers the gold baseline", "this focus
direction helps") is an accuracy difference on a few hundred examples, measured on a CPU in minutes.
Three things make that practical and honest:

* **fast greedy decoding** with the model's KV cache, stopping at EOS and at the first newline once
  the answer has started (best-subspan EM only reads the first line), unembedding only the last
  position at prefill;
* **interventions per example**: ``intervene`` is a callable ``RenderedExample -> context manager``
  entered around each example's generation, so an oracle intervention can use that example's own
  spans (``intervene=lambda r: split_softmax(model, heads, r.relevant, tau)``); a plain context
  manager object is entered once around the whole run;
* **resumable records**: each example's result is appended to a JSONL file and flushed at once;
  a rerun with the same configuration skips the finished examples, and a rerun with a different
  configuration on the same file stops with an error instead of mixing results.

:func:`teacher_forced_margins` is the cheap companion for sweeps: the log-probability of the gold
answer minus that of the best distractor answer, both as continuations of the prompt, from one
prefill and one batched forward pass per example (no generation).

Example:
    >>> import focuslens as fl
    >>> from focuslens.tasks import make_synthetic_qa
    >>> from focuslens.evaluation import evaluate
    >>> model = fl.load_model()
    >>> res = evaluate(model, make_synthetic_qa(100, n_docs=10), output="runs/base10.jsonl")
    >>> print(res.table())
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Literal, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from .generation import (
    DEFAULT_MAX_NEW_TOKENS,
    greedy_generate,
    greedy_generate_batch,
    model_device as _device,
    stop_ids as _stop_ids,
)
from .models import HookedModel, model_info
from .tasks.metrics import (
    accuracy_by_position,
    best_subspan_em,
    clean_distractor_answers,
    distractor_copy,
    mean_se,
    substring_match,
)
from .tasks.records import RenderedExample, TaskExample, normalise_variant, render

__all__ = [
    "evaluate",
    "EvalResult",
    "greedy_generate",
    "greedy_generate_batch",
    "teacher_forced_margins",
    "MarginResult",
    "config_hash",
    "RECORD_FORMAT_VERSION",
]

RECORD_FORMAT_VERSION = 1

Intervene = Callable[[RenderedExample], ContextManager[Any]] | ContextManager[Any] | None


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """Per-example records of an :func:`evaluate` run and their summary.

    Attributes:
        records: one dict per example, in the order of the examples given (``prediction``, ``em``,
            ``substring``, ``distractor_copy``, ``gold_position``, ``n_new_tokens``, ``seconds``...).
        config: what the run depends on (model, variant, decoding settings, intervention label).
        config_hash: short hash of ``config`` (the key of the JSONL file).
        path: the JSONL file, if any.
        n_resumed: records read back from the file instead of recomputed.
        wall_seconds: wall time of this call (generation of the new records included).
    """

    records: list[dict[str, Any]]
    config: dict[str, Any]
    config_hash: str
    path: Path | None = None
    n_resumed: int = 0
    wall_seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.records)

    @property
    def accuracy(self) -> float:
        return mean_se([r["em"] for r in self.records])[0]

    @property
    def predictions(self) -> list[str]:
        return [r["prediction"] for r in self.records]

    def summary(self) -> dict[str, Any]:
        """Accuracy (best-subspan EM), substring match, distractor copy, per-position accuracy, with SEs."""
        out: dict[str, Any] = {"n": len(self.records)}
        for k, name in (("em", "accuracy"), ("substring", "substring"), ("distractor_copy", "distractor_copy")):
            m, se = mean_se([float(r[k]) for r in self.records])
            out[name], out[f"{name}_se"] = m, se
        out["by_position"] = accuracy_by_position(self.records)
        out["mean_new_tokens"] = mean_se([r["n_new_tokens"] for r in self.records])[0]
        out["mean_prompt_tokens"] = mean_se([r["n_prompt_tokens"] for r in self.records])[0]
        secs = [r["seconds"] for r in self.records]
        out["seconds_per_example"] = mean_se(secs)[0]
        out["variant"] = self.config.get("variant")
        return out

    def table(self, *, by_position: bool = True) -> str:
        """The summary as a markdown table (and a per-position table)."""
        s = self.summary()

        def pm(m: float, se: float) -> str:
            return "n/a" if math.isnan(m) else f"{m:.3f} ± {se:.3f}"

        lines = [
            "| n | variant | accuracy (EM) | substring | distractor copy | new tokens | s / example |",
            "|---|---|---|---|---|---|---|",
            f"| {s['n']} | {s['variant']} | {pm(s['accuracy'], s['accuracy_se'])} | "
            f"{pm(s['substring'], s['substring_se'])} | {pm(s['distractor_copy'], s['distractor_copy_se'])} | "
            f"{s['mean_new_tokens']:.1f} | {s['seconds_per_example']:.2f} |",
        ]
        if by_position and s["by_position"]:
            lines += ["", "| gold position | n | accuracy |", "|---|---|---|"]
            for pos, d in s["by_position"].items():
                lines.append(f"| {pos + 1} | {d['n']} | {pm(d['accuracy'], d['se'])} |")
        return "\n".join(lines)

    def __repr__(self) -> str:
        s = self.summary()
        return (
            f"<EvalResult n={s['n']} variant={s['variant']} accuracy={s['accuracy']:.3f}±{s['accuracy_se']:.3f} "
            f"distractor_copy={s['distractor_copy']:.3f}>"
        )


# --------------------------------------------------------------------------------------------------
# Records file
# --------------------------------------------------------------------------------------------------


def config_hash(config: dict[str, Any]) -> str:
    """A short stable hash of a JSON-serialisable configuration."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _prompt_hash(r: RenderedExample) -> str:
    return hashlib.sha1(json.dumps(r.tokens.tolist()).encode()).hexdigest()[:16]


def _read_records(path: Path, cfg: dict[str, Any], h: str) -> dict[str, dict[str, Any]]:
    """Read a records file written by :func:`evaluate`; drop a torn last line; check the config."""
    with open(path, "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n"):
        # The previous run died mid-write: cut the torn line so the next append starts clean.
        cut = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    records: dict[str, dict[str, Any]] = {}
    for lineno, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}); the records file is damaged.") from None
        if "focuslens_eval" in obj:
            if obj.get("config_hash") != h:
                old = obj.get("config", {})
                diff = sorted(k for k in set(old) | set(cfg) if old.get(k) != cfg.get(k))
                raise ValueError(
                    f"{path} holds results of a different evaluation configuration (hash "
                    f"{obj.get('config_hash')} vs {h}; differs in {diff}: "
                    + ", ".join(f"{k}={old.get(k)!r} there, {cfg.get(k)!r} now" for k in diff)
                    + "). Use another output file, or resume=False to overwrite it."
                )
            continue
        if obj.get("config_hash") != h:
            raise ValueError(
                f"{path}:{lineno}: a record of another configuration ({obj.get('config_hash')} vs {h}). "
                "Use another output file, or resume=False to overwrite it."
            )
        records[obj["key"]] = obj
    return records


def _label(intervene: Any) -> str | None:
    if intervene is None:
        return None
    label = getattr(intervene, "label", None)
    if isinstance(label, str):
        return label
    mod = getattr(intervene, "__module__", "") or ""
    name = getattr(intervene, "__qualname__", None) or type(intervene).__qualname__
    return f"{mod}.{name}" if mod else name


def _is_context_manager(x: Any) -> bool:
    return hasattr(x, "__enter__") and hasattr(x, "__exit__")


# --------------------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------------------


def evaluate(
    model: HookedModel,
    examples: Sequence[TaskExample | RenderedExample],
    *,
    variant: Literal["original", "gold_only", "negative"] | str = "original",
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    intervene: Intervene = None,
    output: str | os.PathLike | None = None,
    resume: bool = True,
    chat: bool = True,
    progress: bool = True,
    gold_position: int | None = None,
    system: str | None = None,
    stop_at_newline: bool = True,
    tag: str | None = None,
    batch_size: int = 8,
) -> EvalResult:
    """Greedy answers for a list of examples, scored with best-subspan EM and distractor copy.

    Args:
        model: a hooked model (``fl.load_model()``).
        examples: :class:`TaskExample` records (rendered here with ``variant``/``chat``/
            ``gold_position``/``system``) or already :class:`RenderedExample` objects (used as given).
        variant: ``"original"``, ``"gold_only"`` or ``"negative"``.
        max_new_tokens: generation budget per example (the answer is one short line).
        intervene: ``None``; a callable ``RenderedExample -> context manager`` entered around each
            example's generation (per-example spans); or a context manager object entered once
            around the whole run. An exception inside it stops the run; finished records are kept.
        output: a JSONL file: a header line with the configuration, then one record per example,
            appended and flushed as it finishes. ``None``: keep records in memory only.
        resume: reuse the records already in ``output`` (same configuration required, else a
            ``ValueError``); ``False`` overwrites the file.
        chat: render in the model's chat template (ignored for pre-rendered examples).
        progress: show a tqdm progress bar.
        gold_position: move the gold document here before rendering (``"original"`` only).
        system: system message for the chat template.
        stop_at_newline: stop at the first newline once the answer started.
        tag: a free label that enters the configuration hash (e.g. ``"split_softmax k=20 tau=0.2"``),
            so runs with different interventions cannot be mixed in one file.
        batch_size: examples decoded together (left-padded, :func:`greedy_generate_batch`) when
            there is no per-example ``intervene`` callable (which always runs one by one). A CPU
            decodes 8 prompts per step for about the cost of one. Not part of the configuration
            hash: batched and one-by-one answers agree (up to float rounding of near ties).

    Returns:
        An :class:`EvalResult`; ``.summary()`` gives accuracy, distractor-copy rate and per-position
        accuracy with standard errors, ``.table()`` the same as markdown.

    Records are keyed by ``"{index}:{id}"`` (position in ``examples`` and the record id) and carry a
    hash of the prompt tokens: resuming with different examples under the same keys raises.
    """
    variant = normalise_variant(variant)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if intervene is not None and not (_is_context_manager(intervene) or callable(intervene)):
        raise TypeError(
            "intervene must be None, a callable RenderedExample -> context manager, or a context "
            f"manager object; got {type(intervene).__name__}."
        )
    info = model_info(model)
    cfg: dict[str, Any] = {
        "format": RECORD_FORMAT_VERSION,
        "model": info.name,
        "model_fingerprint": info.fingerprint(),
        "variant": variant,
        "max_new_tokens": max_new_tokens,
        "chat": chat,
        "system": system,
        "gold_position": gold_position,
        "stop_at_newline": stop_at_newline,
        "intervene": _label(intervene),
        "tag": tag,
    }
    h = config_hash(cfg)
    path = Path(output) if output is not None else None
    done: dict[str, dict[str, Any]] = {}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume and path.exists() and path.stat().st_size > 0:
            done = _read_records(path, cfg, h)
        else:
            with open(path, "w", encoding="utf-8") as f:
                f.write(json.dumps({"focuslens_eval": RECORD_FORMAT_VERSION, "config_hash": h, "config": cfg}) + "\n")

    stops = _stop_ids(model)
    t_start = time.perf_counter()
    per_example = intervene if (intervene is not None and not _is_context_manager(intervene)) else None
    outer = intervene if (intervene is not None and _is_context_manager(intervene)) else contextlib.nullcontext()
    # Per-example interventions need each example alone in the forward pass.
    batch = 1 if per_example is not None else batch_size
    slots: list[dict[str, Any] | None] = [None] * len(examples)
    n_resumed = 0

    from tqdm.auto import tqdm

    bar = tqdm(total=len(examples), disable=not progress, desc=f"evaluate ({variant})", leave=False)
    fh = open(path, "a", encoding="utf-8") if path is not None else None

    def run(pending: list[tuple[int, RenderedExample, str]]) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        if per_example is not None:
            (_, r, _), = pending
            with per_example(r):
                outs = [greedy_generate(model, r.tokens, max_new_tokens=max_new_tokens,
                                        stop_at_newline=stop_at_newline, stop_ids=stops)]
        else:
            outs = greedy_generate_batch(model, [r.tokens for _, r, _ in pending],
                                         max_new_tokens=max_new_tokens, stop_at_newline=stop_at_newline,
                                         stop_ids=stops)
        # Time is shared equally by the examples of a batch.
        secs = (time.perf_counter() - t0) / len(pending)
        cpu = (time.process_time() - c0) / len(pending)
        for (i, r, ph), (ids, text) in zip(pending, outs):
            answers = list(r.answers)
            dist = clean_distractor_answers(r.distractor_answers, answers)
            rec = {
                "key": f"{i}:{r.id}",
                "config_hash": h,
                "index": i,
                "id": r.id,
                "task": r.example.task,
                "variant": r.variant,
                "n_docs": r.n_docs,
                "gold_position": r.gold_position,
                "prediction": text,
                "answers": answers,
                "em": best_subspan_em(text, answers),
                "substring": substring_match(text, answers),
                "distractor_copy": distractor_copy(text, dist, answers),
                "n_prompt_tokens": len(r),
                "n_new_tokens": len(ids),
                "seconds": round(secs, 4),
                "cpu_seconds": round(cpu, 4),
                "batch_size": len(pending),
                "prompt_hash": ph,
            }
            if fh is not None:
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
            slots[i] = rec
            bar.update(1)

    try:
        with outer:
            pending: list[tuple[int, RenderedExample, str]] = []
            for i, ex in enumerate(examples):
                if isinstance(ex, RenderedExample):
                    r = ex
                    if r.variant != variant or r.prompt.chat != chat:
                        raise ValueError(
                            f"examples[{i}] was rendered with variant={r.variant!r}, chat={r.prompt.chat}, "
                            f"but evaluate was called with variant={variant!r}, chat={chat}: pass the "
                            "same settings (they are part of the records' configuration)."
                        )
                elif isinstance(ex, TaskExample):
                    r = render(ex, model, variant=variant, chat=chat, gold_position=gold_position,
                               system=system, index=i)
                else:
                    raise TypeError(f"examples[{i}] is a {type(ex).__name__}, not a TaskExample or RenderedExample.")
                key = f"{i}:{r.id}"
                ph = _prompt_hash(r)
                if key in done:
                    rec = done[key]
                    if rec.get("prompt_hash") != ph:
                        raise ValueError(
                            f"{path}: the record for example {key} was made from a different prompt "
                            "(the examples changed). Use another output file, or resume=False."
                        )
                    slots[i] = rec
                    n_resumed += 1
                    bar.update(1)
                    continue
                pending.append((i, r, ph))
                if len(pending) >= batch:
                    run(pending)
                    pending = []
            if pending:
                run(pending)
    finally:
        bar.close()
        if fh is not None:
            fh.close()
    records = [rec for rec in slots if rec is not None]
    return EvalResult(
        records=records, config=cfg, config_hash=h, path=path, n_resumed=n_resumed,
        wall_seconds=time.perf_counter() - t_start,
    )


# --------------------------------------------------------------------------------------------------
# Teacher-forced margins
# --------------------------------------------------------------------------------------------------


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
    logits, cache = model(full, return_type="logits_and_cache", logits_to_keep=k + 1)
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
            c_cache = copy.deepcopy(cache)
            c_cache.batch_repeat_interleave(len(chunk))
            lo, _ = model(ids, return_type="logits_and_cache", past_key_values=c_cache)
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
        intervene: as in :func:`evaluate` (a callable per example, or a context manager around all).
        batch_size: candidates scored per batched forward pass.
    """
    tok = model.tokenizer
    per_example = intervene if (intervene is not None and not _is_context_manager(intervene)) else None
    outer = intervene if (intervene is not None and _is_context_manager(intervene)) else contextlib.nullcontext()
    gold_lp, dist_lp, best = [], [], []
    from tqdm.auto import tqdm

    with outer:
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
