"""Evaluation runner: greedy answers on distraction tasks, resumable, with interventions per example.

Why this module exists
----------------------
Every claim in focuslens ("split softmax on the top-20 heads recovers the gold baseline", "this focus
direction helps") is an accuracy difference on a few hundred examples, measured on a CPU in minutes.
Three things make that practical and honest:

* **fast greedy decoding** with the model's KV cache, stopping at EOS and at the first newline once
  the answer has started (best-subspan EM only reads the first line), unembedding only the last
  position at prefill;
* **interventions as specs**: ``intervene`` is a spec of :mod:`focuslens.intervene.specs`
  (``SplitSoftmax(heads, tau)``, ``Steer(directions, alpha=0.5)``...). A spec that needs the example
  (split softmax takes each example's own gold span, ``alpha="auto"`` its tokens) is attached around
  each batch's generation with ``attach_batch`` (each row its own span / α under left padding); one
  that does not is attached once around the whole run. Either way the batches are decoded together
  and the hooks are removed in a ``finally``, also after an exception;
* **records keyed by content**: each example's result is appended to a JSONL file and flushed at
  once; the file's header holds the configuration, which includes the spec's ``identity`` (heads,
  τ/α, a checksum of the vectors...) and a digest of every weight of the model. A rerun with the same
  configuration skips the finished examples; a rerun with a different one on the same file raises a
  ``ValueError`` naming the keys that differ, so a file never hands back another configuration's
  answers. Each record line carries its own hash, and every line is checked before anything is
  resumed; a file that is not a records file is never modified (:mod:`.records_io`). A bare callable or
  context manager is still accepted but has no content identity: with ``output=`` it needs an
  explicit ``id="..."``.

:func:`teacher_forced_margins` is the cheap companion for sweeps: the log-probability of the gold
answer minus that of the best distractor answer, both as continuations of the prompt, from one
prefill and one batched forward pass per example (no generation).

Example:
    >>> import focuslens as fl
    >>> from focuslens.tasks import make_synthetic_qa
    >>> from focuslens.evaluation.runner import evaluate
    >>> model = fl.load_model()
    >>> res = evaluate(model, make_synthetic_qa(100, n_docs=10), output="runs/base10.jsonl")
    >>> print(res.table())
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence


from ..core.generation import (
    DEFAULT_MAX_NEW_TOKENS,
    greedy_generate,
    greedy_generate_batch,
    left_pad_offsets,
    stop_ids as _stop_ids,
)
from ..core.checks import check_count
from ..core.errors import UsageError
from ..core.io import content_hash, tensor_checksum
from ..core.models import HookedModel, check_context, model_info, weights_digest
from ..intervene.specs import InterventionSpec
from .intervention import Intervene, attached_batch, intervention_entry, split_intervene
from ..engine import EngineChoice, FusedModel, resolve_engine
from .records_io import RECORD_FORMAT_VERSION, RecordsFile, open_records
from ..tasks.metrics import (
    accuracy_by_position,
    best_subspan_em,
    clean_distractor_answers,
    distractor_copy,
    mean_se,
    substring_match,
)
from ..tasks.records import RenderedExample, TaskExample, normalise_variant, render

__all__ = ["evaluate", "EvalResult", "config_hash", "Decoding", "RECORD_FORMAT_VERSION"]

@dataclass(frozen=True)
class Decoding:
    """How :func:`evaluate` renders prompts and decodes answers (all of it enters the records' hash).

    Attributes:
        variant: ``"original"``, ``"gold_only"`` or ``"negative"``.
        max_new_tokens: generation budget per example (the answer is one short line).
        chat: render in the model's chat template (ignored for pre-rendered examples).
        system: system message for the chat template.
        gold_position: move the gold document here before rendering (``"original"`` only).
        stop_at_newline: stop at the first newline once the answer started.

    Why a bundle: these six settings travel together (the CLI, the demo and the sweeps pass the same
    ones to every call); ``evaluate`` still accepts each as a keyword (``max_new_tokens=4``), which
    overrides the bundle's value.
    """

    variant: Literal["original", "gold_only", "negative"] | str = "original"
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    chat: bool = True
    system: str | None = None
    gold_position: int | None = None
    stop_at_newline: bool = True

    def __post_init__(self) -> None:
        # checked here, so that a bundle built by hand (Decoding(max_new_tokens=-1)) is refused like a keyword
        check_count(self.max_new_tokens, name="max_new_tokens", what="Decoding")

    def replace(self, **changes: Any) -> "Decoding":
        """A copy with some fields changed (unknown names raise ``TypeError``)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"evaluate() got unexpected keyword argument(s) {unknown}.")
        return dataclasses.replace(self, **changes)


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
        config: what the run depends on (model, variant, decoding settings, the intervention's identity).
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
    """A short stable hash of a JSON-serialisable configuration (:func:`focuslens.core.io.content_hash`)."""
    return content_hash(config)


def _prompt_hash(r: RenderedExample) -> str:
    return tensor_checksum(r.tokens.long())


# --------------------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------------------


class _Keep:
    """The default of :func:`evaluate`'s decoding keywords: keep the ``decoding`` bundle's value."""

    def __repr__(self) -> str:
        return "<the decoding bundle's value>"


_KEEP: Any = _Keep()


def evaluate(
    model: HookedModel,
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
    variant: Literal["original", "gold_only", "negative"] | str = _KEEP, max_new_tokens: int = _KEEP,
    chat: bool = _KEEP, system: str | None = _KEEP, gold_position: int | None = _KEEP, stop_at_newline: bool = _KEEP,
) -> EvalResult:
    """Greedy answers for a list of examples, scored with best-subspan EM and distractor copy.

    Args:
        model: a hooked model (``fl.load_model()``).
        examples: :class:`TaskExample` records (rendered here with the decoding settings) or already
            :class:`RenderedExample` objects (used as given; they must match ``variant``/``chat``).
        intervene: ``None``; an intervention spec (:mod:`focuslens.intervene.specs`): when it needs the
            example (``spec.per_example``: split softmax, PASTA, ``alpha="auto"``) attached around
            each batch's generation with ``spec.attach_batch(model, batch, offsets=...)`` (each row
            its own span / α, shifted by its left padding; a batch of one uses ``spec.attach``),
            else once around the whole run; its ``identity`` enters the records' configuration. A
            spec with ``batchable == False`` runs one example at a time. Also accepted, without a
            content identity: a callable ``RenderedExample -> context manager`` (entered per example)
            or a context manager object (entered once) — with ``output`` these need ``id``. An
            exception inside an intervention stops the run; finished records are kept and the hooks
            are removed.
        output: a JSONL file: a header line with the configuration, then one record per example,
            appended and flushed as it finishes. ``None``: keep records in memory only.
        id: what a callable / context-manager ``intervene`` does, as a stable string (it replaces
            the content identity that a spec carries). Not allowed with a spec.
        resume: reuse the records already in ``output`` (same configuration required, else a
            ``ValueError`` naming the differing keys); ``False`` overwrites the file.
        decoding: a :class:`Decoding` bundle (variant, max_new_tokens, chat, system, gold_position,
            stop_at_newline); each of those may also be given as a keyword here, overriding it.
        variant, max_new_tokens, chat, system, gold_position, stop_at_newline: override that field
            of ``decoding`` (see :class:`Decoding`); left out, the bundle's value is kept.
        tag: a free label (string or JSON-able dict, e.g. the data's identity) that enters the
            configuration hash.
        batch_size: examples decoded together (left-padded, :func:`greedy_generate_batch`), with
            any spec (only a bare per-example callable runs one by one). A CPU decodes 8 prompts
            per step for about the cost of one. Each record's ``batch_size`` says how many were
            decoded with it. Not part of the configuration hash: batched and one-by-one answers
            agree up to float rounding, which can flip an argmax between two near-tied tokens (the
            near-tie rule of :func:`greedy_generate_batch`; the tests find identical answers on tiny
            models, ``benchmarks/bench_batched_eval.py`` counts mismatches on SmolLM2).
        progress: show a tqdm progress bar.
        engine: ``"auto"`` (default): decode on the fused engine (:mod:`focuslens.engine`: the bridge's
            weights on Hugging Face SDPA attention, only the edited heads' attention recomputed
            explicitly) whenever it expresses ``intervene`` exactly (``None`` or a spec with
            ``spec.fused``: split softmax, PASTA, post-RoPE injection, steering (``alpha="auto"``
            probes on the bridge), ablation, the label-free specs (their measuring passes on the
            bridge) and compositions of these; no hooks attached to the model), else on the bridge; ``"fused"``:
            the engine or a ``UsageError`` saying why not; ``"eager"``: the TransformerLens bridge
            (every hook fires). Not part of the configuration hash: both compute the same answers up
            to float rounding (the near-tie rule, as for ``batch_size``); each record's ``engine``
            says which one decoded it.

    Returns:
        An :class:`EvalResult`; ``.summary()`` gives accuracy, distractor-copy rate and per-position
        accuracy with standard errors, ``.table()`` the same as markdown.

    Records are keyed by ``"{index}:{id}"`` (position in ``examples`` and the record id) and carry a
    hash of the prompt tokens: resuming with different examples under the same keys raises.

    Example:
        >>> from focuslens.intervene import SplitSoftmax
        >>> res = evaluate(model, test, intervene=SplitSoftmax(top20, tau=0.2), output="runs/ss.jsonl",
        ...                max_new_tokens=16)
    """
    dec, variant = _settings(decoding, batch_size, variant=variant, max_new_tokens=max_new_tokens, chat=chat,
                             system=system, gold_position=gold_position, stop_at_newline=stop_at_newline)
    intervene, intervene_cfg = intervention_entry(intervene, id=id, output=output, batch_size=batch_size)
    fused = resolve_engine(model, intervene, engine)
    cfg = _run_config(model, dec, variant, intervene_cfg, tag)
    h = config_hash(cfg)
    path = Path(output) if output is not None else None
    # One writer per output file (a second process is refused, never interleaved); every line checked.
    with open_records(path, cfg, h, resume=resume) if path is not None else contextlib.nullcontext() as records:
        run = _EvalRun(model, intervene, dec, variant, h, path=path, records=records, fused=fused)
        run.run(examples, batch_size=batch_size, progress=progress)
        return EvalResult(
            records=[rec for rec in run.slots if rec is not None], config=cfg, config_hash=h, path=path,
            n_resumed=run.n_resumed, wall_seconds=time.perf_counter() - run.t_start,
        )


def _settings(decoding: Decoding | None, batch_size: int, **overrides: Any) -> tuple[Decoding, str]:
    """``(decoding, normalised variant)``: the ``decoding`` bundle (default :class:`Decoding`) with the
    keywords given to ``evaluate`` replacing its values; the budget and the batch size checked."""
    given = {k: v for k, v in overrides.items() if v is not _KEEP}
    if decoding is not None and not isinstance(decoding, Decoding):
        raise UsageError(f"evaluate: decoding must be a focuslens Decoding(...) bundle, got {type(decoding).__name__}; "
                        "or pass its fields as keywords (max_new_tokens=16).")
    dec = (decoding if decoding is not None else Decoding()).replace(**given)
    variant = normalise_variant(dec.variant)
    check_count(batch_size, name="batch_size", what="evaluate")
    return dec, variant


def _run_config(model: HookedModel, dec: Decoding, variant: str, intervene_cfg: Any, tag: Any) -> dict[str, Any]:
    """What the records depend on (its hash keys the records file)."""
    info = model_info(model)
    return {
        "format": RECORD_FORMAT_VERSION,
        "model": info.name,
        "model_fingerprint": info.fingerprint(),
        "model_weights": weights_digest(model),
        "variant": variant,
        "max_new_tokens": dec.max_new_tokens,
        "chat": dec.chat,
        "system": dec.system,
        "gold_position": dec.gold_position,
        "stop_at_newline": dec.stop_at_newline,
        "intervene": intervene_cfg,
        "tag": tag,
    }


class _EvalRun:
    """One :func:`evaluate` call: renders and resumes the examples, decodes the rest in batches under
    the intervention, and appends each record to the file as it finishes."""

    def __init__(self, model: HookedModel, intervene: Any, dec: Decoding, variant: str, h: str, *,
                 path: Path | None, records: RecordsFile | None, fused: FusedModel | None = None):
        self.model, self.intervene, self.dec, self.variant, self.h = model, intervene, dec, variant, h
        self.path, self.records = path, records
        self.done = records.done if records is not None else {}
        self.stops = _stop_ids(model)
        self.t_start = time.perf_counter()
        self.per_example, self.outer = split_intervene(model, intervene)
        # the fused engine (focuslens.engine) attaches the spec itself, per batch, and decodes on SDPA
        self.fused = fused
        if fused is not None:
            self.per_example, self.outer = None, contextlib.nullcontext
        self.slots: list[dict[str, Any] | None] = []
        self.n_resumed = 0

    def run(self, examples: Sequence[TaskExample | RenderedExample], *, batch_size: int, progress: bool) -> None:
        """Every example's record into ``self.slots``; the bar is closed also after an exception."""
        # A spec that needs the example attaches per batch (attach_batch: each row its own span or α);
        # a bare per-example callable, or a spec without a batched attach, needs each example alone.
        intervene = self.intervene
        per_batch = (isinstance(intervene, InterventionSpec) and intervene.per_example and intervene.batchable)
        batch = 1 if self.per_example is not None and not per_batch else batch_size
        self.slots = [None] * len(examples)
        from tqdm.auto import tqdm

        self.bar = tqdm(total=len(examples), disable=not progress, desc=f"evaluate ({self.variant})", leave=False)
        try:
            with self.outer():
                pending: list[tuple[int, RenderedExample, str]] = []
                for i, ex in enumerate(examples):
                    item = self._resume_or_queue(i, ex)
                    if item is None:
                        continue
                    pending.append(item)
                    if len(pending) >= batch:
                        self._decode(pending)
                        pending = []
                if pending:
                    self._decode(pending)
        finally:
            self.bar.close()

    def _resume_or_queue(self, i: int, ex: TaskExample | RenderedExample) -> tuple[int, RenderedExample, str] | None:
        """Example ``i`` rendered; its resumed record stored (``None`` back), else ``(i, rendered, prompt hash)`` to decode."""
        r = _rendered(self.model, ex, i, self.dec, self.variant)
        key = f"{i}:{r.id}"
        ph = _prompt_hash(r)
        if key in self.done:
            rec = self.done[key]
            if rec.get("prompt_hash") != ph:
                raise ValueError(
                    f"{self.path}: the record for example {key} was made from a different prompt "
                    "(the examples changed). Use another output file, or resume=False."
                )
            self.slots[i] = rec
            self.n_resumed += 1
            self.bar.update(1)
            return None
        n_prompt = len(r.prompt.tokens)
        max_new_tokens = self.dec.max_new_tokens
        check_context(self.model, n_prompt + max_new_tokens,
                      what=f"example {i} ({n_prompt} prompt tokens + max_new_tokens {max_new_tokens})")
        return i, r, ph

    def _decode(self, pending: list[tuple[int, RenderedExample, str]]) -> None:
        """Greedy answers for a batch (under the per-example intervention, if any); their records stored."""
        model, per_example = self.model, self.per_example
        kw = dict(max_new_tokens=self.dec.max_new_tokens, stop_at_newline=self.dec.stop_at_newline,
                  stop_ids=self.stops)
        t0, c0 = time.perf_counter(), time.process_time()
        if self.fused is not None:
            prompts = [r.tokens for _, r, _ in pending]
            with self.fused.attached(self.intervene, [r for _, r, _ in pending], left_pad_offsets(prompts)):
                outs = greedy_generate_batch(model, prompts, forward=self.fused.forward_with_cache, **kw)
        elif per_example is not None and len(pending) == 1:
            (_, r, _), = pending
            with per_example(r):
                outs = [greedy_generate(model, r.tokens, **kw)]
        elif per_example is not None:
            prompts = [r.tokens for _, r, _ in pending]
            with attached_batch(model, self.intervene, [r for _, r, _ in pending], left_pad_offsets(prompts)):
                outs = greedy_generate_batch(model, prompts, **kw)
        else:
            outs = greedy_generate_batch(model, [r.tokens for _, r, _ in pending], **kw)
        # Time is shared equally by the examples of a batch.
        secs = (time.perf_counter() - t0) / len(pending)
        cpu = (time.process_time() - c0) / len(pending)
        for (i, r, ph), (ids, text) in zip(pending, outs):
            rec = _record(i, r, ph, ids, text, h=self.h, secs=secs, cpu=cpu, batch_size=len(pending))
            rec["engine"] = "eager" if self.fused is None else "fused"
            if self.records is not None:
                self.records.append(rec)
            self.slots[i] = rec
            self.bar.update(1)


def _rendered(model: HookedModel, ex: Any, i: int, dec: Decoding, variant: str) -> RenderedExample:
    """``examples[i]`` rendered with the decoding settings (a rendered one is checked to match them)."""
    if isinstance(ex, RenderedExample):
        if ex.variant != variant or ex.prompt.chat != dec.chat:
            raise ValueError(
                f"examples[{i}] was rendered with variant={ex.variant!r}, chat={ex.prompt.chat}, "
                f"but evaluate was called with variant={variant!r}, chat={dec.chat}: pass the "
                "same settings (they are part of the records' configuration)."
            )
        return ex
    if isinstance(ex, TaskExample):
        return render(ex, model, variant=variant, chat=dec.chat, gold_position=dec.gold_position,
                      system=dec.system, index=i)
    raise TypeError(f"examples[{i}] is a {type(ex).__name__}, not a TaskExample or RenderedExample.")


def _record(i: int, r: RenderedExample, ph: str, ids: Any, text: str, *, h: str, secs: float, cpu: float,
            batch_size: int) -> dict[str, Any]:
    """One example's record (the JSONL line): the prediction scored, with its sizes and timing."""
    answers = list(r.answers)
    dist = clean_distractor_answers(r.distractor_answers, answers)
    return {
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
        "batch_size": batch_size,
        "prompt_hash": ph,
    }
