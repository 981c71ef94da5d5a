"""Head finders compared, and every steering method on every finder's heads, in one table (issue #18).

Command (resumable: every finder result, trained direction and evaluated cell is cached under
``experiments/results/compare/`` (tracked in git) by content; rerun the same command to continue where it stopped):

    nice -n 19 python experiments/compare_methods.py --n 24        # SmolLM2, n = 24 per cell
    python experiments/compare_methods.py --report                  # docs table + figure from the cache
    python experiments/compare_methods.py --quick --out /tmp/cmp    # tiny-model smoke run (seconds)

What it does, most important first:

1. **Finders** (``focuslens.heads.finders``) on the same ``--n-find`` synthetic QA examples (10 documents,
   seed 401; patching on the first ``--n-patch``): contextual (gold-answer responses), retrieval
   (teacher-forced needle answer), QRHead (plain gold mass of the question rows), z-patching. Pairwise
   Spearman correlations, top-k overlaps, and ``figures/compare_finders.{png,html}``.
2. **Cells**: rows = (finder, steering method) on that finder's top-k heads (k = 20), plus the
   random-head control (``random_heads(seed=0)``) and the unmodified model; columns = tasks. Methods:
   split softmax (τ = 0.2, oracle span = the gold document), PASTA (coefficient 0.01, oracle span;
   only when ``focuslens.intervene.specs.Pasta`` exists), focus directions (likelihood objective, trained on
   ``--n-train`` (48) examples of seed 301 on that finder's heads, α = 1: the validation-chosen α of
   ``docs/directions.md``, not re-chosen here) and the magnitude-controlled variant (``alpha="auto"``,
   ``per="input"``, target calibrated on 16 unlabelled validation prompts at α = 1). Focus directions
   are trained for the finders in ``--fd-finders`` only (training costs minutes each on CPU).
   Tasks in priority order: synthetic QA 10 docs (seed 403), NQ-open with 5 real Wikipedia passages
   (gold + 4 random, seed 407), gold-only prompts of the synthetic test examples (harm check),
   synthetic QA 20 docs (seed 405), key–value retrieval (10 pairs, 8-character keys, seed 406).
   Greedy decoding with a new-token budget per task (``MAX_NEW``: 20 for the synthetic 10-document and
   gold-only prompts, 40 at 20 documents, 48 for NQ and key–value, whose replies restate the question
   first), best-subspan EM; each cell is Δ accuracy vs unmodified on the same examples, ± paired
   standard error, and records how many replies hit the budget.
3. **Report**: the markdown table between the ``<!-- table -->`` markers of ``docs/comparison.md``
   (the prose around it is kept) and the finder comparison.

``--quick`` runs the same code on the tiny random model of ``focuslens.testing`` with n = 2, k = 3 and
short prompts (NQ passages cut to 30 words), writing everything under ``--out``: a plumbing check, its
numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
NQ_ORACLE = ROOT.parent / "shared" / "data" / "litm" / "nq-open-oracle.jsonl.gz"

import focuslens as fl  # noqa: E402
from focuslens import specs as _specs  # noqa: E402
from focuslens.directions import FocusDirections, calibrate_sink_target, make_direction_examples  # noqa: E402
from focuslens.directions import train_focus_directions  # noqa: E402
from focuslens.evaluation.runner import evaluate  # noqa: E402
from focuslens.heads.finders import compare_finders, find_heads  # noqa: E402
from focuslens.plot.figures import finder_heatmaps  # noqa: E402
from focuslens.core.io import atomic_write, atomic_write_json, content_hash  # noqa: E402
from focuslens.core.models import model_identity  # noqa: E402
from focuslens.plot.figures import save_figure  # noqa: E402
from focuslens.score.ranking import DatasetScores, contextual_heads  # noqa: E402
from focuslens.intervene.span_specs import SplitSoftmax  # noqa: E402
from focuslens.directions.artefact import Steer  # noqa: E402
from focuslens.evaluation.sweeps import examples_identity, random_heads  # noqa: E402
from focuslens.tasks import build_from_oracle, load_litm, make_kv_retrieval, make_synthetic_qa, render  # noqa: E402
from focuslens.tasks.metrics import paired_difference  # noqa: E402

FINDER_ORDER = ("contextual", "retrieval", "qrhead", "patching")
METHODS = {"ss": "split softmax (τ=0.2, oracle span)", "pasta": "PASTA (coef. 0.01, oracle span)",
           "fd": "focus directions (likelihood, α=1)", "auto": "focus directions, magnitude-controlled"}
TASKS = {  # name: (label, description)
    "syn10": ("synthetic 10 docs", "synthetic QA, 10 documents (seed 403)"),
    "nq": ("NQ, real docs", "NQ-open, 5 real Wikipedia passages: gold + 4 random (seed 407)"),
    "gold_only": ("gold-only (harm)", "the synthetic 10-doc test examples with the gold document only"),
    "syn20": ("synthetic 20 docs", "synthetic QA, 20 documents (seed 405)"),
    "kv": ("key–value", "key-value retrieval, 10 pairs, 8-character keys (seed 406)"),
}
TAU, PASTA_COEF, ALPHA = 0.2, 0.01, 1.0
# New-token budget per task: long enough that the reply is not cut before its answer (the replies of
# NQ and key-value restate the question first: at 20 tokens 21-24 of the 24 key-value replies stopped
# before the value). Part of each cell's identity; each cell records how many replies hit the budget.
MAX_NEW = {"syn10": 20, "gold_only": 20, "syn20": 40, "kv": 48, "nq": 48}
MARK_START, MARK_END = "<!-- table:start -->", "<!-- table:end -->"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_json(p: Path):
    return json.loads(p.read_text()) if p.exists() else None


class Run:
    """Settings of one invocation (SmolLM2 or the quick tiny model) and where it caches."""

    def __init__(self, args):
        self.quick = args.quick
        # real runs: tracked in git (small, content-keyed records that a later session resumes); --quick: scratch
        self.out = Path(args.out) if args.out else (ROOT / "runs" / "compare_quick" if args.quick
                                                    else ROOT / "experiments" / "results" / "compare")
        self.n = 2 if args.quick else args.n
        self.n_find = 2 if args.quick else args.n_find
        self.n_patch = 1 if args.quick else args.n_patch
        self.patch_docs = 3 if args.quick else args.patch_docs
        self.k = 3 if args.quick else args.k
        self.n_train, self.n_val, self.n_cal = (2, 1, 1) if args.quick else (args.n_train, 6, 16)
        self.docs = {"syn10": 3, "syn20": 4, "kv": 3, "nq": 2} if args.quick else {"syn10": 10, "syn20": 20, "kv": 10, "nq": 5}
        self.min_gap = 1e-6 if args.quick else 1.0
        self.fd_finders = [f for f in args.fd_finders.split(",") if f]
        self.tasks = [t for t in args.tasks.split(",") if t]
        bad = [t for t in self.tasks if t not in TASKS] + [f for f in self.fd_finders if f not in FINDER_ORDER]
        if bad:
            raise SystemExit(f"unknown tasks/finders {bad}; tasks: {list(TASKS)}, finders: {list(FINDER_ORDER)}")
        self.docs_path = (self.out / "comparison.md") if args.quick else ROOT / "docs" / "comparison.md"
        self.fig_dir = (self.out / "figures") if args.quick else ROOT / "figures"
        self.deadline = args.deadline  # seconds since the epoch, or None

    def model(self):
        if self.quick:
            from focuslens.testing import tiny_model

            return tiny_model("llama")
        return fl.load_model()


# ------------------------------------------------------------------------------------------ data
def task_examples(run: Run, task: str, n: int):
    if task in ("syn10", "gold_only"):
        return make_synthetic_qa(n, n_docs=run.docs["syn10"], seed=403)
    if task == "syn20":
        return make_synthetic_qa(n, n_docs=run.docs["syn20"], seed=405)
    if task == "kv":
        return make_kv_retrieval(n, n_docs=run.docs["kv"], key_length=8, seed=406)
    if task == "nq":
        exs = build_from_oracle(load_litm(NQ_ORACLE), n_docs=run.docs["nq"], distractors="random", n_examples=n,
                                seed=407)
        if run.quick:  # the tiny model's 512-token context: keep 30 words of each passage (plumbing only)
            for e in exs:
                for d in e.ctxs:
                    words = d.text.split()
                    keep = " ".join(words[:30])
                    if any(a in d.text and a not in keep for a in e.answers):
                        keep = " ".join(words[:20]) + " " + e.answers[0]
                    d.text = keep
        return exs
    raise KeyError(task)


def model_id(model) -> str:
    return content_hash(model_identity(model))


# ------------------------------------------------------------------------------------------ finders
def finder_data(run: Run, model, f: str):
    """The finder's examples: synthetic QA seed 401; patching on the first ``n_patch`` with ``patch_docs`` documents."""
    n_docs = run.patch_docs if f == "patching" else run.docs["syn10"]
    exs = make_synthetic_qa(run.n_patch if f == "patching" else run.n_find, n_docs=n_docs, seed=401)
    return [render(e, model, chat=True, index=i) for i, e in enumerate(exs)]


def finder_path(run: Run, model, mid: str, f: str) -> tuple[Path, list, dict]:
    data = finder_data(run, model, f)
    kw = {"min_gap": run.min_gap} if f == "patching" else {}
    key = content_hash({"model": mid, "finder": f, "data": examples_identity(data), "kw": kw, "v": 1})
    return run.out / "finders" / f"{f}-{key}.json", data, kw


def patching_parts(run: Run, model, mid: str, *, compute: bool = True) -> DatasetScores | None:
    """The patching finder one example at a time (each cached: minutes per example on this CPU), merged.

    Returns the mean over the examples finished so far (None if none); skipped examples are recorded.
    """
    data = finder_data(run, model, "patching")
    kw = {"min_gap": run.min_gap}
    means = []
    for r in data:
        key = content_hash({"model": mid, "finder": "patching", "data": examples_identity([r]), "kw": kw, "v": 1})
        p = run.out / "finders" / "patching_parts" / f"{key}.json"
        if not p.exists():
            if not compute:
                continue
            t0 = time.time()
            try:
                ds = find_heads(model, [r], finder="patching", progress=False, **kw)
                ds.save(p)
            except ValueError as e:  # the model does not use the gold value here: skipped
                atomic_write_json(p, {"skipped": str(e)})
            log(f"patching example {r.index}: {time.time() - t0:.0f} s")
        means.append(p)
    return merge_parts(means)


def merge_parts(paths: list[Path]) -> DatasetScores | None:
    """Single-example patching results (skipped ones are ``{"skipped": reason}``) as one DatasetScores."""
    parts = [DatasetScores.load(p) for p in paths if "skipped" not in load_json(p)]
    if not parts:
        return None
    st = torch.stack([d.mean["relevant"] for d in parts])
    n = len(parts)
    se = st.std(0, unbiased=True) / math.sqrt(n) if n > 1 else torch.full_like(st[0], float("nan"))
    return DatasetScores(mean={"relevant": st.mean(0)}, stderr={"relevant": se}, per_example={"relevant": st}, n=n,
                         n_skipped=len(paths) - n, response_mode=parts[0].response_mode, model=parts[0].model,
                         fingerprint=parts[0].fingerprint)


def get_finder(run: Run, model, mid: str, f: str, *, compute: bool = True) -> DatasetScores | None:
    """One finder's result, cached by (model, finder, data, settings); None if not cached and not ``compute``."""
    if f == "patching":
        return patching_parts(run, model, mid, compute=compute)
    p, data, kw = finder_path(run, model, mid, f)
    if p.exists():
        return DatasetScores.load(p)
    if not compute:
        return None
    t0 = time.time()
    # The cached v1 records of the contextual finder were scored with the gold answer appended (its
    # default before focuslens 0.2); "v": 1 in the key stands for that protocol, so it is passed here.
    call_kw = {**kw, "response": "gold"} if f == "contextual" else kw
    ds = find_heads(model, data, finder=f, progress=not run.quick, **call_kw)
    ds.save(p)
    log(f"finder {f}: n={ds.n} (skipped {ds.n_skipped}) in {time.time() - t0:.0f} s; top-5 {ds.top_k(5)}")
    return ds


def finder_report(run: Run, res: dict[str, DatasetScores]) -> str:
    cmp = compare_finders(res, k=run.k)
    names = cmp["names"]
    lines = [f"Spearman rank correlation over all heads (upper) and top-{run.k} overlap (lower), "
             f"n = " + ", ".join(f"{n} {res[n].n}" for n in names) + ":", "",
             "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for i, a in enumerate(names):
        cells = []
        for j, _ in enumerate(names):
            if i == j:
                cells.append("—")
            elif j > i:
                cells.append(f"ρ = {cmp['spearman'][i][j]:+.2f}")
            else:
                cells.append(f"{cmp['overlap'][i][j]} / {run.k}")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    lines += ["", "Top-5 heads: " + "; ".join(f"{n} " + ", ".join(f"L{l}H{h}" for l, h in cmp["top"][n][:5])
                                              for n in names)]
    atomic_write_json(run.out / "finder_comparison.json", cmp, indent=1)
    subt = {n: f"{n} (n={res[n].n})" for n in names}
    fig = finder_heatmaps(res, top_k=run.k, subtitles=subt,
                          title=f"Head finders on {'the tiny model' if run.quick else 'SmolLM2-135M-Instruct'}: "
                                f"[layer, head] scores, top {run.k} marked")
    save_figure(fig, run.fig_dir / "compare_finders")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ directions
def directions_for(run: Run, model, mid: str, finder: str, heads) -> tuple[FocusDirections, float]:
    """Likelihood-objective directions on ``heads`` (cached by content) and their calibrated target."""
    train = make_synthetic_qa(run.n_train, n_docs=run.docs["syn10"], seed=301)
    val = make_synthetic_qa(max(run.n_val, run.n_cal), n_docs=run.docs["syn10"], seed=302)
    key = content_hash({"model": mid, "heads": [list(h) for h in heads], "train": examples_identity(train),
                        "val": examples_identity(val[:run.n_val]), "recipe": "likelihood lr1e-2 ep1 seed0", "v": 1})
    path = run.out / "directions" / f"{finder}-{key}"
    _wait_for_trainer(run, finder, path)
    if (path / "config.json").exists():
        d = FocusDirections.load(path, model=model)
    else:
        log(f"train focus directions on the top-{len(heads)} {finder} heads ({run.n_train} examples)")
        t0 = time.time()
        ckpt = run.out / "ckpt" / f"{finder}-{key}"  # resumes an interrupted training
        lik = lambda exs: make_direction_examples(model, exs, responses=[e.gold.text for e in exs])  # noqa: E731
        d = train_focus_directions(model, lik(train), heads=heads, objective="likelihood",
                                   val_examples=lik(val[:run.n_val]), lr=1e-2, epochs=1, max_norm=None, seed=0,
                                   progress=False, checkpoint_dir=ckpt)
        d.save(path)
        shutil.rmtree(ckpt, ignore_errors=True)  # the saved artefact supersedes it (and is what is tracked)
        log(f"  trained in {time.time() - t0:.0f} s")
    cal_p = path.parent / f"{finder}-{key}-calibration.json"
    cal = load_json(cal_p)
    if cal is None:
        prompts = [render(e, model).prompt.tokens for e in val[:run.n_cal]]
        cal = {"alpha": ALPHA, "n_prompts": len(prompts),
               "target": calibrate_sink_target(model, d, prompts, alpha=ALPHA)}
        atomic_write_json(cal_p, cal)
    return d, float(cal["target"])


def _trainer_marker(run: Run, finder: str) -> Path:
    return run.out / "directions" / f"{finder}.training"


def _wait_for_trainer(run: Run, finder: str, path: Path) -> None:
    """If a ``--directions-only`` process is training these directions, wait for it instead of training twice."""
    marker = _trainer_marker(run, finder)
    while marker.exists() and not (path / "config.json").exists():
        try:
            pid = int(marker.read_text().strip())
            if pid == os.getpid():
                return
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError, PermissionError):
            return  # no such trainer (any more): train here
        raise Busy(f"process {pid} is training the {finder} directions")


class Busy(Exception):
    """A cell's inputs are being made by another worker: skip it for now (the loop comes back once)."""


# ------------------------------------------------------------------------------------------ rows
def pasta_available() -> bool:
    return hasattr(_specs, "Pasta")


def waves(run: Run, model, mid: str, finders: dict[str, DatasetScores]) -> list[list[tuple[str, str, Callable]]]:
    """Rows ``(finder, method, spec factory)`` in waves of priority; each wave runs over all tasks before
    the next. A factory returns None for 'unmodified'; finders (and directions) are computed on first use."""
    rnd = random_heads(model, run.k, seed=0)
    dcache: dict[str, tuple] = {}

    def top(f):
        if f == "random":
            return rnd
        if f not in finders:
            finders[f] = get_finder(run, model, mid, f)
        return contextual_heads(finders[f], run.k)

    def fd(f):
        if f not in dcache:
            dcache[f] = directions_for(run, model, mid, f, top(f))
        return dcache[f]

    def ss(f):
        return (f, "ss", lambda: SplitSoftmax(top(f), tau=TAU))

    def pasta(f):
        return (f, "pasta", lambda: _specs.Pasta(top(f), coefficient=PASTA_COEF, span="relevant"))

    def steer(f):
        return [(f, "fd", lambda: Steer(fd(f)[0], alpha=ALPHA)),
                (f, "auto", lambda: Steer(fd(f)[0], alpha="auto", target=fd(f)[1], per="input"))]

    first = run.fd_finders[:1]
    w1 = [("—", "unmodified", lambda: None)]
    for f in first:
        w1 += [ss(f), pasta(f)]
    w1 += [ss("random"), pasta("random")]
    for f in first:
        w1 += steer(f)
    others = [f for f in FINDER_ORDER if f not in first]
    w2 = [ss(f) for f in others] + [pasta(f) for f in others]
    w3 = [r for f in run.fd_finders[1:] for r in steer(f)]
    return [w for w in (w1, w2, w3) if w]


def phases(run: Run, ws: list[list]) -> list[tuple[list[str], list]]:
    """``(tasks, rows)`` in the order run: the main rows on the three key tasks first (synthetic 10
    docs, NQ, gold-only), then the other finders on synthetic 10 docs, then the rest."""
    key = [t for t in ("syn10", "nq", "gold_only") if t in run.tasks]
    rest = [t for t in run.tasks if t not in key]
    out = [(key, ws[0])]
    if len(ws) > 1:
        out.append(([t for t in key if t == "syn10"], ws[1]))
    out.append((rest, ws[0]))
    if len(ws) > 1:
        out.append(([t for t in run.tasks if t != "syn10"], ws[1]))
    for w in ws[2:]:
        out.append((list(run.tasks), w))
    return [(ts, w) for ts, w in out if ts]


# ------------------------------------------------------------------------------------------ cells
def cell_path(run: Run, task: str, finder: str, method: str) -> Path:
    return run.out / "cells" / task / f"{finder.strip('—') or 'none'}-{method}.json"


def run_cell(run: Run, model, task: str, finder: str, method: str, factory, exs, data_id: str) -> dict | None:
    if method == "pasta" and not pasta_available():
        return None
    p = cell_path(run, task, finder, method)
    try:
        spec = factory()
    except Busy as e:
        log(f"{task} {finder} {method}: skipped for now ({e})")
        return None
    sid = spec.id if spec is not None else "none"
    mid = model_id(model)  # a cell of another model (or of an older model identity) is recomputed, never reused
    old = load_json(p)
    if (old and old.get("spec") == sid and old.get("data") == data_id and old.get("n") == len(exs)
            and old.get("max_new_tokens") == MAX_NEW[task] and old.get("model") == mid):
        return old
    lock = p.with_suffix(".lock")
    if not _take_lock(lock):
        log(f"{task} {finder} {method}: another worker is on it, skipped here")
        return None
    try:
        return _evaluate_cell(run, model, task, finder, method, spec, sid, exs, data_id, p, mid)
    finally:
        lock.unlink(missing_ok=True)


def _take_lock(lock: Path) -> bool:
    """One worker per cell: a lock file holding the worker's pid (a dead worker's lock is taken over)."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            pid = int(lock.read_text().strip() or 0)
            if pid and pid != os.getpid():
                os.kill(pid, 0)
                return False
        except (ValueError, ProcessLookupError, FileNotFoundError):
            pass
        lock.write_text(str(os.getpid()))
        return True
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


def _evaluate_cell(run: Run, model, task, finder, method, spec, sid, exs, data_id, p: Path, mid: str) -> dict:
    variant = "gold_only" if task == "gold_only" else "original"
    t0 = time.time()
    budget = MAX_NEW[task]
    res = evaluate(model, exs, variant=variant, max_new_tokens=budget, intervene=spec, progress=False,
                   output=run.out / "evals" / task / f"{finder.strip('—') or 'none'}-{method}-{sid}-{data_id}-t{budget}-m{mid[:8]}.jsonl",
                   tag={"task": task, "data": data_id})
    s = res.summary()
    cell = {"task": task, "finder": finder, "method": method, "spec": sid, "data": data_id, "model": mid, "n": s["n"],
            "max_new_tokens": budget, "capped": sum(r["n_new_tokens"] >= budget for r in res.records),
            "acc": s["accuracy"], "se": s["accuracy_se"], "copy": s["distractor_copy"],
            "em": [r["em"] for r in res.records], "seconds": round(time.time() - t0, 1)}
    atomic_write_json(p, cell, indent=1)
    log(f"{task:9s} {finder:10s} {method:10s} n={cell['n']} acc {cell['acc']:.3f} ± {cell['se']:.3f} "
        f"({cell['seconds']:.0f} s)")
    return cell


# ------------------------------------------------------------------------------------------ report
def table(run: Run) -> str:
    cols = list(TASKS)
    base = {t: load_json(cell_path(run, t, "—", "unmodified")) for t in cols}
    head = "| finder | method | " + " | ".join(TASKS[t][0] for t in cols) + " |"
    lines = [head, "|---|---|" + "---|" * len(cols)]
    lines.append("| — | new-token budget | " + " | ".join(str(MAX_NEW[t]) for t in cols) + " |")
    lines.append("| — | unmodified: accuracy | " + " | ".join(
        f"{b['acc']:.3f} ± {b['se']:.3f} (n={b['n']})" if b else "missing" for b in base.values()) + " |")
    keys = [(f, m) for f in ["contextual", "retrieval", "qrhead", "patching", "random"] for m in METHODS
            if m in ("ss", "pasta") or f in run.fd_finders]
    for f, m in keys:
        cells = []
        for t in cols:
            c, b = load_json(cell_path(run, t, f, m)), base[t]
            if c and b:
                d, se, n, *_ = paired_difference(c["em"], b["em"])
                cells.append(f"{d * 100:+.1f} ± {se * 100:.1f} (n={n})")
            else:
                cells.append("missing")
        name = f if f != "random" else "random heads (seed 0)"
        lines.append(f"| {name} | {METHODS[m]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def capped_summary(run: Run) -> str:
    """How often the budget cut a reply, per task: a high count means the column under-states accuracy."""
    parts = []
    for t in TASKS:
        cs = [c for p in sorted((run.out / "cells" / t).glob("*.json")) if (c := load_json(p)) and "capped" in c]
        if cs:
            parts.append(f"{TASKS[t][0]} {sum(c['capped'] for c in cs)} / {sum(c['n'] for c in cs)}")
    return ", ".join(parts) or "none recorded"


def write_docs(run: Run, finder_md: str | None) -> None:
    p = run.docs_path
    cmd = ("python experiments/compare_methods.py --quick --out " + str(run.out)) if run.quick else \
        "nice -n 19 python experiments/compare_methods.py --n " + str(run.n)
    block = [MARK_START, "", f"Command: `{cmd}` (k = {run.k} heads; cells are Δ accuracy in points vs unmodified on "
             "the same examples, ± paired SE; `missing` = not run yet: the command resumes). Replies that hit the "
             f"new-token budget (all cells of a task, summed): {capped_summary(run)}.", "", table(run), ""]
    if finder_md:
        block += ["### Finder agreement", "", finder_md, ""]
    block.append(MARK_END)
    text = p.read_text() if p.exists() else f"# Head finders and steering methods compared\n\n{MARK_START}\n{MARK_END}\n"
    if MARK_START in text and MARK_END in text:
        a, b = text.index(MARK_START), text.index(MARK_END) + len(MARK_END)
        text = text[:a] + "\n".join(block) + text[b:]
    else:
        text = text.rstrip() + "\n\n" + "\n".join(block) + "\n"
    atomic_write(p, text)


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=24, help="examples per cell")
    ap.add_argument("--n-find", type=int, default=32, help="examples per finder")
    ap.add_argument("--n-patch", type=int, default=2, help="examples for the patching finder")
    ap.add_argument("--patch-docs", type=int, default=3, help="documents per patching prompt (cost: heads x passes)")
    ap.add_argument("--n-train", type=int, default=48, help="training examples per set of focus directions")
    ap.add_argument("--directions-only", default=None, choices=FINDER_ORDER,
                    help="train (and calibrate) the focus directions of one finder's heads and exit")
    ap.add_argument("--finder-only", default=None, choices=FINDER_ORDER, help="compute one finder's cache and exit")
    ap.add_argument("--k", type=int, default=20, help="heads per finder")
    ap.add_argument("--fd-finders", default="contextual", help="finders whose heads get focus directions")
    ap.add_argument("--tasks", default=",".join(TASKS), help="tasks, in the order run")
    ap.add_argument("--out", default=None, help="cache folder (default experiments/results/compare, tracked; --quick: runs/compare_quick)")
    ap.add_argument("--only", default=None,
                    help="run only these rows, e.g. 'contextual:fd,contextual:auto' (parallel workers)")
    ap.add_argument("--quick", action="store_true", help="tiny-model smoke run")
    ap.add_argument("--report", action="store_true", help="only rewrite the docs table from the cache")
    ap.add_argument("--deadline", type=float, default=None, help="stop starting new cells after this epoch time")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    run = Run(args)
    run.out.mkdir(parents=True, exist_ok=True)
    if args.report:  # no model: the newest cached result of each finder
        finders = {}
        for f in FINDER_ORDER:
            ps = sorted((run.out / "finders").glob(f"{f}-*.json"), key=lambda q: q.stat().st_mtime)
            if ps:
                finders[f] = DatasetScores.load(ps[-1])
        if (parts := merge_parts(sorted((run.out / "finders" / "patching_parts").glob("*.json")))) is not None:
            finders["patching"] = parts  # every cached patching example (report only: no model to key them)
        write_docs(run, finder_report(run, finders) if len(finders) >= 2 else None)
        return
    model = run.model()
    mid = model_id(model)
    if args.finder_only:
        get_finder(run, model, mid, args.finder_only)
        return
    if args.directions_only:
        f = args.directions_only
        marker = _trainer_marker(run, f)
        atomic_write(marker, str(os.getpid()))
        try:
            directions_for(run, model, mid, f, contextual_heads(get_finder(run, model, mid, f), run.k))
        finally:
            marker.unlink(missing_ok=True)
        return
    finders = {f: get_finder(run, model, mid, f) for f in FINDER_ORDER if f != "patching" or run.quick}

    def report() -> str:
        for f in FINDER_ORDER:  # a finder computed meanwhile by another process (--finder-only)
            if f not in finders and (ds := get_finder(run, model, mid, f, compute=False)) is not None:
                finders[f] = ds
        md = finder_report(run, finders)
        atomic_write(run.out / "finder_comparison.md", md)
        write_docs(run, md)
        return md

    log("finders compared:\n" + report())
    if not pasta_available():
        log("focuslens.intervene.specs.Pasta is not there yet: PASTA cells are left missing (rerun to add them)")
    only = None if args.only is None else set(args.only.split(","))
    data = {}
    plan = phases(run, waves(run, model, mid, finders))
    for tasks, wave in plan + plan:  # a second pass picks up cells skipped while another worker was busy
        for task in tasks:
            if task not in data:
                exs = task_examples(run, task, run.n)
                data[task] = (exs, examples_identity(exs)[:16])
            exs, data_id = data[task]
            for finder, method, factory in wave:
                if only is not None and f"{finder}:{method}" not in only:
                    continue
                if run.deadline is not None and time.time() > run.deadline:
                    log("deadline reached: stopping (rerun the command to resume)")
                    report()
                    return
                run_cell(run, model, task, finder, method, factory, exs, data_id)
            report()
    report()
    log(f"done; table in {run.docs_path}")


if __name__ == "__main__":
    main()
