"""Focus directions on SmolLM2: accuracy vs alpha, both objectives, random control, magnitude control.

Command (economical, resumable; every stage caches under runs/focus_directions/):

    nice -n 10 python experiments/focus_directions.py --stage all

Stages: data (synthetic 10-document QA, train/val/test), responses (gold-only greedy responses of
train+val: the training targets), baseline (test accuracy of the unmodified model), rank (contextual
head scores on the training examples), train_attention / train_likelihood, val_sweep (alpha x k on
the validation split), test (selected configurations + negative alpha + random matched-norm control +
magnitude control on the test split), figure (figures/focus_directions_alpha.html/.png + table).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import string
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RUN = ROOT / "runs" / "focus_directions"
FIG = ROOT / "figures"

import focuslens as fl  # noqa: E402
from focuslens.tasks import Document, TaskExample, render  # noqa: E402

N_DOCS = 10
N_TRAIN = 120  # CPU budget: 2 cores shared by 5 engineers (see docs/directions.md)
N_ATT_TRAIN, N_ATT_VAL = 60, 20  # what the contended CPU allowed on 2026-11-28 (docs/directions.md)
N_LIK_TRAIN, N_LIK_VAL = 32, 8
MAX_NEW = 14


# ------------------------------------------------------------------ data (local fallback generator)
def _word(rng: random.Random) -> str:
    return "".join(rng.choice("bcdfghklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 3))).capitalize()


def make_examples(n: int, *, n_docs: int, seed: int) -> list[TaskExample]:
    """Synthetic "The capital of E is V." QA (METHOD.md §6), gold position uniform over the documents.

    A local generator, frozen here so that cached runs stay valid (ids ``s{seed}-{i}``).
    """
    rng = random.Random(seed)
    out = []
    for i in range(n):
        names: set[str] = set()
        while len(names) < 2 * n_docs:
            names.add(_word(rng))
        names_l = sorted(names)
        rng.shuffle(names_l)
        ents, caps = names_l[:n_docs], names_l[n_docs:]
        gold = rng.randrange(n_docs)
        ctxs = [Document(title=e, text=f"The capital of {e} is {c}.", isgold=(k == gold), hasanswer=(k == gold))
                for k, (e, c) in enumerate(zip(ents, caps))]
        out.append(TaskExample(question=f"What is the capital of {ents[gold]}?", answers=[caps[gold]], ctxs=ctxs,
                               gold_index=gold, distractor_answers=[c for k, c in enumerate(caps) if k != gold],
                               meta={"id": f"s{seed}-{i}"}))
    return out


def _norm(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def best_subspan_em(pred: str, answers: list[str]) -> float:
    pred = _norm(pred.strip().split("\n")[0])
    return float(any(_norm(a) in pred for a in answers))


def generate(model, tokens: torch.Tensor, max_new: int = MAX_NEW) -> list[int]:
    with torch.no_grad():
        out = model.generate(tokens[None], max_new_tokens=max_new, do_sample=False, verbose=False,
                             use_past_kv_cache=True)
    new = out[0, tokens.shape[0]:].tolist()
    eos = model.tokenizer.eos_token_id
    ends = {eos, model.tokenizer.convert_tokens_to_ids("<|im_end|>")}
    for i, t in enumerate(new):
        if t in ends:
            return new[:i]
    return new


def load_jsonl(path: Path) -> dict:
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                out[r["id"]] = r
    return out


def eval_split(model, name: str, examples, *, attach=None, limit: int | None = None) -> dict:
    """Greedy generation + best-subspan EM, resumable JSONL under runs/. ``attach(tokens)`` -> handle."""
    path = RUN / "evals" / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    done = load_jsonl(path)
    exs = examples[:limit] if limit else examples
    with path.open("a") as f:
        for ex in exs:
            eid = ex.meta["id"]
            if eid in done:
                continue
            r = render(ex, model.tokenizer, variant="original")
            handle = attach(r) if attach is not None else None
            try:
                ids = generate(model, r.prompt.tokens)
            finally:
                if handle is not None:
                    handle.remove()
            text = model.tokenizer.decode(ids)
            rec = {"id": eid, "pred": text, "em": best_subspan_em(text, ex.answers),
                   "distractor": best_subspan_em(text, ex.distractor_answers)}
            f.write(json.dumps(rec) + "\n")
            f.flush()
            done[eid] = rec
    ems = [done[ex.meta["id"]]["em"] for ex in exs]
    dis = [done[ex.meta["id"]]["distractor"] for ex in exs]
    n = len(ems)
    acc = sum(ems) / n
    return {"name": name, "n": n, "acc": acc, "stderr": math.sqrt(acc * (1 - acc) / n),
            "distractor": sum(dis) / n}


def stage_data():
    RUN.mkdir(parents=True, exist_ok=True)
    splits = {"train": make_examples(200, n_docs=N_DOCS, seed=1), "val": make_examples(50, n_docs=N_DOCS, seed=2),
              "test": make_examples(200, n_docs=N_DOCS, seed=3)}
    return splits


def stage_responses(model, splits, *, generate_missing: bool = True) -> dict[str, str]:
    """Gold-only greedy responses (the paper's training targets), resumable."""
    path = RUN / "gold_responses.jsonl"
    done = load_jsonl(path)
    if not generate_missing:
        return done
    with path.open("a") as f:
        for split, lim in (("val", None), ("train", N_TRAIN)):
            for ex in splits[split][:lim]:
                eid = ex.meta["id"]
                if eid in done:
                    continue
                r = render(ex, model.tokenizer, variant="gold_only")
                ids = generate(model, r.prompt.tokens)
                rec = {"id": eid, "ids": ids, "text": model.tokenizer.decode(ids)}
                f.write(json.dumps(rec) + "\n")
                f.flush()
                done[eid] = rec
    return done


# ------------------------------------------------------------------ training data, ranking, training
def direction_examples(model, splits, responses, split: str, limit: int | None = None):
    from focuslens.directions import DirectionExample

    out = []
    for ex in splits[split][:limit]:
        rec = responses.get(ex.meta["id"])
        # CPU budget: validation examples without a cached gold-only response use the gold sentence
        resp = rec["ids"] if rec is not None else ex.ctxs[ex.gold_index].text
        if not resp:
            continue
        full = render(ex, model.tokenizer, variant="original")
        out.append(DirectionExample(full.prompt.with_response(model.tokenizer, resp), full.relevant))
    return out


def stage_rank(model, train_dx, n: int = 40, k: int = 30) -> list[tuple[int, int]]:
    path = RUN / "ranking.json"
    if path.exists():
        return [tuple(h) for h in json.loads(path.read_text())["heads"]]
    from focuslens.scoring import contextual_scores

    tot = None
    for dx in train_dx[:n]:
        s = contextual_scores(model, dx.prompt.tokens, relevant=dx.relevant, response=dx.prompt.response)
        tot = s if tot is None else tot + s
    tot = tot / min(n, len(train_dx))
    flat = [(float(tot[l, h]), l, h) for l in range(tot.shape[0]) for h in range(tot.shape[1])]
    flat.sort(reverse=True)
    heads = [(l, h) for _, l, h in flat[:k]]
    path.write_text(json.dumps({"heads": heads, "scores": [round(x, 4) for x, _, _ in flat[:k]],
                                "n_examples": min(n, len(train_dx)), "mean_all_heads": float(tot.mean())}))
    return heads


def stage_train_attention(model, heads, train_dx, val_dx):
    from focuslens.directions import FocusDirections, cache_qk, heldout_attention, train_focus_directions

    out = RUN / "fd_attention"
    if (out / "config.json").exists():
        return FocusDirections.load(out, model=model)
    t0 = time.time()
    train_dx, val_dx = train_dx[:N_ATT_TRAIN], val_dx[:N_ATT_VAL]
    tr = cache_qk(model, train_dx, heads)
    va = cache_qk(model, val_dx, heads)
    t_cache = time.time() - t0
    log = {"cache_seconds": round(t_cache, 1)}
    # fast default: full-batch Adam, lr 0.05, norm limit = mean query norm, early stopping on val
    t0 = time.time()
    d = train_focus_directions(model, train_dx, heads=heads, val_examples=val_dx, caches=(tr, va), steps=300,
                               patience=6, progress=False)
    log["batched_seconds"] = round(time.time() - t0, 1)
    log["batched_val_mass"] = float(heldout_attention(va, d).mean())
    log["batched_train_mass"] = float(heldout_attention(tr, d).mean())
    log["before_val_mass"] = float(heldout_attention(va, None).mean())
    log["before_val_sink"] = float(heldout_attention(va, None, column="sink").mean())
    log["after_val_sink"] = float(heldout_attention(va, d, column="sink").mean())
    # variants: no norm limit; paper settings through the authors' per-layer loop (reference)
    t0 = time.time()
    d_free = train_focus_directions(model, train_dx, heads=heads, val_examples=val_dx, caches=(tr, va), steps=300,
                                    patience=6, max_norm=None, progress=False)
    log["batched_nolimit_seconds"] = round(time.time() - t0, 1)
    log["batched_nolimit_val_mass"] = float(heldout_attention(va, d_free).mean())
    log["batched_nolimit_norm_mean"] = float(d_free.norms().mean())
    log["batched_norm_mean"] = float(d.norms().mean())
    t0 = time.time()
    d_ref = train_focus_directions(model, train_dx, heads=heads, caches=(tr, va), method="per_layer",
                                   max_norm=None, progress=False)
    log["per_layer_seconds"] = round(time.time() - t0, 1)
    log["per_layer_val_mass"] = float(heldout_attention(va, d_ref).mean())
    log["per_layer_train_mass"] = float(heldout_attention(tr, d_ref).mean())
    log["per_layer_norm_mean"] = float(d_ref.norms().mean())
    log["history"] = d.training["history"]
    d.save(out)
    d_free.save(RUN / "fd_attention_nolimit")
    d_ref.save(RUN / "fd_attention_paper")
    (RUN / "attention_training.json").write_text(json.dumps(log, indent=1))
    print("[attention]", {k: v for k, v in log.items() if k != "history"}, flush=True)
    return d


def stage_train_likelihood(model, heads, train_dx, val_dx, *, k: int = 20, epochs: int = 1, n_train: int = N_LIK_TRAIN):
    from focuslens.directions import FocusDirections, train_focus_directions

    out = RUN / "fd_likelihood"
    if (out / "config.json").exists():
        return FocusDirections.load(out, model=model)
    t0 = time.time()
    d = train_focus_directions(model, train_dx[:n_train], heads=heads[:k], val_examples=val_dx[:N_LIK_VAL],
                               objective="likelihood", lr=2e-2, epochs=epochs, patience=1, max_norm=None,
                               checkpoint_dir=RUN / "ckpt_likelihood", progress=False)
    d.training["wall_seconds"] = round(time.time() - t0, 1)
    d.save(out)
    print("[likelihood]", d.training["history"], round(time.time() - t0), "s", flush=True)
    return d


# ------------------------------------------------------------------ cheap validation proxy
def forced_prefix_items(model, examples):
    """Prompt + the answer prefix "The capital of E is"; the next token decides the answer.

    Returns (tokens, gold_first_token, distractor_first_tokens, prompt_len) per example.
    """
    items = []
    for ex in examples:
        r = render(ex, model.tokenizer, variant="original")
        gold_doc = ex.ctxs[ex.gold_index].text
        value = ex.answers[0]
        prefix = gold_doc[: gold_doc.rindex(value)].rstrip()
        p = r.prompt.with_response(model.tokenizer, prefix)
        n = len(p)
        first = lambda v: int(r.prompt.with_response(model.tokenizer, prefix + " " + v).tokens[n])  # noqa: E731
        items.append((p.tokens, first(value), {first(v) for v in ex.distractor_answers}, len(r.prompt), r,
                      ex.meta["id"]))
    return items


def proxy_eval(model, name, items, make_dirs=None, *, alpha=None, auto_target=None, batch=8) -> dict:
    """First-token accuracy after the forced answer prefix (one forward per example).

    Per-example results are appended to ``runs/focus_directions/proxy/{name}.jsonl`` (resumable); the
    summary covers exactly the ``items`` given, so subsets share cached rows.
    """
    path = RUN / "proxy" / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    done = load_jsonl(path)
    todo = [it for it in items if it[5] not in done]
    pad = model.tokenizer.eos_token_id
    bs = 1 if auto_target is not None else batch
    with path.open("a") as f:
        for a in range(0, len(todo), bs):
            chunk = todo[a:a + bs]
            n_max = max(len(t) for t, *_ in chunk)
            toks = torch.full((len(chunk), n_max), pad, dtype=torch.long)
            for b, (t, *_rest) in enumerate(chunk):
                toks[b, : len(t)] = t  # right padding: causal rows before the pad are exact
            handle = None
            if make_dirs is not None:
                if auto_target is not None:
                    handle = make_dirs.apply(model, alpha="auto", tokens=chunk[0][4].prompt.tokens,
                                             target=auto_target)
                else:
                    handle = make_dirs.apply(model, alpha=alpha)
            try:
                with torch.no_grad():
                    logits = model(toks)
            finally:
                if handle is not None:
                    handle.remove()
            for b, (t, g, ds, _, _, eid) in enumerate(chunk):
                pred = int(logits[b, len(t) - 1].argmax())
                rec = {"id": eid, "correct": float(pred == g), "copy": float(pred in ds and pred != g)}
                f.write(json.dumps(rec) + "\n")
                done[eid] = rec
            f.flush()
    correct = [done[it[5]]["correct"] for it in items]
    copies = [done[it[5]]["copy"] for it in items]
    n = len(correct)
    acc = sum(correct) / n
    return {"name": name, "n": n, "acc": acc, "stderr": math.sqrt(acc * (1 - acc) / n), "copy": sum(copies) / n}




# Ordered by importance: each condition is resumable per example, so a run cut short keeps what it did.
# (objective, k, alpha or None, auto target or None, random control?)
VAL_PLAN = [
    ("likelihood", 20, 1.0, None, False),
    ("attention", 20, 1.0, None, False),
    ("likelihood", 20, 2.0, None, False),
    ("attention", 20, 2.0, None, False),
    ("likelihood", 20, 0.5, None, False),
    ("likelihood", 20, None, 0.5, False),
    ("attention", 20, None, 0.5, False),
    ("likelihood", 20, -1.0, None, False),
    ("likelihood", 20, 1.0, None, True),
    ("attention", 20, 0.5, None, False),
    ("attention", 20, -1.0, None, False),
    ("attention", 10, 1.0, None, False),
    ("attention", 20, 2.0, None, True),
]


def cond_name(obj, k, alpha, target, rnd) -> str:
    return f"{'random_' if rnd else ''}{obj}_k{k}_" + (f"a{alpha:g}" if target is None else f"auto{target:g}")


def run_condition(model, split, items, dirs, obj, k, alpha, target, rnd) -> dict:
    from focuslens.directions import random_like

    d = dirs[obj].top(k)
    if rnd:
        d = random_like(d, seed=k)
    name = cond_name(obj, k, alpha, target, rnd)
    return {**proxy_eval(model, f"{split}_{name}", items, d, alpha=alpha, auto_target=target),
            "objective": obj, "k": k, "alpha": alpha, "target": target, "random": rnd}


def stage_val_sweep(model, splits, dirs: dict, n_val: int) -> dict:
    items = forced_prefix_items(model, splits["val"][:n_val])
    res = {"baseline": proxy_eval(model, "val_baseline", items)}
    for obj, k, alpha, target, rnd in VAL_PLAN:
        if obj not in dirs:
            continue
        name = cond_name(obj, k, alpha, target, rnd)
        res[name] = run_condition(model, "val", items, dirs, obj, k, alpha, target, rnd)
        print(f"[val] {name}: acc {res[name]['acc']:.3f} ± {res[name]['stderr']:.3f} copy {res[name]['copy']:.2f}"
              f" (baseline {res['baseline']['acc']:.3f})", flush=True)
        (RUN / "val_sweep.json").write_text(json.dumps(res, indent=1))
    return res


def choose(res: dict, obj: str) -> dict:
    """Best fixed positive (k, alpha) and best auto target for ``obj`` on the validation proxy."""
    fixed = [(v["acc"], -v["alpha"], n) for n, v in res.items()
             if n != "baseline" and v["objective"] == obj and not v["random"] and v["target"] is None and v["alpha"] > 0]
    auto = [(v["acc"], n) for n, v in res.items()
            if n != "baseline" and v["objective"] == obj and not v["random"] and v["target"] is not None]
    if not fixed:
        return {}
    bf = res[max(fixed)[2]]
    out = {"k": bf["k"], "alpha": bf["alpha"], "val_acc": bf["acc"]}
    if auto:
        ba = res[max(auto)[1]]
        out.update(auto_k=ba["k"], auto_target=ba["target"], auto_val_acc=ba["acc"])
    return out


# Pre-declared test conditions (no tuning at all): alpha = 1 is the alpha both objectives were
# trained with, target 0.5 the magnitude control's default. Used when no validation sweep exists.
FIXED_PLAN = [
    ("likelihood", 20, 1.0, None, False),
    ("attention", 20, 1.0, None, False),
    ("likelihood", 20, None, 0.5, False),
    ("likelihood", 20, 1.0, None, True),
    ("likelihood", 20, -1.0, None, False),
    ("attention", 20, None, 0.5, False),
    ("attention", 20, 1.0, None, True),
    ("attention", 20, -1.0, None, False),
    ("likelihood", 20, 2.0, None, False),
    ("attention", 20, 2.0, None, False),
    ("likelihood", 20, 0.5, None, False),
    ("attention", 20, 0.5, None, False),
    ("attention", 20, 0.5, None, True),
]


def stage_test_fixed(model, splits, dirs, n_test: int, conds: list[int] | None = None, *,
                     cached_only: bool = False) -> dict:
    """Test split, forced-prefix proxy, the pre-declared FIXED_PLAN in priority order (resumable).

    ``conds`` (indices into FIXED_PLAN) lets two processes share the plan; a final run without it
    only reads the cached rows and writes the summary.
    """
    items = forced_prefix_items(model, splits["test"][:n_test])
    out = {"baseline": proxy_eval(model, "test_baseline", items)}
    print("[test] baseline", out["baseline"], flush=True)
    plan = FIXED_PLAN if conds is None else [FIXED_PLAN[i] for i in conds]
    for obj, k, alpha, target, rnd in plan:
        if obj not in dirs:
            continue
        name = cond_name(obj, k, alpha, target, rnd)
        if cached_only:
            rows = load_jsonl(RUN / "proxy" / f"test_{name}.jsonl")
            if any(it[5] not in rows for it in items):
                continue
        out[name] = run_condition(model, "test", items, dirs, obj, k, alpha, target, rnd)
        print(f"[test] {name}: acc {out[name]['acc']:.3f} ± {out[name]['stderr']:.3f} copy {out[name]['copy']:.2f}"
              f" (baseline {out['baseline']['acc']:.3f}, n={n_test})", flush=True)
        if conds is None:
            (RUN / f"test_fixed_n{n_test}.json").write_text(json.dumps(out, indent=1))
    return out


def stage_test(model, splits, dirs, res, objs, n_test: int) -> dict:
    """Test split, forced-prefix proxy: baseline, then per objective the val-chosen fixed α, random
    vectors of matched norm at that α, the auto magnitude control (val-chosen target) and −α."""
    items = forced_prefix_items(model, splits["test"][:n_test])
    out = {"baseline": proxy_eval(model, "test_baseline", items), "choice": {}}
    print("[test] baseline", out["baseline"], flush=True)
    plan = []
    for obj in objs:
        c = choose(res, obj)
        if not c:
            continue
        out["choice"][obj] = c
        plan.append((obj, c["k"], c["alpha"], None, False))
        plan.append((obj, c["k"], c["alpha"], None, True))
        if "auto_target" in c:
            plan.append((obj, c["auto_k"], None, c["auto_target"], False))
        plan.append((obj, c["k"], -c["alpha"], None, False))
    for obj, k, alpha, target, rnd in plan:
        name = cond_name(obj, k, alpha, target, rnd)
        out[name] = run_condition(model, "test", items, dirs, obj, k, alpha, target, rnd)
        print(f"[test] {name}: acc {out[name]['acc']:.3f} ± {out[name]['stderr']:.3f} copy {out[name]['copy']:.2f}",
              flush=True)
        (RUN / "test_results.json").write_text(json.dumps(out, indent=1))
    return out


def stage_figure() -> None:
    """figures/focus_directions_alpha.html/.png from the validation sweep, plus a markdown table."""
    from focuslens.plotting import ablation_curve, save_figure

    src = RUN / "val_sweep.json"
    split = "validation"
    if not src.exists():
        fixed = sorted(RUN.glob("test_fixed_n*.json"))
        if not fixed:
            raise SystemExit("No results yet: run --stage val or --stage test_fixed first.")
        src, split = fixed[-1], "test (pre-declared α, no tuning)"
    res = json.loads(src.read_text())
    conds = {n: v for n, v in res.items() if n != "baseline"}
    alphas = sorted({v["alpha"] for v in conds.values() if v["target"] is None})
    series = {}
    groups = sorted({(v["objective"], v["k"], v["random"]) for v in conds.values() if v["target"] is None})
    for obj, k, rnd in groups:
        pts = {v["alpha"]: v for v in conds.values()
               if v["target"] is None and (v["objective"], v["k"], v["random"]) == (obj, k, rnd)}
        label = f"{'random, matched norm: ' if rnd else ''}{obj} objective, k={k}"
        # ablation_curve needs a value per x: missing alphas are drawn as gaps (NaN)
        series[label] = ([pts[a]["acc"] if a in pts else float("nan") for a in alphas],
                         [pts[a]["stderr"] if a in pts else float("nan") for a in alphas])
    baselines = {f"unmodified ({res['baseline']['acc']:.2f})": res["baseline"]["acc"]}
    for v in conds.values():
        if v["target"] is not None:
            baselines[f"{v['objective']} k={v['k']} auto α, target {v['target']:g} ({v['acc']:.2f})"] = v["acc"]
    fig = ablation_curve(alphas, series, baselines=baselines, xaxis="α (negative pushes attention away)",
                         yaxis="accuracy (forced answer prefix, next token = gold value)",
                         title=f"Focus directions, SmolLM2-135M, {N_DOCS} docs, {split.split(' (')[0]}, "
                               f"n={res['baseline']['n']}")
    paths = save_figure(fig, FIG / "focus_directions_alpha")
    print("[figure]", [str(p) for p in paths])
    lines = ["| split | condition | objective | k | α / auto target | n | accuracy | stderr | distractor copy |",
             "|---|---|---|---|---|---|---|---|---|"]
    for split, path in (("val", RUN / "val_sweep.json"), ("test", RUN / "test_results.json"),
                        *(("test", p_) for p_ in sorted(RUN.glob("test_fixed_n*.json")))):
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        for n_, v in r.items():
            if n_ == "choice":
                continue
            at = "" if n_ == "baseline" else (f"auto {v['target']:g}" if v["target"] is not None else f"{v['alpha']:g}")
            lines.append(f"| {split} | {n_} | {v.get('objective', '')} | {v.get('k', '')} | {at} | {v['n']} | "
                         f"{v['acc']:.3f} | {v['stderr']:.3f} | {v['copy']:.3f} |")
    (RUN / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", default="all",
                    help="prep | baseline | train_attention | train_likelihood | train | val | test | figure | all")
    ap.add_argument("--objectives", default="likelihood,attention")
    ap.add_argument("--n-val", type=int, default=50)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--conds", default="", help="test_fixed: indices into FIXED_PLAN for this process")
    ap.add_argument("--cached-only", action="store_true", help="test_fixed: summarise finished conditions only")
    args = ap.parse_args(argv)
    t0 = time.time()
    if args.stage == "figure":
        stage_figure()
        return
    model = fl.load_model(verbose=False)
    splits = stage_data()
    if args.stage == "baseline":
        print("[baseline test]", proxy_eval(model, "test_baseline", forced_prefix_items(model, splits["test"][:args.n_test])),
              flush=True)
        print("[baseline val]", proxy_eval(model, "val_baseline", forced_prefix_items(model, splits["val"][:args.n_val])),
              flush=True)
        return
    if args.stage in ("prep", "all"):
        stage_responses(model, splits)
        print(f"[responses] done {time.time() - t0:.0f}s", flush=True)
        if args.stage == "prep":
            return
    responses = stage_responses(model, splits, generate_missing=False)
    train_dx = direction_examples(model, splits, responses, "train", N_TRAIN)
    val_dx = direction_examples(model, splits, responses, "val")
    heads = stage_rank(model, train_dx)
    print(f"[rank] top-30 {heads[:10]}... {time.time() - t0:.0f}s", flush=True)
    if args.stage == "train_likelihood":
        stage_train_likelihood(model, heads, train_dx, val_dx)
        return
    if args.stage == "gen":  # greedy generation + best-subspan EM on the first n test examples
        from focuslens.directions import FocusDirections

        d = FocusDirections.load(RUN / "fd_likelihood", model=model).top(20)
        exs = splits["test"][:args.n_test]
        out = {"baseline": eval_split(model, "test_gen_baseline", exs)}
        print("[gen]", out["baseline"], flush=True)
        out["likelihood_k20_a1"] = eval_split(model, "test_gen_likelihood_k20_a1", exs,
                                              attach=lambda r: d.apply(model, alpha=1.0))
        print("[gen]", out["likelihood_k20_a1"], flush=True)
        (RUN / f"test_gen_n{args.n_test}.json").write_text(json.dumps(out, indent=1))
        return
    if args.stage == "test_fixed":  # only what is already trained; never trains here
        from focuslens.directions import FocusDirections

        dirs = {o: FocusDirections.load(RUN / f"fd_{o}", model=model) for o in ("attention", "likelihood")
                if (RUN / f"fd_{o}" / "config.json").exists()}
        stage_test_fixed(model, splits, dirs, args.n_test,
                         [int(i) for i in args.conds.split(",")] if args.conds else None,
                         cached_only=args.cached_only)
        return
    dirs = {"attention": stage_train_attention(model, heads, train_dx, val_dx)}
    if args.stage == "train_attention":
        return
    if args.stage in ("train", "all") or (RUN / "fd_likelihood" / "config.json").exists():
        dirs["likelihood"] = stage_train_likelihood(model, heads, train_dx, val_dx)
    if args.stage == "train":
        return
    if args.stage == "test_fixed":
        stage_test_fixed(model, splits, dirs, args.n_test,
                         [int(i) for i in args.conds.split(",")] if args.conds else None)
        return
    if args.stage in ("val", "all"):
        res = stage_val_sweep(model, splits, dirs, args.n_val)
    else:
        res = json.loads((RUN / "val_sweep.json").read_text())
    if args.stage == "val":
        return
    objs = [o for o in args.objectives.split(",") if o in dirs]
    stage_test(model, splits, dirs, res, objs, args.n_test)
    print(f"[done] {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
