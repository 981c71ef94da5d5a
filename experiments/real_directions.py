"""Label-free focus directions trained on real distraction, held out on real documents (issue 19, parts 2–4).

    python experiments/real_documents.py                                  # the sets (once, ≈ 1–5 min)
    nice -n 19 python experiments/real_directions.py --n 40               # resumable: train, select, test
    python experiments/real_directions.py --n 40 --report                 # the table from finished records

What it does, with SmolLM2-135M-Instruct on the NQ real-document sets of ``experiments/real_documents.py``
(``nq-{kind}{N}-{train,validation,test}``: split by question, distractors drawn within the split):

1. **Train** focus directions on the top-``--k-max`` contextual heads (``figures/contextual_heads.json``,
   ranked on *synthetic* data, so no real-document label chooses the heads) from the first
   ``--n-train`` **train** questions, the response being the gold answer string: the likelihood
   objective (live model, float32) and the paper's attention objective (cached q/k, bfloat16 caching
   passes as ``TrainConfig.cache_precision``); ``--seeds``. A direction set is a SAELens-style folder
   under ``experiments/results/real_directions/directions/`` named by the content hash of everything
   that produced it (model identity, the data files' sha256, n, heads, the resolved config), so a
   changed setting trains anew and never reuses another run's vectors.
2. **Select** k and α on the first ``--n-val`` **validation** questions (``focuslens.evaluation.sweeps.select_alpha``,
   greedy EM, ties to the smaller |α| then k; records under ``.../select/``).
3. **Test** on the first ``--n`` **test** questions (the same list as ``experiments/real_distraction.py``,
   whose unmodified / gold-only / oracle records it shares: one file per condition, content-keyed,
   under ``experiments/results/real_distraction/``), with the controls: the same k heads with random
   vectors of matched norm (``random_like``), and the gold-only prompt under the directions (harm when
   nothing distracts).
4. **Why**: the k heads' attention mass from the answer tokens on the gold passage, the sink and the
   distractors, unmodified vs under the chosen directions, per example (cached by content), beside the
   oracle's.

The evaluation model is bfloat16 (``--dtype``) as in ``real_distraction.py``; Δ are paired on the same
examples (``focuslens.tasks.paired_difference``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

import torch  # noqa: E402

import real_distraction as rd  # noqa: E402
from focuslens.directions import FocusDirections, TrainConfig, make_direction_examples, random_like  # noqa: E402
from focuslens.directions import train_focus_directions  # noqa: E402
from focuslens.evaluation.runner import evaluate  # noqa: E402
from focuslens.core.io import atomic_write, atomic_write_json, content_hash  # noqa: E402
from focuslens.core.models import load_model, model_identity  # noqa: E402
from focuslens.score.ranking import load_heads  # noqa: E402
from focuslens.directions.artefact import Steer  # noqa: E402
from focuslens.evaluation.sweeps import examples_identity, select_alpha, selection_record  # noqa: E402
from focuslens.tasks import load_litm, paired_difference  # noqa: E402

OUT = ROOT / "experiments" / "results" / "real_directions"
ORACLE_TAU = 0.2  # the oracle ceiling: split softmax on the top --k-max heads (records shared with real_distraction.py)
ALPHAS = {"likelihood": (0.5, 1.0, 2.0), "attention": (0.25, 0.5, 1.0)}
CONFIGS = {  # the recipes of experiments/generalisation.py, sized to this machine
    "likelihood": dict(objective="likelihood", lr=1e-2, epochs=1, max_norm=None),
    "attention": dict(objective="attention", patience=5, cache_precision="bfloat16"),
}


def answer(ex) -> str:
    """The training response: the first gold answer string (what the likelihood objective makes likelier)."""
    return ex.answers[0]


def direction_folder(a, obj: str, seed: int, heads, key_train: dict) -> tuple[Path, TrainConfig]:
    """Where ``(objective, seed)`` lives: named by the hash of all that produces it (model, data, n, heads,
    resolved config, response rule), so another setting never loads these vectors."""
    cfg = TrainConfig(**CONFIGS[obj], seed=seed).resolved()
    key = content_hash({**key_train, "heads": [list(h) for h in heads], "config": cfg.to_dict(),
                        "response": "answers[0]"})
    return a.out / "directions" / f"{obj}_s{seed}-{key[:12]}", cfg


def train_or_load(a, model, obj: str, seed: int, heads, key_train: dict, train, val) -> FocusDirections | None:
    """The direction set for ``(objective, seed)``: loaded if its content-named folder exists, else trained
    (``--report``: None, nothing is trained)."""
    folder, cfg = direction_folder(a, obj, seed, heads, key_train)
    if (folder / "config.json").exists():
        return FocusDirections.load(folder)
    if a.report:
        return None
    tr = make_direction_examples(model, train, responses=[answer(e) for e in train])
    va = make_direction_examples(model, val, responses=[answer(e) for e in val])
    t0 = time.time()
    d = train_focus_directions(model, tr, heads=heads, config=cfg, val_examples=va, progress=a.progress)
    print(f"[real_directions] trained {obj} seed {seed} in {time.time() - t0:.0f} s: |u| "
          f"{float(d.norms().mean()):.2f}", flush=True)
    d.save(folder)
    return FocusDirections.load(folder)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", type=Path, default=ROOT / "runs" / "real_documents")
    ap.add_argument("--kind", default="random", choices=["random", "hard"])
    ap.add_argument("--n-docs", type=int, default=10)
    ap.add_argument("--objectives", nargs="+", default=["attention", "likelihood"], choices=list(CONFIGS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--k-max", type=int, default=20, help="heads trained (the top of figures/contextual_heads.json)")
    ap.add_argument("--ks", type=int, nargs="+", default=[10, 20], help="k grid of the validation selection")
    ap.add_argument("--n-train", type=int, default=200, help="train questions (attention objective: cached q/k)")
    ap.add_argument("--n-train-live", type=int, default=64,
                    help="train questions of the likelihood objective (a float32 forward + backward per example: "
                         "≈ 15-20 s each at 10 documents on this CPU)")
    ap.add_argument("--n-train-val", type=int, default=12, help="validation examples for early stopping")
    ap.add_argument("--n-val", type=int, default=40, help="validation questions that choose k and α")
    ap.add_argument("--n", type=int, default=40, help="test questions (the first n of the test split)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--report", action="store_true", help="tables from what is recorded: no training, test cells only to their recorded n")
    ap.add_argument("--out", type=Path, default=OUT, help="directions, selection records, budgets, report")
    ap.add_argument("--chunk", type=int, default=8, help="test conditions advance together this many examples at a time")
    ap.add_argument("--selected", type=Path, default=None,
                    help="take k and α from this selection-*.json of an earlier run (e.g. the bfloat16 one) "
                         "instead of choosing them on validation again")
    ap.add_argument("--records", type=Path, default=rd.RESULTS,
                    help="test records (shared with experiments/real_distraction.py)")
    a = ap.parse_args(argv)
    selected = None
    if a.selected is not None:  # checked before anything loads: a bad file costs nothing
        try:
            selected = json.loads(a.selected.read_text())
        except (OSError, ValueError) as e:
            print(f"error: --selected {a.selected}: cannot read it as JSON ({e}); pass a selection-*.json that "
                  "experiments/real_directions.py wrote", file=sys.stderr)
            return 2
        missing = [f"{o}_s{s}" for o in a.objectives for s in a.seeds
                   if not isinstance(selected.get(f"{o}_s{s}"), dict) or not {"k", "alpha"} <= set(selected[f"{o}_s{s}"])]
        if missing:
            print(f"error: --selected {a.selected} has no k and α for {', '.join(missing)} (it has "
                  f"{', '.join(selected) or 'none'}); leave --selected out to choose them on validation", file=sys.stderr)
            return 2
    torch.set_num_threads(a.threads)
    try:
        (tr_path, tr_id), (va_path, va_id), (te_path, te_id) = (rd.data_file(a, s)
                                                                for s in ("train", "validation", "test"))
    except rd.MissingSets as e:
        print(e, file=sys.stderr)
        return 2
    train = load_litm(tr_path)[: max(a.n_train, a.n_train_live)]
    val_all = load_litm(va_path)
    val_train, val_sel = val_all[-a.n_train_val:], val_all[: a.n_val]  # disjoint: early stopping vs selection
    test = load_litm(te_path)[: a.n]
    model = load_model(dtype=getattr(torch, a.dtype), verbose=False)
    key_model = model_identity(model)
    heads = load_heads(ROOT / "figures" / "contextual_heads.json", k=a.k_max, model=model)
    train_model = load_model(dtype=torch.float32, verbose=False)  # training in float32; applied at --dtype
    key_train = {"model": model_identity(train_model), "train": tr_id, "val": va_id, "n_train_val": a.n_train_val}
    rd_args = argparse.Namespace(out=a.records, max_new_tokens=a.max_new_tokens, n=a.n, chunk=a.chunk,
                                 batch_size=a.batch_size, kind=a.kind, n_docs=a.n_docs, k=a.k_max, tau=ORACLE_TAU,
                                 random_seeds=[])
    t0 = time.time()
    conds = rd.conditions(model, rd_args)  # unmodified, gold only, the oracle (split softmax, top-k, τ): shared records
    selections: dict[str, dict] = {}
    val_budgets: dict[str, dict] = {}
    for obj in a.objectives:
        for seed in a.seeds:
            name = f"{obj}_s{seed}"
            n_tr = a.n_train_live if CONFIGS[obj]["objective"] == "likelihood" else a.n_train
            d = train_or_load(a, train_model, obj, seed, heads, {**key_train, "n_train": n_tr}, train[:n_tr], val_train)
            if d is None:
                continue
            if selected is not None:  # k and α as chosen on validation by an earlier run (another dtype, say)
                sel_k, sel_alpha = int(selected[name]["k"]), float(selected[name]["alpha"])
                selections[name] = {**selected[name], "from": str(a.selected.name)}
            else:
                sel_dir = a.out / "select" / f"{obj}_s{seed}-{d.payload_checksum()[:12]}"
                sel = select_alpha(model, d, val_sel, alphas=ALPHAS[obj], ks=a.ks, max_new_tokens=a.max_new_tokens,
                                   output_dir=sel_dir, progress=False, batch_size=a.batch_size)
                sel_k, sel_alpha = sel.k, sel.alpha
                selections[name] = {**sel.to_dict(), "norm": float(d.top(sel.k).norms().mean())}
                print(f"[real_directions] {name} selected k={sel.k} α={sel.alpha} (val {sel.best_fixed['accuracy']:.3f}"
                      f" vs {sel.baseline:.3f} unmodified; {time.time() - t0:.0f} s)", flush=True)
                if 1.0 in ALPHAS[obj] and len(d) in a.ks:  # the training setting, read back from the selection
                    val_budgets[f"{name}_k{len(d)}_a1 (validation)"] = training_setting_budget(
                        model, d, val_sel, sel_dir, a, key_model, va_id)
            spec = Steer(d, k=sel_k, alpha=sel_alpha)
            tag = f"{name}_k{sel_k}_a{sel_alpha:g}"
            conds += [(f"directions_{tag}", "original", spec),
                      (f"random_vectors_{tag}", "original", Steer(random_like(d.top(sel_k), seed=seed), alpha=sel_alpha)),
                      (f"directions_{tag}_gold_only", "gold_only", spec)]
    if not a.report:
        rd.advance_together(model, test, conds, rd_args, key_model, te_id, log="real_directions")
    cells: dict[str, dict] = {}
    for cname, variant, spec in conds:
        res = rd.read_condition(model, test, cname, variant, spec, rd_args, key_model, te_id)
        if res is not None:
            cells[cname] = {"n": len(res.records), "em": [float(r["em"]) for r in res.records],
                            "summary": res.summary(), "predictions": res.predictions, "spec": spec}
    budgets = {c: budget(model, test, cells, c, a, key_model, te_id) for c in list(cells)
               if c.startswith("directions_") and not c.endswith("_gold_only")}
    oracle = rd.attention_budget(model, test, cells, conds, rd_args, key_model, te_id)  # cached by real_distraction
    oracle_name = next(c for c, _, _ in conds if c.startswith("split_softmax_top"))
    test_budgets = {**({oracle_name: oracle} if oracle else {}), **budgets}
    budgets.update(val_budgets)
    text = report(cells, selections, budgets, a, te_id) + "\n".join(rd.share_lines(test_budgets)) + "\n"
    atomic_write(a.out / rd.output_name(a, "report", "md"), text)
    atomic_write_json(a.out / rd.output_name(a, "selection", "json"), selections)
    print(text)
    return 0


def budget(model, test, cells, cname: str, a, key_model, data) -> dict:
    """Per example: the directions' heads' mass (gold / sink / distractors), unmodified vs under them."""
    if "unmodified" not in cells:
        return {}
    spec, c, u = cells[cname]["spec"], cells[cname], cells["unmodified"]
    n = min(u["n"], c["n"])
    return rd.cached_budget(model, test[:n], spec, [tuple(h) for h in spec.directions.heads], cname, a, key_model,
                            data, before=(lambda: u["predictions"], u["em"]), after=(lambda: c["predictions"], c["em"]))


def training_setting_budget(model, d: FocusDirections, val, sel_dir: Path, a, key_model, data) -> dict:
    """Where the attention goes with every trained head at the training α (1): on the validation
    questions, from the answers ``select_alpha`` recorded (read back, not generated again)."""
    data_id = examples_identity(val)
    read = lambda tag, spec: evaluate(  # noqa: E731
        model, val, intervene=spec, max_new_tokens=a.max_new_tokens, progress=False, batch_size=a.batch_size,
        output=selection_record(sel_dir, tag, spec, data_id, max_new_tokens=a.max_new_tokens), tag=tag)
    full = Steer(d, k=len(d), alpha=1.0)
    before, after = read("unmodified", None), read(f"k{len(d)}_a1", full)
    em = lambda res: [float(r["em"]) for r in res.records]  # noqa: E731
    return rd.cached_budget(model, val, full, [tuple(h) for h in d.heads], f"k{len(d)}_a1 (validation)", a,
                            key_model, data, before=(lambda: before.predictions, em(before)),
                            after=(lambda: after.predictions, em(after)))


def report(cells: dict, selections: dict, budgets: dict, a, data: dict) -> str:
    base, gold = cells.get("unmodified"), cells.get("gold_only")
    lines = [f"NQ-open test split, {a.n_docs} real documents ({a.kind} distractors), SmolLM2-135M-Instruct "
             f"({a.dtype}); directions trained on {a.n_train} (attention) / {a.n_train_live} (likelihood) train "
             f"questions; k, α chosen on {a.n_val} validation questions"
             f"{f' (in the run of `{a.selected.name}`)' if a.selected else ''}; `{data['file']}` sha256 "
             f"{data['sha256'][:12]}; command: `python experiments/real_directions.py --kind {a.kind} --n-docs {a.n_docs} "
             f"--n {a.n} --objectives {' '.join(a.objectives)}"
             f"{'' if a.dtype == 'bfloat16' else ' --dtype ' + a.dtype}"
             f"{f' --selected {a.selected}' if a.selected else ''}`", "",
             "| condition | n | accuracy ± SE | Δ (paired) ± SE | wins / losses |", "|---|---|---|---|---|"]
    for cname, r in cells.items():
        s = r["summary"]
        ref = gold if cname.endswith("_gold_only") else base
        cell = f"| {cname} | {r['n']} | {s['accuracy']:.3f} ± {s['accuracy_se']:.3f} | "
        if ref is None or r is ref or cname == "gold_only":
            cell += "— | — |"
        else:
            m = min(r["n"], ref["n"])  # paired on the examples both have
            p = paired_difference(r["em"][:m], ref["em"][:m])
            vs = "gold only" if ref is gold else "unmodified"
            cell += f"{100 * p.mean:+.1f} ± {100 * p.se:.1f} pts vs {vs} (n={p.n}) | {p.wins} / {p.losses} |"
        lines.append(cell)
    if selections:
        lines += ["", "Validation selection (accuracy on the validation questions):", "",
                  "| directions | k | α | val accuracy | val unmodified | mean ‖u‖ (k heads) |", "|---|---|---|---|---|---|"]
        for name, s in selections.items():
            best = max((r for r in s["rows"] if r["k"] == s["k"] and r["alpha"] == s["alpha"]),
                       key=lambda r: r["accuracy"])
            lines.append(f"| {name} | {s['k']} | {s['alpha']:g} | {best['accuracy']:.3f} ± {best['stderr']:.3f} "
                         f"(n={best['n']}) | {s['baseline']:.3f} | {s['norm']:.2f} |")
    for cname, b in budgets.items():
        if b:
            lines += rd.budget_lines(b, f"Where the {len(b['heads'])} steered heads' attention goes under `{cname}` "
                                     f"(mean mass from the answer tokens, n = {b['n']}):", "directions")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
