"""Focus directions on SmolLM2, done properly: validation-chosen α/k/target, n = 200 test, 3 seeds,
two objectives, every control, and a transfer table (issues #6 and #9).

Command (each stage caches under ``runs/generalisation/`` and resumes per example):

    nice -n 5 python experiments/generalisation.py --stage all      # ≈ 1.5 h on 2 idle CPU cores
    python experiments/generalisation.py --stage report             # tables + figures from the cache

Stages (in order): ``prep`` (head ranking, training targets), ``train`` (likelihood and attention
objectives, seeds 0/1/2, plus likelihood directions on k random heads; and the batched-vs-per-layer
timing), ``val`` (α × k grid and the magnitude-control target on the validation split, seed 0),
``test`` (training template, 10 documents, n = 200), ``transfer`` (unseen templates, 20 documents,
key–value retrieval, NQ documents, gold-only prompts), ``other`` (a second training task — the five other
relation templates — evaluated in every setting: the second row of the transfer matrix), ``report``.

Design (fixed before any test run):
* Task: ``make_synthetic_qa`` (the default synthetic task: "The capital of E is V.", same-relation
  distractors, gold position uniform), 10 documents, chat template. Splits are disjoint by seed:
  train 301, validation 302, test 303.
* Heads: ranked by the contextual score on 40 training examples (full prompt + gold answer sentence).
* Training targets: likelihood objective — the gold answer sentence (METHOD.md §6); attention
  objective — the model's own greedy answer on the gold-only prompt (the paper's data).
* Selection on validation (seed-0 directions, n = 40): per objective the (k, α) with the best
  accuracy (ties → smaller α, then smaller k); the magnitude-control target among 0.25/0.5/0.75 at
  the chosen k. Seeds 1 and 2 reuse seed 0's choice. Nothing is chosen on test.
* Accuracy: greedy decoding, best-subspan EM on the first line (``focuslens.evaluation.runner.evaluate``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch

torch.set_num_threads(int(os.environ.get("FOCUSLENS_THREADS", "2")))

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RUN = ROOT / "runs" / "generalisation"
FIG = ROOT / "figures"
NQ_ORACLE = ROOT.parent / "shared" / "data" / "litm" / "nq-open-oracle.jsonl.gz"

import focuslens as fl  # noqa: E402
from focuslens.directions import (FocusDirections, cache_qk, make_direction_examples,  # noqa: E402
                                  random_like, train_focus_directions)
from focuslens.evaluation.runner import evaluate  # noqa: E402
from focuslens.core.io import atomic_write_json  # noqa: E402
from focuslens.intervene.span_specs import SplitSoftmax  # noqa: E402
from focuslens.directions.artefact import Steer  # noqa: E402
from focuslens.evaluation.sweeps import random_heads  # noqa: E402
from focuslens.tasks import build_from_oracle, load_litm, make_kv_retrieval, make_synthetic_qa, render  # noqa: E402
from focuslens.tasks.metrics import paired_difference  # noqa: E402

N_DOCS = 10
SEEDS = (0, 1, 2)
N_RANK = 40
N_LIK_TRAIN, N_LIK_VAL = 128, 12
N_ATT_TRAIN, N_ATT_VAL = 200, 40
N_VAL = 40
N_TEST = 200
N_TEST_SMALL = 100  # secondary conditions (extra seeds, extra controls) on the first 100 test examples
MAX_NEW = 20
K_GRID = (10, 20)
ALPHA_GRID = {"likelihood": (0.5, 1.0, 2.0), "attention": (0.25, 0.5, 1.0)}
NEG_ALPHA = {"likelihood": -1.0, "attention": -0.5}
TARGETS = (0.25, 0.5, 0.75)
TAU = 0.2
UNSEEN = ["currency", "founder", "river", "language", "mountain"]
TRANSFER = {  # name: (n, description); sizes set by the CPU budget of one session
    "templates": (40, "unseen relation templates (currency, founder, river, language, mountain), 10 docs"),
    "docs20": (24, "training template, 20 documents"),
    "kv": (40, "key-value retrieval, 10 pairs, 8-character keys"),
    "nq": (24, "NQ-open questions, 5 real Wikipedia passages (gold + 4 random)"),
    "gold_only": (60, "training template, gold document only (harm check)"),
}
if os.environ.get("FOCUSLENS_SMOKE"):  # a 2-minute end-to-end check of this script's plumbing
    RUN = ROOT / "runs" / "generalisation_smoke"
    FIG = RUN / "figures"
    N_RANK, N_LIK_TRAIN, N_LIK_VAL, N_ATT_TRAIN, N_ATT_VAL, N_VAL, N_TEST, N_TEST_SMALL = 2, 2, 1, 3, 2, 2, 3, 2
    TRANSFER = {k: (2, v[1]) for k, v in TRANSFER.items()}
    K_GRID, TARGETS, SEEDS = (20,), (0.5,), (0, 1, 2)
    ALPHA_GRID = {"likelihood": (1.0,), "attention": (0.5,)}


# ------------------------------------------------------------------------------------------ data
def split(name: str, n: int, *, n_docs: int = N_DOCS, relation="capital"):
    seed = {"train": 301, "val": 302, "test": 303, "templates": 304, "docs20": 305, "other_train": 311,
            "other_val": 312}[name]
    return make_synthetic_qa(n, n_docs=n_docs, relation=relation, seed=seed)


def transfer_examples(name: str):
    n = TRANSFER[name][0]
    if name == "templates":
        return split("templates", n, relation=UNSEEN)
    if name == "docs20":
        return split("docs20", n, n_docs=20)
    if name == "kv":
        return make_kv_retrieval(n, n_docs=10, key_length=8, seed=306)
    if name == "nq":
        return build_from_oracle(load_litm(NQ_ORACLE), n_docs=5, distractors="random", n_examples=n, seed=307)
    if name == "gold_only":
        return split("test", N_TEST)[:n]
    raise KeyError(name)


def load_json(p: Path):
    return json.loads(p.read_text()) if p.exists() else None


def load_results(setting: str) -> dict:
    """results/<setting>.json merged with results/<setting>_auto.json (written by the auto_input stage)."""
    out = dict(load_json(RUN / "results" / f"{setting}.json") or {})
    out.update(load_json(RUN / "results" / f"{setting}_auto.json") or {})
    return out


def save_json(p: Path, obj) -> None:
    atomic_write_json(p, obj, indent=1)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------ prep
def stage_prep(model) -> dict:
    p = RUN / "prep.json"
    if (d := load_json(p)) is not None:
        return d
    t0 = time.time()
    train = split("train", max(N_LIK_TRAIN, N_ATT_TRAIN))
    lik = make_direction_examples(model, train[:N_RANK], responses=[ex.gold.text for ex in train[:N_RANK]])
    tot = None
    for ex in lik:
        s = fl.contextual_scores(model, ex.prompt.tokens, relevant=ex.relevant, response=ex.prompt.response)
        tot = s if tot is None else tot + s
    scores = tot / len(lik)
    order = torch.argsort(scores.flatten(), descending=True)
    H = model.cfg.n_heads
    heads = [[int(i) // H, int(i) % H] for i in order]
    # gold-only greedy answers (the paper's training response) for the attention objective
    val = split("val", N_VAL)
    resp = {}
    for name, exs in (("train", train[:N_ATT_TRAIN]), ("val", val)):
        res = evaluate(model, exs, variant="gold_only", max_new_tokens=32, progress=False,
                       output=RUN / "evals" / f"gold_only_responses_{name}.jsonl", stop_at_newline=False)
        resp[name] = [r["prediction"] for r in res.records]
    # 20 random heads outside the top 20 (the library's one convention; the pool in rank order)
    rand_heads = [list(h) for h in random_heads(model, 20, seed=0, pool=heads, exclude=heads[:20])]
    d = {"heads": heads, "scores": [round(float(x), 5) for x in scores.flatten()[order]],
         "random_heads": rand_heads, "responses": resp, "seconds": round(time.time() - t0, 1)}
    save_json(p, d)
    log(f"prep done in {d['seconds']} s; top heads {heads[:5]}")
    return d


# ------------------------------------------------------------------------------------------ train
def dir_path(obj: str, seed: int, tag: str = "") -> Path:
    return RUN / "directions" / f"{obj}{tag}_s{seed}"


def lik_examples(model, exs):
    return make_direction_examples(model, exs, responses=[ex.gold.text for ex in exs])


def stage_train(model, prep) -> None:
    heads20 = [tuple(h) for h in prep["heads"][:20]]
    train = split("train", max(N_LIK_TRAIN, N_ATT_TRAIN))
    val = split("val", N_VAL)
    # likelihood objective (through the live frozen model), 3 seeds + random heads (seed 0)
    lik_tr = lik_val = None
    jobs = [(s, heads20, "") for s in SEEDS] + [(0, [tuple(h) for h in prep["random_heads"]], "_randheads")]
    for seed, heads, tag in jobs:
        out = dir_path("likelihood", seed, tag)
        if (out / "config.json").exists():
            continue
        if lik_tr is None:
            lik_tr = lik_examples(model, train[:N_LIK_TRAIN])
            lik_val = lik_examples(model, val[:N_LIK_VAL])
        log(f"train likelihood{tag} seed {seed}")
        d = train_focus_directions(model, lik_tr, heads=heads, objective="likelihood", val_examples=lik_val,
                                   lr=1e-2, epochs=1, max_norm=None, seed=seed, progress=False,
                                   checkpoint_dir=RUN / "ckpt" / f"likelihood{tag}_s{seed}")
        d.save(out)
        log(f"  {d.training['train_seconds']} s, val NLL {d.training['history'][0].get('val_loss'):.3f} -> "
            f"{d.training['history'][-1].get('val_loss'):.3f}, |u| {d.norms().mean():.2f}")
    # attention objective (paper; cached q/k), 3 seeds on one cache
    if all((dir_path("attention", s) / "config.json").exists() for s in SEEDS):
        return
    att_tr = make_direction_examples(model, train[:N_ATT_TRAIN], responses=prep["responses"]["train"])
    att_val = make_direction_examples(model, val[:N_ATT_VAL], responses=prep["responses"]["val"])
    t0 = time.time()
    tr_cache = cache_qk(model, att_tr, heads20, progress=False)
    t_cache = time.time() - t0
    va_cache = cache_qk(model, att_val, heads20, progress=False)
    timing = {"n_train": len(att_tr), "heads": 20, "cache_seconds": round(t_cache, 1)}
    for seed in SEEDS:
        out = dir_path("attention", seed)
        if (out / "config.json").exists():
            continue
        log(f"train attention seed {seed}")
        t1 = time.time()
        d = train_focus_directions(model, att_tr, heads=heads20, objective="attention", val_examples=att_val,
                                   patience=5, seed=seed, progress=False, caches=(tr_cache, va_cache))
        d.save(out)
        if seed == 0:
            timing["optimise_seconds"] = round(time.time() - t1, 1)
            timing["total_seconds"] = round(t_cache + time.time() - t1, 1)
        log(f"  heldout mass {d.training['heldout_relevant_attention_before']} -> "
            f"{d.training['heldout_relevant_attention_after']}, |u| {d.norms().mean():.2f}")
    # the authors' per-layer loop vs the batched optimiser on the same cached tensors (small case)
    from focuslens.directions import QKCache, heldout_attention
    n_small = min(50, len(tr_cache))
    small = QKCache(**{**tr_cache.__dict__, **{k: v[:n_small] for k, v in tr_cache.__dict__.items()
                                               if isinstance(v, list) and len(v) == len(tr_cache)}})
    t1 = time.time()
    ref = train_focus_directions(model, att_tr[:n_small], heads=heads20, objective="attention",
                                 method="per_layer", seed=0, progress=False, caches=(small, None))
    t_ref = time.time() - t1
    v_ref = float(heldout_attention(va_cache, ref.vectors).mean())
    t1 = time.time()
    fast = train_focus_directions(model, att_tr[:n_small], heads=heads20, objective="attention",
                                  val_examples=att_val, seed=0, progress=False, caches=(small, va_cache),
                                  patience=5)
    t_fast = time.time() - t1
    hist = fast.training["history"]
    reach = next((h for h in hist if h.get("val_mass", -1) >= v_ref), None)
    timing.update(per_layer={"n": n_small, "seconds": round(t_ref, 1), "heldout": round(v_ref, 4)},
                  batched={"n": n_small, "seconds": round(t_fast, 1),
                           "heldout": fast.training["heldout_relevant_attention_after"],
                           "first_eval_reaching_per_layer": reach, "history": hist})
    save_json(RUN / "timing.json", timing)
    log(f"timing {json.dumps({k: v for k, v in timing.items() if k != 'batched'})}")


def stage_train_other(model, prep) -> None:
    """A second training task for the transfer matrix: the five *other* relation templates.

    Same heads (the top-20 ranked on 'capital'), recipe, sizes and seed 0 as the main run.
    """
    heads20 = [tuple(h) for h in prep["heads"][:20]]
    train = split("other_train", max(N_LIK_TRAIN, N_ATT_TRAIN), relation=UNSEEN)
    val = split("other_val", N_VAL, relation=UNSEEN)
    out = dir_path("likelihood", 0, "_other")
    if not (out / "config.json").exists():
        log("train likelihood_other seed 0")
        d = train_focus_directions(model, lik_examples(model, train[:N_LIK_TRAIN]), heads=heads20,
                                   objective="likelihood", val_examples=lik_examples(model, val[:N_LIK_VAL]),
                                   lr=1e-2, epochs=1, max_norm=None, seed=0, progress=False,
                                   checkpoint_dir=RUN / "ckpt" / "likelihood_other_s0")
        d.save(out)
    out = dir_path("attention", 0, "_other")
    if not (out / "config.json").exists():
        log("train attention_other seed 0")
        resp = {}
        for name, exs in (("train", train[:N_ATT_TRAIN]), ("val", val[:N_ATT_VAL])):
            res = evaluate(model, exs, variant="gold_only", max_new_tokens=32, progress=False,
                           output=RUN / "evals" / f"gold_only_responses_other_{name}.jsonl", stop_at_newline=False)
            resp[name] = [r["prediction"] for r in res.records]
        d = train_focus_directions(model, make_direction_examples(model, train[:N_ATT_TRAIN], responses=resp["train"]),
                                   heads=heads20, objective="attention", patience=5, seed=0, progress=False,
                                   val_examples=make_direction_examples(model, val[:N_ATT_VAL], responses=resp["val"]))
        d.save(out)


def load_dirs(model, obj: str, seed: int = 0, tag: str = "") -> FocusDirections:
    return FocusDirections.load(dir_path(obj, seed, tag), model=model)


# ------------------------------------------------------------------------------------------ eval
def run_eval(model, setting: str, cond: str, examples, spec=None, *, variant="original", n=None):
    """Evaluate one condition; its records file is named by the spec's content id (another spec never resumes it)."""
    exs = examples[:n] if n else examples
    sid = spec.id if spec is not None else "none"
    res = evaluate(model, exs, variant=variant, max_new_tokens=MAX_NEW, intervene=spec, progress=False,
                   output=RUN / "evals" / setting / f"{cond}-{sid}.jsonl", tag=cond)
    s = res.summary()
    return {"n": s["n"], "acc": s["accuracy"], "se": s["accuracy_se"], "copy": s["distractor_copy"],
            "em": [r["em"] for r in res.records], "pos": [r.get("gold_position") for r in res.records],
            "spec": sid}


def stage_val(model, prep) -> dict:
    p = RUN / "selection.json"
    if (d := load_json(p)) is not None:
        return d
    val = split("val", N_VAL)
    grid = {"unmodified": run_eval(model, "val", "unmodified", val)}
    sel = {}
    for obj in ("likelihood", "attention"):
        d = load_dirs(model, obj, 0)
        best = None
        for k in K_GRID:
            for a in ALPHA_GRID[obj] + (NEG_ALPHA[obj],):
                name = f"{obj}_k{k}_a{a:g}"
                grid[name] = run_eval(model, "val", name, val, Steer(d, k=k, alpha=a))
                if a > 0:
                    key = (grid[name]["acc"], -a, -k)
                    if best is None or key > best[0]:
                        best = (key, k, a)
            log(f"val {obj} k={k}: " + ", ".join(f"{a:g}:{grid[f'{obj}_k{k}_a{a:g}']['acc']:.2f}"
                                                 for a in ALPHA_GRID[obj] + (NEG_ALPHA[obj],)))
        _, k, a = best
        bt = None
        for t in TARGETS:
            name = f"{obj}_k{k}_auto{t:g}"
            grid[name] = run_eval(model, "val", name, val, Steer(d, k=k, alpha="auto", target=t))
            if bt is None or grid[name]["acc"] > bt[0]:
                bt = (grid[name]["acc"], t)
        sel[obj] = {"k": k, "alpha": a, "target": bt[1], "val_acc": best[0][0], "val_auto_acc": bt[0]}
        log(f"selected {obj}: {sel[obj]}")
    out = {"selection": sel, "grid": {k: {kk: vv for kk, vv in v.items() if kk not in ("em", "pos")}
                                      for k, v in grid.items()}}
    save_json(p, out)
    return out


def conditions(model, sel, prep, *, full):
    """``(name, factory)`` per condition; ``factory()`` builds its spec (None: unmodified) only when the
    condition runs, so directions that are trained later (``_other``) are loaded only then."""
    L, A = sel["likelihood"], sel["attention"]
    heads20 = [tuple(h) for h in prep["heads"][:20]]
    get = lambda obj, s=0, tag="": load_dirs(model, obj, s, tag)  # noqa: E731
    out = [("unmodified", lambda: None)]
    for s in SEEDS:
        out.append((f"likelihood_s{s}", lambda s=s: Steer(get("likelihood", s), k=L["k"], alpha=L["alpha"])))
    for s in SEEDS:
        out.append((f"attention_s{s}", lambda s=s: Steer(get("attention", s), k=A["k"], alpha=A["alpha"])))
    out.append(("likelihood_random_norm", lambda: Steer(random_like(get("likelihood").top(L["k"]), seed=1),
                                                        alpha=L["alpha"])))
    out.append(("likelihood_random_heads", lambda: Steer(get("likelihood", 0, "_randheads"), k=L["k"],
                                                         alpha=L["alpha"])))
    out.append(("split_softmax_ceiling", lambda: SplitSoftmax(heads20, tau=TAU)))
    for obj in ("likelihood", "attention"):
        c = sel[obj]
        out.append((f"{obj}_other", lambda obj=obj, c=c: Steer(get(obj, 0, "_other"), k=c["k"], alpha=c["alpha"])))
    if full:
        out.append(("likelihood_negative", lambda: Steer(get("likelihood"), k=L["k"], alpha=NEG_ALPHA["likelihood"])))
        out.append(("attention_negative", lambda: Steer(get("attention"), k=A["k"], alpha=NEG_ALPHA["attention"])))
        out.append(("attention_random_norm", lambda: Steer(random_like(get("attention").top(A["k"]), seed=1),
                                                           alpha=A["alpha"])))
        for obj in ("likelihood", "attention"):
            k, t = sel[obj]["k"], sel[obj]["target"]
            out.append((f"{obj}_auto", lambda obj=obj, k=k, t=t: Steer(get(obj), k=k, alpha="auto", target=t)))
    return out


def run_conditions(model, setting, examples, conds, *, variant="original", small=()):
    """Run each ``(name, factory)`` not yet in results/<setting>.json *for the same spec id*."""
    res_p = RUN / "results" / f"{setting}.json"
    results = load_json(res_p) or {}
    for name, factory in conds:
        spec = factory()
        sid = spec.id if spec is not None else "none"
        if name in results and results[name].get("spec") == sid:
            continue
        n = N_TEST_SMALL if name in small else None
        t0 = time.time()
        r = run_eval(model, setting, name, examples, spec, variant=variant, n=n)
        results[name] = r
        save_json(res_p, results)
        log(f"{setting:10s} {name:28s} n={r['n']:3d} acc {r['acc']:.3f} ± {r['se']:.3f} "
            f"copy {r['copy']:.2f} ({time.time() - t0:.0f} s)")
    return results


TRANSFER_SEEDS = bool(int(os.environ.get("FOCUSLENS_TRANSFER_SEEDS", "0")))  # seeds 1, 2 in every setting too
SMALL_TEST = {"likelihood_s1", "likelihood_s2", "attention_s1", "attention_s2", "attention_negative",
              "attention_random_norm", "likelihood_random_heads", "split_softmax_ceiling",
              "likelihood_auto", "attention_auto"}  # the per-head auto lost clearly on validation (0.28 / 0.18)
# What ran (session 2, 2 shared CPU cores): the per-head magnitude control lost clearly on validation
# (0.28 / 0.18 vs 0.62 / 0.35 for the best fixed α) and the three attention-objective seeds converge to
# the same vectors (held-out mass equal to 4 digits), so those test rows were dropped for CPU time; set
# FOCUSLENS_FULL_TEST=1 to run them too.
ORDER_TEST = ["unmodified", "likelihood_s0", "likelihood_negative", "likelihood_random_norm", "attention_s0",
              "likelihood_s1", "likelihood_s2", "likelihood_random_heads", "split_softmax_ceiling"]
if os.environ.get("FOCUSLENS_FULL_TEST"):
    ORDER_TEST += ["likelihood_auto", "attention_auto", "attention_s1", "attention_s2", "attention_negative",
                   "attention_random_norm"]
ORDER_TRANSFER = ["unmodified", "likelihood_s0", "attention_s0", "likelihood_random_norm",
                  "likelihood_random_heads", "split_softmax_ceiling", "likelihood_s1", "likelihood_s2",
                  "attention_s1", "attention_s2"]


def stage_test(model, prep, sel):
    conds = dict(conditions(model, sel["selection"], prep, full=True))
    run_conditions(model, "test", split("test", N_TEST), [(c, conds[c]) for c in ORDER_TEST], small=SMALL_TEST)


def stage_auto_input(model, prep, sel):
    """Magnitude control v2 (per="input", target calibrated on unlabelled validation prompts at the
    validation-chosen α): no accuracy grid, nothing chosen on test."""
    from focuslens.directions import calibrate_sink_target

    p = RUN / "calibration.json"
    cal = load_json(p) or {}
    val = split("val", N_VAL)
    for obj in ("likelihood", "attention"):
        if obj in cal:
            continue
        c = sel["selection"][obj]
        d = load_dirs(model, obj).top(c["k"])
        prompts = [render(ex, model.tokenizer).prompt.tokens for ex in val]
        cal[obj] = {"k": c["k"], "alpha": c["alpha"], "target": calibrate_sink_target(model, d, prompts, alpha=c["alpha"]),
                    "n_prompts": len(prompts)}
        save_json(p, cal)
        log(f"calibrated {obj}: {cal[obj]}")
    conds = []
    for obj in ("likelihood", "attention"):
        dk, t = load_dirs(model, obj).top(cal[obj]["k"]), cal[obj]["target"]
        conds.append((f"{obj}_auto_input", lambda dk=dk, t=t: Steer(dk, alpha="auto", target=t, per="input")))
    # own results files (another process may be writing results/test.json); the report merges them
    run_conditions(model, "val_auto", val, conds)
    run_conditions(model, "test_auto", split("test", N_TEST), conds)


def stage_other(model, prep, sel):
    """Row B of the transfer matrix: directions trained on the other templates, in every setting."""
    stage_train_other(model, prep)
    conds = dict(conditions(model, sel["selection"], prep, full=False))
    group = ["likelihood_other", "attention_other"]
    run_conditions(model, "test", split("test", N_TEST), [(c, conds[c]) for c in group], small=set(group))
    for name in TRANSFER:
        exs = transfer_examples(name)
        variant = "gold_only" if name == "gold_only" else "original"
        run_conditions(model, name, exs, [(c, conds[c]) for c in group], variant=variant)


def stage_transfer(model, prep, sel, only=None):
    conds = dict(conditions(model, sel["selection"], prep, full=False))
    names = [only] if only else list(TRANSFER)
    # breadth first: the main conditions in every setting, then (optionally) the extra seeds
    groups = (ORDER_TRANSFER[:6], ORDER_TRANSFER[6:]) if TRANSFER_SEEDS else (ORDER_TRANSFER[:6],)
    for group in groups:
        for name in names:
            exs = transfer_examples(name)
            variant = "gold_only" if name == "gold_only" else "original"
            run_conditions(model, name, exs, [(c, conds[c]) for c in group], variant=variant)


# ------------------------------------------------------------------------------------------ report


def stage_report(model_name="SmolLM2-135M-Instruct") -> str:
    sel = load_json(RUN / "selection.json")
    lines = []
    if sel:
        lines += ["### Validation (n = 40, seed-0 directions): accuracy", "",
                  "| condition | accuracy | stderr | distractor copy |", "|---|---|---|---|"]
        for k, v in sel["grid"].items():
            lines.append(f"| {k} | {v['acc']:.3f} | {v['se']:.3f} | {v['copy']:.2f} |")
        lines += ["", f"Selected: `{json.dumps(sel['selection'])}`", ""]
    settings = [("test", "training template, 10 docs (test split)")] + [(k, v[1]) for k, v in TRANSFER.items()]
    for setting, desc in settings:
        res = load_results(setting)
        if not res:
            continue
        base = res.get("unmodified")
        lines += [f"### {setting}: {desc}", "",
                  "| condition | n | accuracy | stderr | Δ vs unmodified (paired) | wins / losses | distractor copy |",
                  "|---|---|---|---|---|---|---|"]
        for name, r in res.items():
            if base and name != "unmodified":
                m, se, _, w, l_ = paired_difference(r["em"], base["em"])
                dcol, wl = f"{m:+.3f} ± {se:.3f}", f"{w} / {l_}"
            else:
                dcol, wl = "—", "—"
            lines.append(f"| {name} | {r['n']} | {r['acc']:.3f} | {r['se']:.3f} | {dcol} | {wl} | {r['copy']:.2f} |")
        seeds = [res[f"likelihood_s{s}"] for s in SEEDS if f"likelihood_s{s}" in res]
        if base and len(seeds) == 3:
            ds = [paired_difference(r["em"], base["em"]).mean for r in seeds]
            lines.append(f"\nLikelihood directions over 3 seeds: Δ = {sum(ds) / 3:+.3f} (per seed "
                         + ", ".join(f"{x:+.3f}" for x in ds) + f"; spread ± {_sd(ds):.3f} sd)")
        for obj, fixed_name in (("likelihood", "likelihood_s0"), ("attention", "attention_s0")):
            for auto in (f"{obj}_auto_input", f"{obj}_auto"):
                if auto in res and fixed_name in res:
                    m, se, _, w, l_ = paired_difference(res[auto]["em"], res[fixed_name]["em"])
                    lines.append(f"Magnitude control `{auto}` − best fixed α (`{fixed_name}`), paired on "
                                 f"{min(res[auto]['n'], res[fixed_name]['n'])}: {m:+.3f} ± {se:.3f} ({w} / {l_})")
        seeds = [res[f"attention_s{s}"] for s in SEEDS if f"attention_s{s}" in res]
        if base and len(seeds) == 3:
            ds = [paired_difference(r["em"], base["em"]).mean for r in seeds]
            lines.append(f"Attention directions over 3 seeds: Δ = {sum(ds) / 3:+.3f} (per seed "
                         + ", ".join(f"{x:+.3f}" for x in ds) + f"; spread ± {_sd(ds):.3f} sd)")
        lines.append("")
    timing = load_json(RUN / "timing.json")
    if timing:
        lines += ["### Training time (attention objective, 20 heads)", "", "```", json.dumps(
            {k: v for k, v in timing.items() if k != "batched"} | {"batched": {k: v for k, v in timing["batched"].items()
                                                                               if k != "history"}}, indent=1), "```", ""]
    lines += ["### Transfer matrix: Δ accuracy (points) vs unmodified, paired ± SE", "", matrix_markdown(), ""]
    text = "\n".join(lines)
    (RUN / "report.md").write_text(text)
    _figures()
    return text


MATRIX_ROWS = [("likelihood_s0", "likelihood (A), seed 0"), ("likelihood_s1", "likelihood (A), seed 1"),
               ("likelihood_s2", "likelihood (A), seed 2"), ("attention_s0", "attention, paper (A)"),
               ("likelihood_other", "likelihood (B: other templates)"),
               ("attention_other", "attention, paper (B: other templates)"),
               ("likelihood_random_norm", "control: random, matched norm"),
               ("likelihood_random_heads", "control: likelihood on 20 random heads (A)"),
               ("split_softmax_ceiling", "ceiling: split softmax, oracle span")]
MATRIX_COLS = [("test", "capital, 10 docs"), ("templates", "unseen templates"), ("docs20", "capital, 20 docs"),
               ("kv", "key-value"), ("nq", "NQ, real docs"), ("gold_only", "gold only")]


def matrix_markdown() -> str:
    """Δ accuracy vs unmodified (paired ± SE) per intervention × setting, with the unmodified row."""
    res = {c: load_results(c) for c, _ in MATRIX_COLS}
    head = "| intervention (training task) | " + " | ".join(n for _, n in MATRIX_COLS) + " |"
    lines = [head, "|---|" + "---|" * len(MATRIX_COLS)]
    cells = []
    for c, _ in MATRIX_COLS:
        b = res[c].get("unmodified")
        cells.append("–" if not b else f"{b['acc']:.3f} (n = {b['n']})")
    lines.append("| unmodified: accuracy | " + " | ".join(cells) + " |")
    for key, name in MATRIX_ROWS:
        cells = []
        for c, _ in MATRIX_COLS:
            r, b = res[c].get(key), res[c].get("unmodified")
            if r and b:
                m, se, _, w, l_ = paired_difference(r["em"], b["em"])
                cells.append(f"{m * 100:+.1f} ± {se * 100:.1f}" + (f" (n = {r['n']})" if r["n"] != b["n"] else ""))
            else:
                cells.append("–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _sd(xs):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0


def _figures() -> None:
    import plotly.graph_objects as go

    from focuslens.plot.figures import save_figure

    have = {c: load_results(c) for c, _ in MATRIX_COLS}
    shown = [(k, n) for k, n in MATRIX_ROWS if any(k in have[c] for c, _ in MATRIX_COLS)]  # rows that ran
    rows = [k for k, _ in shown]
    cols = [c for c, _ in MATRIX_COLS]
    z, txt = [], []
    for row in rows:
        zr, tr = [], []
        for c in cols:
            res = load_results(c)
            if row in res and "unmodified" in res:
                m, se, *_ = paired_difference(res[row]["em"], res["unmodified"]["em"])
                zr.append(m)
                tr.append(f"{m:+.2f}<br>±{se:.2f}<br>n={min(res[row]['n'], res['unmodified']['n'])}")
            else:
                zr.append(None)
                tr.append("")
        z.append(zr)
        txt.append(tr)
    fig = go.Figure(go.Heatmap(z=z, x=[n for _, n in MATRIX_COLS], y=[n for _, n in shown], text=txt, texttemplate="%{text}", colorscale="RdBu",
                               zmid=0, zmin=-0.6, zmax=0.6, colorbar={"title": "Δ accuracy"}))
    fig.update_layout(title="Focus directions, SmolLM2-135M: Δ accuracy vs unmodified (paired SE); A = trained on 'capital', B = on other templates",
                      xaxis_title="evaluated on", yaxis_title="intervention", height=640, width=1150, margin={"l": 330},
                      yaxis={"autorange": "reversed"})
    save_figure(fig, FIG / "transfer_matrix")
    sel = load_json(RUN / "selection.json")
    if not sel:
        return
    fig = go.Figure()
    g = sel["grid"]
    for obj in ("likelihood", "attention"):
        for k in K_GRID:
            pts = sorted((float(m.group(1)), v) for name, v in g.items()
                         if (m := re.fullmatch(rf"{obj}_k{k}_a(-?[0-9.]+)", name)))
            fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1]["acc"] for p in pts],
                                     error_y={"type": "data", "array": [p[1]["se"] for p in pts]},
                                     mode="lines+markers", name=f"{obj}, k={k}"))
    fig.add_hline(y=g["unmodified"]["acc"], line_dash="dash", annotation_text="unmodified")
    fig.update_layout(title="Validation accuracy vs α per objective (n = 40, seed 0)", xaxis_title="α",
                      yaxis_title="accuracy (best-subspan EM)", height=460, width=760)
    save_figure(fig, FIG / "focus_directions_alpha_by_objective")


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", default="all",
                    choices=["prep", "train", "val", "test", "transfer", "other", "auto_input", "report", "all"])
    ap.add_argument("--only", default=None, help="transfer: one setting")
    args = ap.parse_args()
    if args.stage == "report":
        print(stage_report())
        return
    model = fl.load_model()
    prep = stage_prep(model)
    if args.stage == "prep":
        return
    stage_train(model, prep)
    if args.stage == "train":
        return
    sel = stage_val(model, prep)
    if args.stage == "val":
        return
    if args.stage in ("test", "all"):
        stage_test(model, prep, sel)
    if args.stage in ("transfer", "all"):
        stage_transfer(model, prep, sel, args.only)
    if args.stage in ("auto_input", "all"):
        stage_auto_input(model, prep, sel)
    if args.stage in ("other", "all"):
        stage_other(model, prep, sel)
    print(stage_report())


if __name__ == "__main__":
    main()
