"""Label-free steering compared: each method beside focus directions, the oracle and random heads (issue #36).

A first sketch of part 3 of the issue, resumable and content-keyed like ``experiments/compare_methods.py``:

    python experiments/real_documents.py --n-docs 10 --kinds random   # the NQ real-document sets (once)
    nice -n 19 python experiments/label_free.py --n 4                 # SmolLM2, n = 4 per cell (plumbing)
    python experiments/label_free.py --n 4 --report                   # the table from the cache only
    python experiments/label_free.py --quick --out /tmp/lf            # tiny random model, seconds
    python experiments/label_free.py --model <hf dir> --device cuda --dtype bfloat16 --n 100   # GPU path

Rows (``ROWS``): the unmodified model; each label-free method of :mod:`focuslens.intervene.label_free` on
the top-``--k`` contextual heads (``figures/contextual_heads.json``, ranked on *synthetic* data, so no
real-document label picks them): positional calibration, sink redistribution, temperature, scalable
softmax, the self-located span (top-1 and top-2 documents, query rows = the question); focus directions
as validation-selected in ``experiments/results/real_directions/`` (attention objective, k = 10,
α = 0.25); the oracle split softmax (τ = 0.2 on the gold document: the ceiling) and split softmax on k
random heads (the control). Columns (``TASKS``): NQ-open with 10 real documents (the held-out test split of
``experiments/real_documents.py``, gold cycling over positions) and synthetic QA with 10 documents
(seed 403, as ``compare_methods.py``).

The label-free hyper-parameters here (``HYPER``) are provisional defaults, not yet chosen on validation;
the full run selects them on the validation split only (issue #36, part 3). For the self-located rows each
cell also records how often the located document is the gold one (``hits``), from the same
:func:`~focuslens.intervene.label_free.locate_span` the spec steers with.

Every cell (row × task) is one ``evaluate`` JSONL plus a small JSON summary under ``--out``, named by a
content hash of the model identity, the data's identity (the set file's sha256, or the synthetic
examples' identity), the spec's identity and the decoding settings: rerunning resumes, a changed setting
never reuses another run's answers. Cells are Δ accuracy vs unmodified on the same examples, ± paired SE.
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

from focuslens.core.io import atomic_write, atomic_write_json, content_hash  # noqa: E402
from focuslens.core.models import load_model, model_identity  # noqa: E402
from focuslens.directions import FocusDirections  # noqa: E402
from focuslens.directions.artefact import Steer  # noqa: E402
from focuslens.evaluation.runner import evaluate  # noqa: E402
from focuslens.evaluation.sweeps import examples_identity, random_heads  # noqa: E402
from focuslens.intervene import (  # noqa: E402
    PositionalCalibration, SelfLocatedSpan, SinkRedistribution, SplitSoftmax, Temperature,
)
from focuslens.score.ranking import load_heads  # noqa: E402
from focuslens.tasks import load_litm, make_synthetic_qa, paired_difference, render  # noqa: E402

OUT = ROOT / "experiments" / "results" / "label_free"
SETS = ROOT / "runs" / "real_documents"
DIRECTIONS = ROOT / "experiments" / "results" / "real_directions" / "directions" / "attention_s0-9ede88255b7b"
DIRECTIONS_K, DIRECTIONS_ALPHA = 10, 0.25  # chosen on validation in experiments/results/real_directions/
TAU = 0.2
HYPER = {"calibration_t": 5e-5, "sink_rho": 0.5, "temperature": 1.5, "ssmax_n0": 512}  # provisional
TASKS = {"nq10": "NQ-open, 10 real documents (test split)", "syn10": "synthetic QA, 10 documents (seed 403)"}
MAX_NEW = {"nq10": 16, "syn10": 20}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_json(p: Path) -> Any:
    return json.loads(p.read_text()) if p.exists() else None


# ------------------------------------------------------------------------------------------ rows
def rows(model, heads, quick: bool) -> dict[str, Callable[[], Any]]:
    """``{row: spec factory}`` in the order run (a factory returns None for the unmodified model)."""

    def directions():
        if quick:
            return None  # the tiny model has no trained directions: the row is skipped
        return Steer(FocusDirections.load(DIRECTIONS, model=model), k=DIRECTIONS_K, alpha=DIRECTIONS_ALPHA)

    return {
        "unmodified": lambda: None,
        "calibration": lambda: PositionalCalibration(heads, temperature=HYPER["calibration_t"]),
        "sink": lambda: SinkRedistribution(heads, rho=HYPER["sink_rho"]),
        "temperature": lambda: Temperature(heads, factor=HYPER["temperature"]),
        "ssmax": lambda: Temperature(heads, factor=1.0 / math.log(HYPER["ssmax_n0"]), form="log_length"),
        "self_located": lambda: SelfLocatedSpan(SplitSoftmax(heads, TAU)),
        "self_located_top2": lambda: SelfLocatedSpan(SplitSoftmax(heads, TAU), top=2),
        "focus_directions": directions,
        "oracle": lambda: SplitSoftmax(heads, TAU),
        "random_heads": lambda: SplitSoftmax(random_heads(model, len(heads), seed=0), TAU),
    }


# ------------------------------------------------------------------------------------------ data
def task_data(a, task: str) -> tuple[list, dict]:
    """``(examples, identity)`` of a task's first ``a.n`` examples."""
    if task == "syn10":
        exs = make_synthetic_qa(a.n, n_docs=3 if a.quick else 10, seed=403)
        return exs, {"synthetic": examples_identity(exs)}
    if task == "nq10":
        name = "nq-random10-test.jsonl.gz"
        manifest = load_json(a.sets / "manifest.json") or {}
        if name not in manifest.get("files", {}):
            raise SystemExit(f"{a.sets / name} is missing: write the sets first with "
                             "python experiments/real_documents.py --n-docs 10 --kinds random")
        exs = load_litm(a.sets / name)[: a.n]
        if a.quick:  # the tiny model's 512-token context: 3 documents of 8 words (plumbing only)
            for e in exs:
                keep = [e.ctxs[e.gold_index]] + [d for i, d in enumerate(e.ctxs) if i != e.gold_index][:2]
                for d in keep:
                    d.title = d.title[:12]
                    d.text = " ".join(d.text.split()[:8]) + (f" {e.answers[0]}" if d is keep[0] else "")
                e.ctxs[:] = keep
                e.gold_index = 0
        return exs, {"file": name, "sha256": manifest["files"][name]["sha256"], "quick": a.quick}
    raise KeyError(task)


# ------------------------------------------------------------------------------------------ cells
def run_cell(a, model, mid: dict, task: str, row: str, spec, exs: list, data: dict) -> dict:
    key = content_hash({"model": mid, "data": data, "spec": None if spec is None else spec.identity,
                        "max_new_tokens": MAX_NEW[task], "v": 1})[:12]
    p = a.out / "cells" / task / f"{row}-{key}.json"
    if (old := load_json(p)) is not None and old.get("n") == len(exs):
        return old
    t0 = time.time()
    res = evaluate(model, exs, intervene=spec, max_new_tokens=MAX_NEW[task], progress=False, tag=data,
                   batch_size=a.batch_size, output=a.out / "evals" / task / f"{row}-{key}.jsonl")
    s = res.summary()
    cell = {"task": task, "row": row, "spec": None if spec is None else spec.id, "n": s["n"],
            "acc": s["accuracy"], "se": s["accuracy_se"], "em": [r["em"] for r in res.records],
            "seconds": round(time.time() - t0, 1)}
    if isinstance(spec, SelfLocatedSpan):  # how often the guess is the gold document (same code as the steering)
        rs = [render(e, model, chat=True, index=i) for i, e in enumerate(exs)]
        cell["hits"] = [spec.locate(model, r).hit(r.gold_position) for r in rs]
    atomic_write_json(p, cell, indent=1)
    extra = f", located = gold {sum(cell['hits'])}/{len(cell['hits'])}" if "hits" in cell else ""
    log(f"{task:6s} {row:18s} n={cell['n']} acc {cell['acc']:.3f} ± {cell['se']:.3f} ({cell['seconds']:.0f} s{extra})")
    return cell


def table(cells: dict[tuple[str, str], dict], row_names: list[str], a) -> str:
    lines = ["| row | " + " | ".join(TASKS[t] for t in a.tasks) + " |", "|---|" + "---|" * len(a.tasks)]
    for row in row_names:
        out = []
        for t in a.tasks:
            c, b = cells.get((t, row)), cells.get((t, "unmodified"))
            if c is None or b is None:
                out.append("missing")
            elif row == "unmodified":
                out.append(f"acc {c['acc']:.3f} ± {c['se']:.3f} (n={c['n']})")
            else:
                d, se, n, *_ = paired_difference(c["em"], b["em"])
                hit = f"; gold located {sum(c['hits'])}/{len(c['hits'])}" if "hits" in c else ""
                out.append(f"{d * 100:+.1f} ± {se * 100:.1f} (n={n}{hit})")
        lines.append(f"| {row} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=4, help="examples per cell")
    ap.add_argument("--k", type=int, default=20, help="top contextual heads the methods act on")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--rows", nargs="+", default=None, help="a subset of the rows (default: all)")
    ap.add_argument("--model", default=None, help="a local model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sets", type=Path, default=SETS, help="folder written by experiments/real_documents.py")
    ap.add_argument("--out", type=Path, default=None, help=f"cache folder (default {OUT.relative_to(ROOT)})")
    ap.add_argument("--quick", action="store_true", help="tiny random model, 3 short documents: plumbing only")
    ap.add_argument("--report", action="store_true", help="no generation: the table from the cached cells")
    a = ap.parse_args(argv)
    a.out = a.out or (ROOT / "runs" / "label_free_quick" if a.quick else OUT)
    torch.set_num_threads(a.threads)
    t_start = time.time()
    if a.quick:
        from focuslens.testing import tiny_model

        model = tiny_model("llama")
        heads = random_heads(model, 3, seed=1)  # stands in for the contextual ranking (plumbing only)
    else:
        model = load_model(a.model, device=a.device, dtype=getattr(torch, a.dtype), verbose=False)
        heads = load_heads(ROOT / "figures" / "contextual_heads.json", k=a.k, model=model)
    mid = model_identity(model)
    factories = rows(model, heads, a.quick)
    names = [r for r in factories if a.rows is None or r in a.rows or r == "unmodified"]
    cells: dict[tuple[str, str], dict] = {}
    for task in a.tasks:
        exs, data = task_data(a, task)
        for row in names:
            spec = factories[row]()
            if spec is None and row != "unmodified":
                log(f"{task} {row}: skipped (not available here)")
                continue
            if a.report:
                key = content_hash({"model": mid, "data": data, "spec": None if spec is None else spec.identity,
                                    "max_new_tokens": MAX_NEW[task], "v": 1})[:12]
                c = load_json(a.out / "cells" / task / f"{row}-{key}.json")
            else:
                c = run_cell(a, model, mid, task, row, spec, exs, data)
            if c is not None:
                cells[(task, row)] = c
    cmd = " ".join(x for x in (argv if argv is not None else sys.argv[1:]) if x != "--report")
    md = (f"Command: `python experiments/label_free.py {cmd}` "
          f"(k = {len(heads)} heads; Δ accuracy in points vs unmodified, ± paired SE; hyper-parameters "
          f"{HYPER}, τ = {TAU}: provisional, not selected on validation)\n\n" + table(cells, names, a) + "\n")
    atomic_write(a.out / "report.md", md)
    print(md)
    log(f"wall time {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
