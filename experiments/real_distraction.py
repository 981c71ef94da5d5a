"""Real distraction on held-out NQ documents: the baselines and the ceilings (issue 19, part 3 begun).

    python experiments/real_documents.py                                      # the sets (once, ≈ 4.5 min)
    nice -n 19 python experiments/real_distraction.py --n 40                  # resumable; ≈ 3 s / generation here
    python experiments/real_distraction.py --n 40 --report                    # the table from finished records

On the **test** split of ``experiments/real_documents.py`` (``nq-{kind}{N}-test``, gold cycling over
positions, 530 questions none of which is trained on), with SmolLM2-135M-Instruct (``--dtype``, default
bfloat16 as ``experiments/figures.py``), greedy, ≤ ``--max-new-tokens`` 16, best-subspan EM:

* unmodified; gold only (the gold passage alone: what the model can do without distraction);
* split softmax on the top-k contextual heads (``figures/contextual_heads.json``, ranked on
  **synthetic** data) at τ — the oracle ceiling: it is given the gold span;
* the same on k random heads (seeds 0, 1, 2; ``focuslens.evaluation.sweeps.random_heads``) — the control;
* **where the attention goes** (part 4 of the issue, for the oracle): the top-k heads' mean attention
  mass from the answer tokens (the condition's own answer) on the gold passage, the sink (first token)
  and all distractors, unmodified and under the oracle, per example — how much attention a label-free
  vector would have to move to match the oracle, and whether the examples it fixes are those where
  the most mass moved. Cached in ``budget-<hash>.json`` (same content key + the heads).

Every condition is one JSONL under ``experiments/results/real_distraction/`` (tracked), named by a
content hash of the model identity, the data file's sha256 (from the sets' ``manifest.json``), the
intervention's identity and the decoding settings; the first n of one fixed list, so a larger ``--n``
extends a smaller run. Δ are paired on the same examples (``focuslens.tasks.paired_difference``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from focuslens.evaluation.runner import evaluate  # noqa: E402
from focuslens.core.io import atomic_write, atomic_write_json, content_hash  # noqa: E402
from focuslens.core.models import load_model, model_identity  # noqa: E402
from focuslens.score.ranking import load_heads  # noqa: E402
from focuslens.intervene.span_specs import SplitSoftmax  # noqa: E402
from focuslens.evaluation.sweeps import random_heads  # noqa: E402
from focuslens.tasks import load_litm, mean_se, paired_difference, render  # noqa: E402

RESULTS = ROOT / "experiments" / "results" / "real_distraction"


def record_path(a, key_model: dict, data: dict, cname: str, variant: str, spec) -> Path:
    """A condition's JSONL, named by the content that produced it (model, data file, intervention, decoding)."""
    key = content_hash({"model": key_model, "data": data, "variant": variant,
                        "intervene": None if spec is None else spec.identity, "max_new_tokens": a.max_new_tokens})
    return a.out / f"{cname}-{key[:12]}.jsonl"


class MissingSets(Exception):
    """The real-document sets are not written yet (the message says the command that writes them)."""


def data_file(a, split: str) -> tuple[Path, dict]:
    """A set's path and identity (file name + sha256 from ``manifest.json`` of ``a.sets``)."""
    name = f"nq-{a.kind}{a.n_docs}-{split}.jsonl.gz"
    manifest = a.sets / "manifest.json"
    files = json.loads(manifest.read_text())["files"] if manifest.is_file() else {}
    if name not in files:
        raise MissingSets(f"error: {a.sets / name} is not there; write the sets first: "
                          "python experiments/real_documents.py")
    return a.sets / name, {"file": name, "sha256": files[name]["sha256"]}


def output_name(a, stem: str, ext: str) -> str:
    """A report's file name: ``{stem}-{kind}{N}.{ext}``, plus ``-{dtype}`` for a dtype other than the
    default bfloat16 (so that a float32 run never overwrites the bfloat16 report, and vice versa)."""
    return f"{stem}-{a.kind}{a.n_docs}{'' if a.dtype == 'bfloat16' else '-' + a.dtype}.{ext}"


def records_done(p: Path) -> int:
    """Examples already recorded in an ``evaluate`` JSONL (its first line is the config header)."""
    return max(0, len(p.read_text().splitlines()) - 1) if p.exists() else 0


def advance_together(model, test, conds, a, key_model, data, *, log: str) -> None:
    """Evaluate every condition on the first ``a.n`` examples, ``a.chunk`` examples at a time for all
    of them together: a run stopped early leaves every condition at (nearly) the same n, so paired
    differences use all that was spent. Resumes each condition's content-keyed JSONL."""
    t0 = time.time()
    for m in range(a.chunk, a.n + a.chunk, a.chunk):
        m = min(m, a.n)
        for cname, variant, spec in conds:
            p = record_path(a, key_model, data, cname, variant, spec)
            if records_done(p) < m:
                evaluate(model, test[:m], variant=variant, intervene=spec, max_new_tokens=a.max_new_tokens,
                         output=p, tag=data, progress=False, batch_size=a.batch_size)
        print(f"[{log}] {len(conds)} conditions at n={m} ({time.time() - t0:.0f} s)", flush=True)


def read_condition(model, test, cname: str, variant: str, spec, a, key_model, data):
    """A condition's recorded results on the first min(recorded, ``a.n``) examples (no generation), or None."""
    p = record_path(a, key_model, data, cname, variant, spec)
    have = min(records_done(p), a.n)
    if not have:
        return None
    return evaluate(model, test[:have], variant=variant, intervene=spec, max_new_tokens=a.max_new_tokens,
                    output=p, tag=data, progress=False, batch_size=a.batch_size)


def conditions(model, a) -> list[tuple[str, str, object]]:
    """``(name, variant, spec)`` in priority order: baselines, the oracle ceiling, then the controls."""
    top = load_heads(ROOT / "figures" / "contextual_heads.json", k=a.k, model=model)
    out = [("unmodified", "original", None), ("gold_only", "gold_only", None),
           (f"split_softmax_top{a.k}_tau{a.tau}", "original", SplitSoftmax(top, a.tau))]
    out += [(f"split_softmax_random{a.k}_seed{s}_tau{a.tau}", "original", SplitSoftmax(random_heads(model, a.k, seed=s), a.tau))
            for s in a.random_seeds]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", type=Path, default=ROOT / "runs" / "real_documents",
                    help="folder written by experiments/real_documents.py")
    ap.add_argument("--kind", default="random", choices=["random", "hard"])
    ap.add_argument("--n-docs", type=int, default=10)
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--tau", type=float, default=0.2)
    ap.add_argument("--random-seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=8, help="conditions advance together this many examples at a time")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--report", action="store_true", help="no generation: the table from the finished records")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    try:
        test_path, data = data_file(a, "test")
    except MissingSets as e:
        print(e, file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    test = load_litm(test_path)[: a.n]
    model = load_model(dtype=getattr(torch, a.dtype), verbose=False)
    key_model = model_identity(model)
    conds = conditions(model, a)
    results: dict[str, dict] = {}

    if not a.report:
        advance_together(model, test, conds, a, key_model, data, log="real_distraction")
    for cname, variant, spec in conds:
        res = read_condition(model, test, cname, variant, spec, a, key_model, data)
        if res is not None:
            results[cname] = {"n": len(res.records), "em": [float(r["em"]) for r in res.records],
                              "summary": res.summary()}
    budget = attention_budget(model, test, results, conds, a, key_model, data) if "unmodified" in results else None
    text = report(results, a, data, budget)
    atomic_write(a.out / output_name(a, "report", "md"), text)
    print(text)
    return 0


def _masses(model, r, response: str, heads) -> dict[str, float]:
    """The heads' mean mass from the response rows on the gold passage, the sink and the distractors."""
    from focuslens.score.contextual import score_spans

    p = r.prompt.with_response(model.tokenizer, response or " ")
    hs = score_spans(model, p.tokens, response=p.response, spans={"gold": r.relevant}, distractors=r.distractors,
                     sink=1, method="pattern")
    pick = lambda t: float(torch.stack([t[l, h] for l, h in heads]).mean())  # noqa: E731
    return {"gold": pick(hs.scores["gold"]), "sink": pick(hs.scores["sink"]),
            "distractors": pick(hs.scores["distractors_total"])}


def attention_budget(model, test, results, conds, a, key_model, data) -> dict:
    """Per example: the top-k heads' mass (gold / sink / distractors) unmodified and under the oracle."""
    oracle = next(((c, s) for c, _, s in conds if c.startswith("split_softmax_top")), None)
    if oracle is None or oracle[0] not in results:
        return {}
    cname, spec = oracle
    n = min(results["unmodified"]["n"], results[cname]["n"])
    preds = lambda c: _predictions(model, test[:n], a, data, key_model, c, conds)  # noqa: E731
    return cached_budget(model, test[:n], spec, spec.heads, cname, a, key_model, data,
                         before=(lambda: preds("unmodified"), results["unmodified"]["em"]),
                         after=(lambda: preds(cname), results[cname]["em"]))


def cached_budget(model, examples, spec, heads, cname: str, a, key_model, data, *, before, after) -> dict:
    """The heads' mass per example, unmodified (answers ``before``) and under ``spec`` (answers ``after``).

    ``before`` / ``after`` are ``(answers thunk, em list)``: the answers are read only when the budget is
    not cached yet. Stored in ``a.out / budget-<kind><N>-<hash>.json``, the hash covering the model, the
    data file, the spec's identity, n and the decoding budget.
    """
    n = len(examples)
    key = content_hash({"model": key_model, "data": data, "spec": spec.identity, "n": n,
                        "max_new_tokens": a.max_new_tokens})
    path = a.out / f"budget-{a.kind}{a.n_docs}-{key[:12]}.json"
    if path.exists():
        return json.loads(path.read_text())
    preds_b, preds_a = before[0](), after[0]()
    rows = []
    with torch.inference_mode():
        for i, ex in enumerate(examples):
            r = render(ex, model.tokenizer)
            mb = _masses(model, r, preds_b[i], heads)
            with spec.attach(model, r):
                ma = _masses(model, r, preds_a[i], heads)
            rows.append({"id": ex.id, "before": mb, "after": ma, "em_before": before[1][i], "em_after": after[1][i]})
    out = {"condition": cname, "n": n, "heads": [list(h) for h in heads], "rows": rows}
    atomic_write_json(path, out)
    return out


def budget_lines(budget: dict, title: str, column: str) -> list[str]:
    """Markdown: mean mass on gold / sink / distractors before and after, paired Δ ± SE, and the gain split
    by whether the condition fixed the example."""
    rows = budget.get("rows") or []
    if not rows:
        return []
    lines = ["", title, "", f"| mass on | unmodified | {column} | Δ (paired) |", "|---|---|---|---|"]
    for part in ("gold", "sink", "distractors"):
        b = [r["before"][part] for r in rows]
        o = [r["after"][part] for r in rows]
        (mb, sb), (mo, so) = mean_se(b), mean_se(o)
        p = paired_difference(o, b)
        lines.append(f"| {part} | {mb:.3f} ± {sb:.3f} | {mo:.3f} ± {so:.3f} | {p.mean:+.3f} ± {p.se:.3f} |")
    fixed = [r for r in rows if r["em_after"] > r["em_before"]]
    rest = [r for r in rows if not r["em_after"] > r["em_before"]]
    gain = lambda rs: mean_se([r["after"]["gold"] - r["before"]["gold"] for r in rs])  # noqa: E731
    if fixed and rest:
        (mf, sf), (mr, sr) = gain(fixed), gain(rest)
        lines += ["", f"Gold-mass gain on the {len(fixed)} examples it fixes: {mf:+.3f} ± {sf:.3f}; on the "
                  f"other {len(rest)}: {mr:+.3f} ± {sr:.3f}."]
    return lines + gain_tercile_lines(rows)


def gain_tercile_lines(rows: list[dict]) -> list[str]:
    """Attention gained vs accuracy gained, per example: the examples split into thirds by their gold-mass
    gain (smallest first), each third's mean gain and paired Δ accuracy ± SE (fixed / broken counts)."""
    if len(rows) < 6:
        return []
    order = sorted(rows, key=lambda r: r["after"]["gold"] - r["before"]["gold"])
    cuts = [0, len(order) // 3, 2 * len(order) // 3, len(order)]
    lines = ["", "Per example, by gold-mass gain (thirds of the examples, smallest gain first):", "",
             "| third | n | gold-mass gain | accuracy unmodified → after | Δ accuracy (paired) | fixed / broken |",
             "|---|---|---|---|---|---|"]
    for i, name in enumerate(("lowest", "middle", "highest")):
        part = order[cuts[i]:cuts[i + 1]]
        g, _ = mean_se([r["after"]["gold"] - r["before"]["gold"] for r in part])
        p = paired_difference([r["em_after"] for r in part], [r["em_before"] for r in part])
        acc = lambda key: sum(r[key] for r in part) / len(part)  # noqa: E731
        lines.append(f"| {name} | {len(part)} | {g:+.3f} | {acc('em_before'):.3f} → {acc('em_after'):.3f} | "
                     f"{100 * p.mean:+.1f} ± {100 * p.se:.1f} pts | {p.wins} / {p.losses} |")
    return lines


def share_lines(budgets: dict[str, dict], bins=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0001)) -> list[str]:
    """How accuracy depends on where the heads look, pooled over conditions: every (example, state) of
    every budget — unmodified and under each intervention — binned by the heads' **gold share** of the
    context mass, gold / (gold + distractors), with the accuracy of the answer given in that state.
    States are not independent (each example appears once per state): the SE is descriptive. The
    unmodified state of an example is counted once per head set: budgets on the same heads (the oracle
    and directions on the same top-k) share it."""
    share = lambda m: m["gold"] / max(m["gold"] + m["distractors"], 1e-9)  # noqa: E731
    pts, seen = [], set()
    for b in filter(None, budgets.values()):
        heads = tuple(map(tuple, b.get("heads") or ()))
        for r in b.get("rows", []):
            key = (heads, r.get("id"))
            states = ("before", "after") if key not in seen else ("after",)
            if heads and key[1] is not None:
                seen.add(key)
            pts += [(share(r[st]), r[f"em_{st}"]) for st in states]
    if not pts:
        return []
    lines = ["", f"Accuracy by the steered heads' gold share of the context mass, gold / (gold + distractors), pooled "
             f"over {', '.join(f'`{c}`' for c, b in budgets.items() if b)} (each example unmodified and under the "
             "intervention):", "", "| gold share | states | accuracy ± SE |", "|---|---|---|"]
    for lo, hi in zip(bins[:-1], bins[1:]):
        em = [e for sh, e in pts if lo <= sh < hi]
        if em:
            m, se = mean_se(em)
            lines.append(f"| {lo:.1f}–{min(hi, 1.0):.1f} | {len(em)} | {m:.3f} ± {se:.3f} |")
    return lines


def _predictions(model, examples, a, data, key_model, cname, conds) -> list[str]:
    """A finished condition's answers (read back from its records: nothing is generated)."""
    for c, v, s in conds:
        if c == cname:
            res = evaluate(model, examples, variant=v, intervene=s, max_new_tokens=a.max_new_tokens,
                           output=record_path(a, key_model, data, c, v, s), tag=data, progress=False,
                           batch_size=a.batch_size)
            return res.predictions
    raise KeyError(cname)


def report(results: dict, a, data: dict, budget: dict | None = None) -> str:
    base = results.get("unmodified")
    lines = [f"NQ-open test split, {a.n_docs} real documents ({a.kind} distractors), SmolLM2-135M-Instruct "
             f"({a.dtype}); `{data['file']}` sha256 {data['sha256'][:12]}; command: "
             f"`python experiments/real_distraction.py --kind {a.kind} --n-docs {a.n_docs} --n {a.n}`", "",
             "| condition | n | accuracy ± SE | Δ vs unmodified (paired) ± SE | wins / losses |", "|---|---|---|---|---|"]
    for cname, r in results.items():
        s = r["summary"]
        cell = f"| {cname} | {r['n']} | {s['accuracy']:.3f} ± {s['accuracy_se']:.3f} | "
        if base is None or cname == "unmodified":
            cell += "— | — |"
        else:
            p = paired_difference(r["em"], base["em"])
            cell += f"{100 * p.mean:+.1f} ± {100 * p.se:.1f} pts (n={p.n}) | {p.wins} / {p.losses} |"
        lines.append(cell)
    if budget:
        lines += budget_lines(budget, f"Where the top-{len(budget['heads'])} heads' attention goes (mean mass from "
                              f"the answer tokens, n = {budget['n']}; `{budget['condition']}` is the oracle):", "oracle")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
