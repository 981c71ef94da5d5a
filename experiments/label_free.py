"""Label-free steering compared: each method beside focus directions, the oracle and random heads (issue #36).

One command, resumable and content-keyed like ``experiments/compare_methods.py`` (every cell, selection and
measurement is cached under ``--out`` by a hash of the model identity, the data, the spec and the decoding
settings; rerun to continue, a changed setting never reuses another run's answers):

    python experiments/real_documents.py --n-docs 10 --kinds random    # the NQ real-document sets (once)
    nice -n 19 python experiments/label_free.py                         # SmolLM2: every stage, in order
    python experiments/label_free.py --report                           # docs table + figure from the cache
    python experiments/label_free.py --quick --out /tmp/lf              # tiny random model, seconds (plumbing)

The GPU path for the paper's 3B-8B models (rank that model's heads first: the default ranking and focus
directions are SmolLM2's; the directions row is skipped when none are given for the model):

    focuslens score --model <hf dir> --device cuda --dtype bfloat16 --n 100 --output runs/heads-<name>
    python experiments/label_free.py --model <hf dir> --device cuda --dtype bfloat16 --batch-size 16 \
        --heads runs/heads-<name>/contextual_heads.json [--directions <FocusDirections folder>] --out runs/label_free-<name>

Stages (``--stages``, in this order; each reads what the earlier ones wrote):

1. ``select``: each label-free method's hyper-parameters on the NQ **validation** split (``--n-val``
   questions, 10 real documents): a small grid per method (``GRIDS``), the best paired Δ accuracy vs the
   unmodified model wins (ties: the earlier, milder setting). The self-located span's locator (query rows ×
   dummy baseline) is chosen by how often it picks the gold document on validation, then top-1 vs top-2 by
   accuracy. Nothing is chosen on the test split.
2. ``test``: every row on the NQ **test** split, 10 real documents (``--n`` questions, gold cycling over the
   positions): unmodified; each label-free method at its selected setting; focus directions (α and k chosen
   on validation in ``experiments/results/real_directions/``; fixed α, and the magnitude-controlled
   ``alpha="auto"``); split softmax on the gold document (the oracle: the ceiling) and on random heads
   (the control). The self-located rows also record, per test question, whether the guess was the gold.
3. ``gold_only``: the same rows on the gold-only prompts of the same test questions (harm check).
4. ``attention``: where each row moves the heads' attention (the top-k heads' mean mass from the rows
   of the answer each condition gave, on the gold document / the sink / the distractors), on the first
   ``--n-att`` test questions, measured on the fused engine with the spec attached.
5. ``positions``: the lost-in-the-middle curve: the first ``--n-pos`` test questions with the gold at each
   of the 10 positions, for ``--pos-rows``.
6. ``syn10``: synthetic QA with 10 documents (seed 403), ``--n-syn`` examples, every row.
7. ``ruler``: the RULER tasks of ``focuslens.tasks.ruler`` (multi-key and multi-value needles, variable
   tracking, HotpotQA; ``--n-ruler`` examples each at ~``--ruler-length`` tokens, seed 409), every row;
   split softmax rows on every gold document of the example (span rule ``"support"``).

Beside the selected rows, ``self_located_top2`` is the self-located span with the validation's runner-up
``top=2`` (not chosen: an analysis row, run where an example has several gold documents; ``--rows``).

Heads: the top ``--k`` contextual heads of ``figures/contextual_heads.json``, ranked on *synthetic* data
only (no real-document label picks them). Cells are Δ accuracy vs unmodified on the same examples, ± paired
SE (``paired_difference``); greedy decoding, 16 new tokens for NQ (as ``experiments/real_distraction.py``),
20 for synthetic QA; best-subspan EM.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from focuslens.core.errors import OutputBusy  # noqa: E402
from focuslens.core.io import atomic_write, atomic_write_json, content_hash  # noqa: E402
from focuslens.core.models import load_model, model_identity  # noqa: E402
from focuslens.directions import FocusDirections, calibrate_sink_target  # noqa: E402
from focuslens.directions.artefact import Steer  # noqa: E402
from focuslens.engine import engine_for  # noqa: E402
from focuslens.evaluation.runner import evaluate  # noqa: E402
from focuslens.evaluation.sweeps import examples_identity, random_heads  # noqa: E402
from focuslens.intervene import (  # noqa: E402
    PositionalCalibration, SelfLocatedSpan, SinkRedistribution, SplitSoftmax, Temperature,
)
from focuslens.intervene.label_free import locate_span  # noqa: E402
from focuslens.score.ranking import load_heads  # noqa: E402
from focuslens.tasks import load_litm, make_synthetic_qa, paired_difference, render  # noqa: E402
from focuslens.tasks.metrics import accuracy_by_position, mean_se  # noqa: E402

OUT = ROOT / "experiments" / "results" / "label_free"
SETS = ROOT / "runs" / "real_documents"
DIRECTIONS = ROOT / "experiments" / "results" / "real_directions" / "directions" / "attention_s0-9ede88255b7b"
DIRECTIONS_K, DIRECTIONS_ALPHA = 10, 0.25  # chosen on validation in experiments/results/real_directions/
N_CAL = 16  # unlabelled validation prompts calibrating the magnitude control's sink target
TAU = 0.2
RULER = {"niah_mk": ("make_niah_multikey", "RULER multi-key needles"),
         "niah_mv": ("make_niah_multivalue", "RULER multi-value needles"),
         "vt": ("make_variable_tracking", "RULER variable tracking"),
         "hotpotqa": ("make_hotpotqa", "RULER HotpotQA")}
MAX_NEW = {"nq10": 16, "nq10val": 16, "gold_only": 16, "positions": 16, "syn10": 20, **{t: 16 for t in RULER}}
TASKS = {"nq10": "NQ-open, 10 real documents (test)", "gold_only": "gold-only prompts (harm)",
         "syn10": "synthetic QA, 10 documents", **{t: d for t, (_, d) in RULER.items()}}
STAGES = ("select", "test", "gold_only", "attention", "positions", "syn10", "ruler")

# Validation grids, mildest first (ties go to the earlier setting). Calibration t: the per-token relevance
# of a 1.4k-token prompt spreads over ~3e-4 between documents (SmolLM2), so t = 5e-5 is nearly one-hot and
# 1e-3 mild. Temperature: inverse temperature on the logits. SSMax: factor = 1 / log n0 (rows of n0 keys
# unchanged, a 1.4k-token row sharpened by log 1400 / log n0: 1.04 / 1.30 / 1.74).
GRIDS: dict[str, list[dict]] = {
    "calibration": [{"t": 1e-3}, {"t": 2e-4}, {"t": 5e-5}],
    "sink": [{"rho": 0.25}, {"rho": 0.5}, {"rho": 0.9}],
    "temperature": [{"factor": 1.25}, {"factor": 1.5}, {"factor": 2.0}],
    "ssmax": [{"n0": 1024}, {"n0": 256}, {"n0": 64}],
    "self_located": [{"top": 1}, {"top": 2}],
}
LOCATORS = [{"query": "question", "baseline": "none"}, {"query": "question", "baseline": "dummy"},
            {"query": "last", "baseline": "none"}]
LABEL_FREE = tuple(GRIDS)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_json(p: Path) -> Any:
    return json.loads(p.read_text()) if p.exists() else None


# ------------------------------------------------------------------------------------------ specs
def label_free_spec(method: str, setting: dict, heads, locator: dict | None = None):
    """The spec of a label-free ``method`` at one grid ``setting`` (the locator for the self-located span)."""
    if method == "calibration":
        return PositionalCalibration(heads, temperature=setting["t"])
    if method == "sink":
        return SinkRedistribution(heads, rho=setting["rho"])
    if method == "temperature":
        return Temperature(heads, factor=setting["factor"])
    if method == "ssmax":
        return Temperature(heads, factor=1.0 / math.log(setting["n0"]), form="log_length")
    if method == "self_located":
        loc = locator or LOCATORS[0]
        return SelfLocatedSpan(SplitSoftmax(heads, TAU), top=setting["top"], query=loc["query"],
                               baseline=loc["baseline"])
    raise KeyError(method)


def rows(a, model, heads, selection: dict) -> dict[str, Callable[[], Any]]:
    """``{row: spec factory}`` of the comparison, in order (None: the unmodified model; a factory that
    raises ``LookupError`` marks a row not available here)."""

    def directions(auto: bool):
        def make():
            if a.quick or a.directions is None:
                raise LookupError("no focus directions for this model (--directions)")
            try:
                d = FocusDirections.load(a.directions, model=model)
            except ValueError as e:  # trained for another model: refused by its recorded identity
                raise LookupError(str(e).splitlines()[0]) from e
            if not auto:
                return Steer(d, k=DIRECTIONS_K, alpha=DIRECTIONS_ALPHA)
            return Steer(d, k=DIRECTIONS_K, alpha="auto", target=sink_target(a, model, d), per="input")
        return make

    def chosen(method: str):
        def make():
            sel = selection.get(method)
            if sel is None:
                raise LookupError(f"{method}: not selected yet (run the select stage)")
            return label_free_spec(method, sel["setting"], heads, sel.get("locator"))
        return make

    def top2():  # not a selection: the runner-up top on validation, for tasks with several gold documents
        sel = selection.get("self_located")
        if sel is None:
            raise LookupError("self_located: not selected yet (run the select stage)")
        return label_free_spec("self_located", {**sel["setting"], "top": 2}, heads, sel.get("locator"))

    out: dict[str, Callable[[], Any]] = {"unmodified": lambda: None}
    out.update({m: chosen(m) for m in LABEL_FREE})
    out["self_located_top2"] = top2
    out.update({
        "focus_directions": directions(False),
        "focus_directions_auto": directions(True),
        "oracle": lambda: SplitSoftmax(heads, TAU),
        "random_heads": lambda: SplitSoftmax(random_heads(model, len(heads), seed=0), TAU),
    })
    return out


def sink_target(a, model, d: FocusDirections) -> float:
    """The magnitude control's sink target: the validated fixed α's mean sink-mass drop on ``N_CAL``
    unlabelled validation prompts (cached by content)."""
    exs = nq_split(a, "validation")[0][:N_CAL]
    key = content_hash({"model": a.mid, "directions": d.payload_checksum(), "k": DIRECTIONS_K,
                        "alpha": DIRECTIONS_ALPHA, "prompts": examples_identity(exs)})[:12]
    p = a.out / f"sink_target-{key}.json"
    if (old := load_json(p)) is not None:
        return float(old["target"])
    target = calibrate_sink_target(model, d.top(DIRECTIONS_K), [render(e, model, chat=True).prompt.tokens for e in exs],
                                   alpha=DIRECTIONS_ALPHA)
    atomic_write_json(p, {"target": target, "n_prompts": len(exs), "alpha": DIRECTIONS_ALPHA, "k": DIRECTIONS_K})
    return target


# ------------------------------------------------------------------------------------------ data
def nq_split(a, split: str, *, every: bool = False) -> tuple[list, dict]:
    """``(examples, identity)`` of an NQ real-document split written by ``experiments/real_documents.py``."""
    name = f"nq-random{a.n_docs}-{split}" + ("-every" if every else "") + ".jsonl.gz"
    manifest = load_json(a.sets / "manifest.json") or {}
    if name not in manifest.get("files", {}):
        raise SystemExit(f"{a.sets / name} is missing: write the sets first with "
                         f"python experiments/real_documents.py --n-docs {a.n_docs} --kinds random")
    exs = load_litm(a.sets / name)
    if a.quick:  # the tiny model's 512-token context: 3 documents of 8 words (plumbing only)
        for e in exs[:64]:
            keep = [e.ctxs[e.gold_index]] + [d for i, d in enumerate(e.ctxs) if i != e.gold_index][:2]
            for d in keep:
                d.title = d.title[:12]
                d.text = " ".join(d.text.split()[:8]) + (f" {e.answers[0]}" if d is keep[0] else "")
            e.ctxs[:] = keep
            e.gold_index = 0
        exs = exs[:64]
    return exs, {"file": name, "sha256": manifest["files"][name]["sha256"], "quick": a.quick}


def task_data(a, task: str, n: int) -> tuple[list, dict, str]:
    """``(examples, identity, variant)`` of a task's first ``n`` examples (built once per run)."""
    key = (task, n)
    if key not in a.data_cache:
        a.data_cache[key] = _task_data(a, task, n)
    return a.data_cache[key]


def _task_data(a, task: str, n: int) -> tuple[list, dict, str]:
    if task == "syn10":
        exs = make_synthetic_qa(n, n_docs=3 if a.quick else 10, seed=403)
        return exs, {"synthetic": examples_identity(exs)}, "original"
    if task in ("nq10", "gold_only"):
        exs, data = nq_split(a, "test")
        if task == "gold_only":
            data = {**data, "variant": "gold_only"}
        return exs[:n], data, "gold_only" if task == "gold_only" else "original"
    if task == "nq10val":
        exs, data = nq_split(a, "validation")
        return exs[:n], data, "original"
    if task in RULER:  # ~--ruler-length tokens (focuslens.tasks.ruler; the package's SQuAD is never read)
        import focuslens.tasks as T

        length = 448 if a.quick else a.ruler_length  # the tiny model's 512-token context (plumbing only)
        kw = {"doc_tokens": 32} if a.quick and task.startswith("niah") else {}
        exs = getattr(T, RULER[task][0])(n, a.tokenizer, length=length, seed=409, **kw)
        return exs, {"ruler": task, "length": length, "seed": 409, "examples": examples_identity(exs)}, "original"
    if task == "positions":  # question-major: the first n questions, each with the gold at every position
        exs, data = nq_split(a, "test", every=True)
        n_docs = len(exs[0].ctxs)
        return exs[: n * n_docs], data, "original"
    raise KeyError(task)


# ------------------------------------------------------------------------------------------ cells
def cell_key(a, task: str, spec, data: dict) -> str:
    return content_hash({"model": a.mid, "data": data, "spec": None if spec is None else spec.identity,
                         "max_new_tokens": MAX_NEW[task], "v": 1})[:12]


def run_cell(a, model, task: str, row: str, spec, n: int, *, read_only: bool = False) -> dict | None:
    """Evaluate ``spec`` on the task's first ``n`` examples (resuming), or read the cached cell."""
    exs, data, variant = task_data(a, task, n)
    key = cell_key(a, task, spec, data)
    p = a.out / "cells" / task / f"{row}-{key}.json"
    old = load_json(p)
    if old is not None and old.get("n") == len(exs) and "predictions" in old:
        return old
    if read_only:
        return old if old is not None and old.get("n") == len(exs) else None
    t0 = time.time()
    try:
        res = evaluate(model, exs, intervene=spec, max_new_tokens=MAX_NEW[task], progress=a.progress, tag=data,
                       batch_size=a.batch_size, variant=variant,
                       output=a.out / "evals" / task / f"{row}-{key}.jsonl")
    except OutputBusy as e:  # a parallel worker is computing this cell: leave it to that one
        log(f"{task} {row}: skipped here ({e})")
        return None
    s = res.summary()
    cell = {"task": task, "row": row, "spec": None if spec is None else spec.id, "setting": repr(spec),
            "n": s["n"], "acc": s["accuracy"], "se": s["accuracy_se"], "em": [float(r["em"]) for r in res.records],
            "predictions": list(res.predictions),
            "gold_position": [r.get("gold_position") for r in res.records], "seconds": round(time.time() - t0, 1)}
    atomic_write_json(p, cell, indent=1)
    log(f"{task:9s} {row:22s} n={cell['n']} acc {cell['acc']:.3f} ± {cell['se']:.3f} ({cell['seconds']:.0f} s)")
    return cell


def delta(c: dict, b: dict) -> Any:
    return paired_difference(c["em"], b["em"])


# ------------------------------------------------------------------------------------------ stage 1: select
def locator_hits(a, model, eng, heads, task: str, n: int, locators: list[dict]) -> dict:
    """Per example and locator: the documents ranked by the heads' attention (cached by content)."""
    exs, data, _ = task_data(a, task, n)
    p = locate_path(a, heads, task, data, locators, len(exs))
    if (old := load_json(p)) is not None or a.read_only:
        return old
    out = {"locators": locators, "gold": [], "support": [],
           "ranking": {json.dumps(l, sort_keys=True): [] for l in locators}}
    t0 = time.time()
    for e in exs:
        r = render(e, model, chat=True)
        out["gold"].append(r.gold_position)
        out["support"].append(r.example.support_indices)  # every gold document (RULER: several)
        for loc in locators:
            got = locate_span(model, r, heads=heads, query=loc["query"], baseline=loc["baseline"], top=1,
                              engine=eng)
            out["ranking"][json.dumps(loc, sort_keys=True)].append(list(got.ranking))
    atomic_write_json(p, out)
    log(f"locate {task} n={len(exs)} {len(locators)} locators ({time.time() - t0:.0f} s)")
    return out


def locate_path(a, heads, task: str, data: dict, locators: list[dict], n: int) -> Path:
    key = content_hash({"model": a.mid, "data": data, "heads": [list(h) for h in heads], "locators": locators,
                        "n": n, "v": 1})[:12]
    return a.out / "locate" / f"{task}-{key}.json"


def gold_sets(loc: dict) -> list[list[int]]:
    """Each example's gold documents (positions): ``support`` where recorded, else the one gold."""
    return loc.get("support") or [[g] for g in loc["gold"]]


def guess_hits(golds: list[list[int]], ranks: list[list[int]], top: int, *, every: bool = False) -> list[bool]:
    """Per example: is a gold document among the ``top`` best ranked (``every``: are all ``top`` gold)?"""
    test = all if every else any
    return [test(d in gs for d in rk[:top]) for gs, rk in zip(golds, ranks)]


def hit_rate(loc: dict, top: int = 1) -> dict[str, tuple[float, float]]:
    """``{locator: (rate, se)}``: how often a gold document is among the ``top`` first."""
    return {name: mean_se([float(h) for h in guess_hits(gold_sets(loc), ranks, top)])
            for name, ranks in loc["ranking"].items()}


def select(a, model, eng, heads) -> dict:
    """Each label-free method's setting with the best validation Δ (cached in ``selection-<key>.json``)."""
    key = content_hash({"model": a.mid, "grids": GRIDS, "locators": LOCATORS, "n_val": a.n_val,
                        "heads": [list(h) for h in heads], "tau": TAU, "v": 1})[:12]
    p = a.out / f"selection-{key}.json"
    if (old := load_json(p)) is not None and (a.read_only or all(m in old["methods"] for m in a.methods)):
        return old
    if a.read_only:
        return {"methods": {}, "cells": {}}
    base = run_cell(a, model, "nq10val", "unmodified", None, a.n_val)
    out: dict[str, Any] = {"n_val": a.n_val, "methods": {}, "cells": {}, "unmodified": base["acc"]}
    best_loc = None
    if "self_located" in a.methods:  # the locator: the best gold hit rate on validation (ties: the earlier)
        loc = locator_hits(a, model, eng, heads, "nq10val", a.n_val, LOCATORS)
        rates = hit_rate(loc)
        best_loc = max(LOCATORS, key=lambda l: rates[json.dumps(l, sort_keys=True)][0])
        out["locator_hits"] = {k: list(v) for k, v in rates.items()}
        out["locator_hits_top2"] = {k: list(v) for k, v in hit_rate(loc, 2).items()}
    for method in a.methods:
        best = None
        for setting in GRIDS[method]:
            spec = label_free_spec(method, setting, heads, best_loc)
            c = run_cell(a, model, "nq10val", f"{method}-{content_hash(setting)[:6]}", spec, a.n_val)
            d = delta(c, base)
            out["cells"][f"{method} {json.dumps(setting)}"] = {"acc": c["acc"], "delta": d.mean, "se": d.se,
                                                               "n": d.n, "spec": c["spec"]}
            if best is None or d.mean > best[1] + 1e-12:
                best = (setting, d.mean)
        out["methods"][method] = {"setting": best[0], "val_delta": best[1],
                                  **({"locator": best_loc} if method == "self_located" else {})}
        log(f"selected {method}: {best[0]} (validation Δ {100 * best[1]:+.1f})")
        old = load_json(p) or {}  # after each method; parallel workers (--methods) each add theirs
        out = {**old, **out, "methods": {**old.get("methods", {}), **out["methods"]},
               "cells": {**old.get("cells", {}), **out["cells"]}}
        atomic_write_json(p, out, indent=1)
    return out


# ------------------------------------------------------------------------------------------ stage 4: attention
def attention_cell(a, model, eng, heads, task: str, row: str, spec, cell: dict, n: int) -> dict | None:
    """The heads' mean mass (gold / sink / distractors) from the rows of each answer ``cell`` recorded."""
    exs, data, _ = task_data(a, task, n)
    key = content_hash({"model": a.mid, "data": data, "spec": None if spec is None else spec.identity,
                        "heads": [list(h) for h in heads], "answers": content_hash(cell["predictions"][:n]),
                        "n": len(exs), "v": 1})[:12]
    p = a.out / "attention" / task / f"{row}-{key}.json"
    if (old := load_json(p)) is not None or a.read_only:
        return old
    out = {"row": row, "n": len(exs), "gold": [], "sink": [], "distractors": []}
    t0 = time.time()
    for e, answer in zip(exs, cell["predictions"]):
        r = render(e, model, chat=True)
        pr = r.prompt.with_response(model.tokenizer, answer.strip() or " ")
        with torch.inference_mode(), eng.attached(spec, [r], [0]):
            hs = eng.score_spans(pr.tokens, response=pr.response, spans={"gold": r.relevant},
                                 distractors=r.distractors, sink=1)
        for name, s in (("gold", "gold"), ("sink", "sink"), ("distractors", "distractors_total")):
            out[name].append(float(torch.stack([hs.scores[s][l, h] for l, h in heads]).mean()))
    atomic_write_json(p, out)
    log(f"attention {task} {row} n={len(exs)} ({time.time() - t0:.0f} s)")
    return out


# ------------------------------------------------------------------------------------------ report
def fmt_delta(c: dict | None, b: dict | None, extra: str = "") -> str:
    if c is None or b is None:
        return "—"
    d = delta(c, b)
    return f"{100 * d.mean:+.1f} ± {100 * d.se:.1f} ({d.wins}/{d.losses}{extra})"


def report(a, heads, selection: dict, cells: dict, att: dict, locate_test: list[dict], pos: dict) -> str:
    """The markdown of ``docs/label_free.md``'s results section."""
    cmd = " ".join(["python experiments/label_free.py", *(x for x in a.argv if x != "--report")])
    src = ("random heads (plumbing)" if a.quick else
           f"the top {len(heads)} contextual heads of "
           f"`{a.heads.relative_to(ROOT) if a.heads.is_relative_to(ROOT) else a.heads}` (ranked on synthetic data)")
    L = [f"Model: {a.model_name}; heads: {src}. "
         f"Command: `{cmd}` (cells cached under "
         f"`{a.out.relative_to(ROOT) if a.out.is_relative_to(ROOT) else a.out}`; `--report` rebuilds this from them). "
         "Δ = paired difference in accuracy vs the unmodified model on the same questions, in points, ± paired "
         "SE (wins/losses).", ""]
    # selection
    if selection.get("cells"):
        L += [f"**Selection on validation** (NQ validation split, 10 documents, n = {selection['n_val']}; unmodified "
              f"accuracy {selection['unmodified']:.3f}):", "", "| method | setting | Δ validation |", "|---|---|---|"]
        for k, v in selection["cells"].items():
            m, s = k.split(" ", 1)
            mark = " **(chosen)**" if json.loads(s) == selection["methods"].get(m, {}).get("setting") else ""
            L.append(f"| {m} | {s}{mark} | {100 * v['delta']:+.1f} ± {100 * v['se']:.1f} (n={v['n']}) |")
        L += [""] + (["Locators (which document the top heads attend to most; gold hit rate on validation, top-1 / "
              "top-2): " + "; ".join(f"{k}: {100 * v[0]:.0f}% / {100 * selection['locator_hits_top2'][k][0]:.0f}%"
                                     for k, v in selection["locator_hits"].items()), ""]
                     if "locator_hits" in selection else [])
    # main table
    tasks = [t for t in ("nq10", "gold_only", "syn10", *RULER) if any((t, r) in cells for r in ROW_NAMES)]
    L += ["**Test** (" + "; ".join(f"{TASKS[t]}: n = {cells[(t, 'unmodified')]['n']}, unmodified accuracy "
                                   f"{cells[(t, 'unmodified')]['acc']:.3f}" for t in tasks if (t, "unmodified") in cells)
          + "):", "", "| row | setting | " + " | ".join(TASKS[t] for t in tasks)
          + " | heads' mass Δ: gold / sink / distractors |", "|---|---|" + "---|" * len(tasks) + "---|"]
    base_att = att.get("unmodified")
    for row in ROW_NAMES:
        if not any((t, row) in cells for t in tasks):
            continue
        setting = row_setting(row, selection)
        out = []
        for t in tasks:
            c, b = cells.get((t, row)), cells.get((t, "unmodified"))
            if row == "unmodified":
                out.append(f"acc {c['acc']:.3f} ± {c['se']:.3f}" if c else "—")
            else:
                out.append(fmt_delta(c, b))
        m = att.get(row)
        if m is None or base_att is None:
            mass = "—"
        elif row == "unmodified":
            mass = " / ".join(f"{sum(m[k]) / len(m[k]):.3f}" for k in ("gold", "sink", "distractors")) + " (levels)"
        else:
            parts = []
            for k in ("gold", "sink", "distractors"):
                d = paired_difference(m[k], base_att[k])
                parts.append(f"{d.mean:+.3f}±{d.se:.3f}")
            mass = " / ".join(parts)
        L.append(f"| {row} | {setting if row != 'unmodified' else ''} | " + " | ".join(out) + f" | {mass} |")
    if att:
        n_att = next(iter(att.values()))["n"]
        L += ["", f"Heads' mass: the top-{len(heads)} heads' mean attention from the rows of each answer on the gold "
              f"document / the first token (sink) / the distractors, first n = {n_att} test questions, on the fused "
              "engine with the spec attached; Δ vs unmodified ± paired SE."]
    for g in locate_test:
        L += ["", g["text"]]
    if pos:
        L += ["", pos["text"]]
    return "\n".join(L) + "\n"


def row_setting(row: str, selection: dict) -> str:
    """The row's setting in a few words (the label-free ones: chosen on validation)."""
    sel = selection.get("methods", {}).get(row)
    if sel is not None:
        loc = sel.get("locator")
        return json.dumps(sel["setting"]) + (f", τ = {TAU}, locator {json.dumps(loc)}" if loc else "")
    if row == "self_located_top2" and (sel := selection.get("methods", {}).get("self_located")) is not None:
        return (f"top 2 (not chosen: validation's runner-up, an analysis row for several gold documents), "
                f"τ = {TAU}, locator {json.dumps(sel.get('locator'))}")
    return {"focus_directions": f"k = {DIRECTIONS_K}, α = {DIRECTIONS_ALPHA}",
            "focus_directions_auto": f"k = {DIRECTIONS_K}, α = auto (sink target of α = {DIRECTIONS_ALPHA})",
            "oracle": f"τ = {TAU} on the gold document(s)", "random_heads": f"τ = {TAU}, gold document(s), random heads (seed 0)",
            }.get(row, "")


ROW_NAMES = ["unmodified", *LABEL_FREE, "self_located_top2", "focus_directions", "focus_directions_auto", "oracle", "random_heads"]
ANALYSIS_ROWS = ("self_located_top2",)  # not selected on validation: run only when named (--rows)


def wrong_guess_cost(a, sel: dict, cells: dict, loc: dict, task: str = "nq10") -> dict:
    """How often the self-located span's guess is a gold document on ``task``, and the paired Δ on right vs
    wrong guesses (right: a gold document among the ``top`` chosen)."""
    c, b = cells.get((task, "self_located")), cells.get((task, "unmodified"))
    if c is None or b is None:
        return {}
    name = json.dumps(sel["methods"]["self_located"]["locator"], sort_keys=True)
    top = sel["methods"]["self_located"]["setting"]["top"]
    n = min(c["n"], b["n"], len(loc["gold"]))
    golds = gold_sets(loc)[:n]
    hit = guess_hits(golds, loc["ranking"][name][:n], top)
    parts = []
    for label, want in (("right", True), ("wrong", False)):
        idx = [i for i in range(n) if hit[i] == want]
        if idx:
            d = paired_difference([c["em"][i] for i in idx], [b["em"][i] for i in idx])
            parts.append(f"guess {label} ({len(idx)}/{n}): Δ {100 * d.mean:+.1f} ± {100 * d.se:.1f} "
                         f"({d.wins}/{d.losses})")
    rates = hit_rate({"support": golds, "ranking": {k: v[:n] for k, v in loc["ranking"].items()}})
    n_gold = sum(len(g) for g in golds) / max(n, 1)
    what = "on the test questions" if task == "nq10" else f"on {TASKS[task]}"
    both = ""  # several gold documents: how often the two best documents are both gold (what top=2 edits)
    if any(len(g) > 1 for g in golds):
        two = guess_hits(golds, loc["ranking"][name][:n], 2, every=True)
        both = f" Both of the two best documents gold: {100 * sum(two) / n:.0f}%."
    text = (f"Self-located span {what} (locator {name}, top-{top}; {n_gold:.1f} gold documents per example): "
            + "; ".join(parts) + ". Gold hit rates (top-1): "
            + "; ".join(f"{k}: {100 * v[0]:.0f} ± {100 * v[1]:.0f}%" for k, v in rates.items()) + "." + both)
    return {"text": text, "hit": hit}


def positions_summary(a, cells_pos: dict) -> dict:
    """The accuracy per gold position of each row, and each row's paired Δ vs unmodified: overall and at
    its worst position (the bar: no position made worse), from the same questions at the same positions."""
    if "unmodified" not in cells_pos:
        return {}
    rows_ = list(cells_pos)
    n_docs = 3 if a.quick else a.n_docs
    base = cells_pos["unmodified"]

    def at(c: dict, p: int) -> list[float]:  # the row's answers with the gold at position p, in question order
        return [em for em, g in zip(c["em"], c["gold_position"]) if g == p]

    L = [f"**Lost in the middle** (first {base['n'] // n_docs} test questions, gold at each "
         "position; accuracy per gold position; Δ vs unmodified on the same questions and positions, in "
         "points ± paired SE; worst: the position with the lowest Δ):", "",
         "| row | " + " | ".join(str(p + 1) for p in range(n_docs)) + " | mean | Δ mean | worst position Δ |",
         "|---|" + "---|" * (n_docs + 3)]
    curves = {}
    for row in rows_:
        c = cells_pos[row]
        by = accuracy_by_position({"em": em, "gold_position": g} for em, g in zip(c["em"], c["gold_position"]))
        curve = [by[p]["accuracy"] if p in by else 0.0 for p in range(n_docs)]
        curves[row] = curve
        cols = ["", ""]
        if row != "unmodified" and c["gold_position"] == base["gold_position"]:
            d = paired_difference(c["em"], base["em"])
            ds = [(p, paired_difference(at(c, p), at(base, p))) for p in range(n_docs)]
            p_w, w = min(ds, key=lambda x: (x[1].mean, -x[1].se))
            cols = [f"{100 * d.mean:+.1f} ± {100 * d.se:.1f} ({d.wins}/{d.losses})",
                    f"{100 * w.mean:+.1f} ± {100 * w.se:.1f} (position {p_w + 1})"]
        L.append(f"| {row} | " + " | ".join(f"{x:.2f}" for x in curve) + f" | {c['acc']:.3f} | " + " | ".join(cols) + " |")
    return {"text": "\n".join(L), "curves": curves}


def figure(a, cells: dict, pos: dict) -> None:
    """``figures/label_free.{png,html}``: Δ ± SE per row and task, and the position curves."""
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    from focuslens.plot.figures import save_figure

    tasks = [t for t in ("nq10", "gold_only", "syn10", *RULER) if (t, "unmodified") in cells]
    rows_ = [r for r in ROW_NAMES if r != "unmodified" and any((t, r) in cells for t in tasks)]
    fig = make_subplots(rows=1, cols=2, column_widths=[0.55, 0.45],
                        subplot_titles=("Δ accuracy vs unmodified (points, ± paired SE)",
                                        "lost in the middle: accuracy by gold position"))
    for t in tasks:
        ds = [delta(cells[(t, r)], cells[(t, "unmodified")]) if (t, r) in cells else None for r in rows_]
        fig.add_trace(go.Bar(name=TASKS[t], y=rows_, x=[100 * d.mean if d else None for d in ds], orientation="h",
                             error_x=dict(type="data", array=[100 * d.se if d else 0 for d in ds])), row=1, col=1)
    for row, curve in (pos.get("curves") or {}).items():
        fig.add_trace(go.Scatter(name=f"{row} (positions)", x=list(range(1, len(curve) + 1)), y=curve,
                                 mode="lines+markers", line=dict(dash="dash" if row == "oracle" else "solid",
                                                                 width=4 if row == "oracle" else 2)),
                      row=1, col=2)  # the oracle wide and dashed: a row equal to it stays visible on top
    # one group of bars per row, one bar per task: room for every task's bar and its error bar
    fig.update_layout(barmode="group", height=max(520, 12 * len(rows_) * len(tasks) + 160), width=1250,
                      title=f"Label-free steering, {a.model_name}")
    fig.update_yaxes(autorange="reversed", row=1, col=1)
    fig.update_xaxes(title_text="gold position (of 10)", row=1, col=2)
    # the repository's figures load plotly.js from its CDN, as every figure in figures/ (no 4.8 MB copy)
    save_figure(fig, (a.out / "figures" if a.quick else ROOT / "figures") / "label_free",
                include_plotlyjs="directory" if a.quick else "cdn")


MARK_START, MARK_END = "<!-- label_free results: start -->", "<!-- label_free results: end -->"


def update_docs(path: Path, md: str) -> None:
    """Replace the text between the markers of ``path`` with ``md`` (nothing else changes)."""
    doc = path.read_text()
    if MARK_START not in doc or MARK_END not in doc:
        raise SystemExit(f"{path} has no '{MARK_START}' ... '{MARK_END}' markers: add them where the results go.")
    head, rest = doc.split(MARK_START, 1)
    tail = rest.split(MARK_END, 1)[1]
    atomic_write(path, f"{head}{MARK_START}\n{md}{MARK_END}{tail}")


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--methods", nargs="+", default=list(LABEL_FREE), choices=LABEL_FREE,
                    help="the label-free methods to select (parallel workers can split them)")
    ap.add_argument("--rows", nargs="+", default=None, choices=ROW_NAMES, help="a subset of the rows")
    ap.add_argument("--n", type=int, default=100, help="NQ test questions (10 documents)")
    ap.add_argument("--n-val", type=int, default=40, help="NQ validation questions for the selection")
    ap.add_argument("--n-att", type=int, default=30, help="test questions for the attention measurement")
    ap.add_argument("--n-pos", type=int, default=10, help="test questions per gold position")
    ap.add_argument("--pos-rows", nargs="+", default=["unmodified", "oracle", "self_located", "calibration",
                                                      "sink", "focus_directions"], choices=ROW_NAMES)
    ap.add_argument("--n-syn", type=int, default=40)
    ap.add_argument("--n-ruler", type=int, default=40, help="examples per RULER task")
    ap.add_argument("--ruler-length", type=int, default=1024, help="RULER prompt length in tokens (2048, ...)")
    ap.add_argument("--k", type=int, default=20, help="top contextual heads the methods act on")
    ap.add_argument("--heads", type=Path, default=ROOT / "figures" / "contextual_heads.json",
                    help="the model's head ranking (focuslens score --output ...: contextual_heads.json)")
    ap.add_argument("--directions", type=Path, default=DIRECTIONS,
                    help="FocusDirections folder for the focus-directions rows (default: SmolLM2's, NQ-trained)")
    ap.add_argument("--model", default=None, help="a local model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sets", type=Path, default=SETS, help="folder written by experiments/real_documents.py")
    ap.add_argument("--n-docs", type=int, default=10, help="documents per NQ prompt (the sets' file names)")
    ap.add_argument("--out", type=Path, default=None, help=f"cache folder (default {OUT.relative_to(ROOT)})")
    ap.add_argument("--quick", action="store_true", help="tiny random model, 3 short documents: plumbing only")
    ap.add_argument("--progress", action="store_true", help="a progress bar per cell")
    ap.add_argument("--report", action="store_true", help="no generation: the tables and figure from the cache")
    a = ap.parse_args(argv)
    a.out = (a.out or (ROOT / "runs" / "label_free_quick" if a.quick else OUT)).resolve()
    a.read_only = a.report
    a.data_cache = {}
    a.argv = list(argv if argv is not None else sys.argv[1:])
    if a.quick:
        a.n, a.n_val, a.n_att, a.n_pos, a.n_syn = min(a.n, 4), min(a.n_val, 4), min(a.n_att, 2), min(a.n_pos, 1), min(a.n_syn, 2)
        a.n_ruler = min(a.n_ruler, 2)
    torch.set_num_threads(a.threads)
    t_start = time.time()
    if a.quick:
        from focuslens.testing import tiny_model

        model = tiny_model("llama")
        heads = random_heads(model, 3, seed=1)  # stands in for the contextual ranking (plumbing only)
        a.model_name = "tiny random Llama (plumbing only)"
    else:
        model = load_model(a.model, device=a.device, dtype=getattr(torch, a.dtype), verbose=False)
        heads = load_heads(a.heads, k=a.k, model=model)
        a.model_name = f"{a.model or 'SmolLM2-135M-Instruct'} ({a.dtype}, {a.device})"
    a.mid = model_identity(model)
    a.tokenizer = model.tokenizer
    eng = engine_for(model)
    selection = select(a, model, eng, heads) if ("select" in a.stages or a.report) else {}
    if not selection and not a.report:
        keyed = content_hash({"model": a.mid, "grids": GRIDS, "locators": LOCATORS, "n_val": a.n_val,
                              "heads": [list(h) for h in heads], "tau": TAU, "v": 1})[:12]
        selection = load_json(a.out / f"selection-{keyed}.json") or {}
    factories = rows(a, model, heads, selection.get("methods", {}))
    wanted = a.rows if a.rows is not None else [r for r in ROW_NAMES if a.report or r not in ANALYSIS_ROWS]
    names = [r for r in ROW_NAMES if r == "unmodified" or r in wanted]
    cells: dict[tuple[str, str], dict] = {}
    specs: dict[str, Any] = {}
    for row in names:
        try:
            specs[row] = factories[row]()
        except LookupError as e:
            log(f"{row}: skipped ({e})")
    plan = [("test", "nq10", a.n), ("gold_only", "gold_only", a.n), ("syn10", "syn10", a.n_syn),
            # --quick: HotpotQA's paragraphs do not fit the tiny model's 512-token context
            *(("ruler", t, a.n_ruler) for t in RULER if not (a.quick and t == "hotpotqa"))]
    for stage, task, n in plan:
        if stage not in a.stages and not a.report:
            continue
        for row, spec in specs.items():
            if task in RULER and isinstance(spec, SplitSoftmax):  # multi-gold tasks: every gold document
                spec = SplitSoftmax(spec.heads, spec.tau, span="support")
            c = run_cell(a, model, task, row, spec, n, read_only=a.report or stage not in a.stages)
            if c is not None:
                cells[(task, row)] = c
        if stage in ("test", "syn10", "ruler") and "self_located" in specs and not a.report:
            locator_hits(a, model, eng, heads, task, n, [selection["methods"]["self_located"]["locator"]])
    att: dict[str, dict] = {}
    if "attention" in a.stages or a.report:
        for row, spec in specs.items():
            # not read-only: a cell cached without its answers gets them back from its records (no decoding)
            c = cells.get(("nq10", row)) or run_cell(a, model, "nq10", row, spec, a.n, read_only=a.report)
            if c is not None and c["n"] >= a.n_att:
                m = attention_cell(a, model, eng, heads, "nq10", row, spec, c, a.n_att)
                if m is not None:
                    att[row] = m
    cells_pos: dict[str, dict] = {}
    if "positions" in a.stages or a.report:
        for row in a.pos_rows:
            if row in specs:
                c = run_cell(a, model, "positions", row, specs[row], a.n_pos,
                             read_only=a.report or "positions" not in a.stages)
                if c is not None:
                    cells_pos[row] = c
    loc_test = []  # per task: how often the self-located guess is a gold document, and what a wrong one costs
    if selection.get("methods", {}).get("self_located"):
        for stage, task, n in plan:
            if (task, "self_located") not in cells:
                continue
            exs, data, _ = task_data(a, task, n)
            loc_p = locate_path(a, heads, task, data, [selection["methods"]["self_located"]["locator"]], len(exs))
            if (loc := load_json(loc_p)) is not None and (g := wrong_guess_cost(a, selection, cells, loc, task)):
                loc_test.append(g)
    md = report(a, heads, selection, cells, att, loc_test, positions_summary(a, cells_pos))
    atomic_write(a.out / "report.md", md)
    if not a.quick and a.out == OUT:  # the docs page's results section (the prose around it is kept)
        update_docs(ROOT / "docs" / "label_free.md", md)
    if cells:
        figure(a, cells, positions_summary(a, cells_pos))
    print(md)
    log(f"wall time {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
