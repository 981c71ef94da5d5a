"""The figures that need focus directions: ``positions`` and ``fig4`` of ``experiments/figures.py``.

Run them through ``experiments/figures.py`` (shared options, ranking and caches); this module holds
their protocol:

* directions are trained once per objective on the top-``max(--ks)`` contextual heads (ranked on the
  training examples) and cached by content under ``experiments/results/figures/directions/`` (model fingerprint and weights digest,
  heads, objective, training data and settings); ``Steer(d, k=k)`` is their top-k subset. Settings
  are those of ``experiments/generalisation.py`` (docs/directions.md): likelihood objective on the gold
  answer sentence (1 epoch, lr 1e-2, no norm cap); attention objective (the paper's) on the model's
  gold-only answers, norm cap = query norm, early stopping (patience 5).
* α is chosen on the validation split (:func:`focuslens.evaluation.sweeps.select_alpha`, positive α only) and
  marked on the figure; the test split is never used to choose anything.
"""

from __future__ import annotations

import shutil
from typing import Any

import torch

from focuslens.core.io import content_hash
from focuslens.core.models import model_info
from focuslens.plot.figures import Series, curves
from focuslens.intervene.span_specs import SplitSoftmax
from focuslens.directions.artefact import Steer
from focuslens.tasks import make_synthetic_qa, render

from figures import ACC, Ctx, _baseline_objs, _baselines, _pm, _save, _strip, add_panel, advance  # noqa: E402


def _splits(ctx: Ctx) -> tuple[list, list]:
    a = ctx.args
    train = make_synthetic_qa(a.n_train, n_docs=a.n_docs, seed=a.rank_seed + 1)
    val = make_synthetic_qa(a.n_val, n_docs=a.n_docs, seed=a.rank_seed + 2)
    return train, val


def directions_for(ctx: Ctx, objective: str):
    """Trained focus directions on the top-``max(ks)`` heads for ``objective`` (cached by content)."""
    from focuslens import directions as fd

    a, model = ctx.args, ctx.model
    if a.directions is not None:
        d = fd.FocusDirections.load(a.directions)
        d.check_model(model)
        return d
    heads = ctx.ranking[: min(max(a.ks), len(ctx.ranking))]
    train, val = _splits(ctx)
    key = content_hash({"model": ctx.model_key, "heads": [list(h) for h in heads],
                        "objective": objective, "train": [e.id for e in train], "val": [e.id for e in val],
                        "n_docs": a.n_docs, "max_new_tokens": a.max_new_tokens, "seed": 0})
    path = ctx.run_dir / "directions" / f"{objective}-{key[:16]}"
    if (path / "config.json").exists():
        return fd.FocusDirections.load(path)
    ctx.log(f"training {objective} directions on {len(heads)} heads, {len(train)} examples")
    ckpt = ctx.run_dir / "directions" / f"ckpt-{objective}-{key[:16]}"  # resumes an interrupted training
    if objective == "likelihood":
        tr = fd.make_direction_examples(model, train, responses=[e.gold.text for e in train])
        va = fd.make_direction_examples(model, val[:12], responses=[e.gold.text for e in val[:12]])
        d = fd.train_focus_directions(model, tr, heads=heads, objective="likelihood", val_examples=va, lr=1e-2,
                                      epochs=1, max_norm=None, seed=0, progress=False,
                                      checkpoint_dir=ckpt)
    else:
        tr = fd.make_direction_examples(model, train, max_new_tokens=a.max_new_tokens)
        va = fd.make_direction_examples(model, val, max_new_tokens=a.max_new_tokens)
        d = fd.train_focus_directions(model, tr, heads=heads, objective="attention", val_examples=va, patience=5,
                                      seed=0, progress=False)
    d.save(path)
    shutil.rmtree(ckpt, ignore_errors=True)  # the saved artefact supersedes it (and is what is tracked)
    ctx.log(f"trained {objective} directions: {d.training.get('train_seconds')} s")
    return d


def _select(ctx: Ctx, d, objective: str, ks: list[int]):
    from focuslens.evaluation.sweeps import select_alpha

    a = ctx.args
    _, val = _splits(ctx)
    pos = [x for x in a.alphas if x > 0]
    return select_alpha(ctx.model, d, val, alphas=pos, ks=ks, max_new_tokens=a.max_new_tokens, progress=False,
                        output_dir=ctx.run_dir / "fig4" / f"select-{objective}", batch_size=a.batch_size)


# --------------------------------------------------------------------------------------------------
# Figure 4: accuracy vs α, k ∈ ks, both objectives, matched-norm random control, validation α marked
# --------------------------------------------------------------------------------------------------


def fig4(ctx: Ctx) -> dict:
    from plotly.subplots import make_subplots

    from focuslens.directions import random_like

    a = ctx.args
    test = ctx.test()
    data = {"task": "synthetic_qa", "seed": a.seed, "n_docs": a.n_docs}
    base = advance(ctx, _baselines(ctx, test, data), a.n)
    res: dict[str, Any] = {"baselines": {k: _strip(v) for k, v in base.items()}, "objectives": {}}
    alphas = sorted(a.alphas)
    fig = make_subplots(rows=1, cols=len(a.objectives), shared_yaxes=True,
                        subplot_titles=[f"{o} objective" for o in a.objectives])
    shown: set = set()
    lines = [f"n = {a.n} held-out examples per point (seed {a.seed}), {a.n_docs} documents; directions trained on "
             f"the top-{max(a.ks)} heads; α chosen on {a.n_val} validation examples (positive α only).", "",
             "| objective | directions | k | " + " | ".join(f"α={x:g}" for x in alphas) + " |",
             "|---|---|---|" + "---|" * len(alphas)]
    for c, obj in enumerate(a.objectives, start=1):
        d = directions_for(ctx, obj)
        ks = [k for k in a.ks if k <= len(d)]
        sel = _select(ctx, d, obj, ks)
        rnd = random_like(d, seed=0)
        conds = []
        for k in ks:
            for x in alphas:
                conds.append((f"learned|{k}|{x}", lambda m, k=k, x=x, obj=obj, d=d: ctx.ev(
                    "fig4", f"{obj}_k{k}_a{x:g}", test[:m], spec=Steer(d, k=k, alpha=x), data=data)))
                if x > 0:
                    conds.append((f"random|{k}|{x}", lambda m, k=k, x=x, obj=obj, rnd=rnd: ctx.ev(
                        "fig4", f"{obj}_random_k{k}_a{x:g}", test[:m], spec=Steer(rnd, k=k, alpha=x), data=data)))
        out = {"learned": {}, "random": {}, "selection": sel.to_dict()}
        for name, v in advance(ctx, conds, a.n).items():
            kind, k, x = name.split("|")
            out[kind].setdefault(k, {})[x] = _strip(v)
        res["objectives"][obj] = out
        series = []
        for i, k in enumerate(ks):
            ys = [out["learned"][str(k)][str(x)] for x in alphas]
            series.append(Series(f"learned directions, top-{k} heads", "focus_directions", [y["accuracy"] for y in ys],
                                 [y["accuracy_se"] for y in ys], [y["n"] for y in ys], variant=i))
            rs = [out["random"][str(k)].get(str(x)) for x in alphas]
            nan = float("nan")
            series.append(Series(f"random matched norm, {k} heads", "random_directions",
                                 [r["accuracy"] if r else nan for r in rs], [r["accuracy_se"] if r else nan for r in rs],
                                 [r["n"] if r else 0 for r in rs], variant=i))
            lines.append(f"| {obj} | learned | {k} | " + " | ".join(_pm(y) for y in ys) + " |")
            lines.append(f"| {obj} | random, matched norm | {k} | " + " | ".join(_pm(r) if r else "–" for r in rs) + " |")
        sub = curves(alphas, series, baselines=_baseline_objs(base), xaxis="α", yaxis=ACC, title="",
                     marks={f"validation-chosen α={sel.alpha:g} (k={sel.k})": float(sel.alpha)})
        add_panel(fig, sub, col=c, shown=shown)
        fig.add_vline(x=float(sel.alpha), line={"dash": "dot", "color": "#555"}, row=1, col=c,
                      annotation_text=f"val-chosen α={sel.alpha:g}, k={sel.k}")
        fig.update_xaxes(title_text="α (steering strength; negative = opposite direction)", row=1, col=c)
        lines.append(f"| {obj} | validation choice | {sel.k} | α = {sel.alpha:g} (val accuracy "
                     f"{max(r['accuracy'] for r in sel.rows if r['k'] == sel.k and r['alpha'] == sel.alpha):.3f}, "
                     f"unmodified {sel.baseline:.3f}, n={a.n_val}) |" + " |" * (len(alphas) - 1))
    fig.update_yaxes(title_text=ACC, row=1, col=1)
    fig.update_layout(template="plotly_white", width=1300, height=600, legend={"font": {"size": 10}},
                      yaxis={"range": [-0.02, 1.02]},
                      title={"font": {"size": 15}, "text": f"Figure 4 · focus directions: accuracy vs α (n={a.n} per point)<br>"
                                     f"<sub>{ctx.name}, {a.n_docs} documents · error bars ± 1 SE · baselines unmodified {_pm(base['original'])}, gold only "
                                     f"{_pm(base['gold_only'])}, negative {_pm(base['negative'])} (n={a.n})</sub>"})
    res.update(n=a.n, ks=list(a.ks), alphas=alphas)
    _save(ctx, fig, "fig4_focus_directions_alpha", res, "\n".join(lines))
    return res


# --------------------------------------------------------------------------------------------------
# Positions: accuracy and the top heads' attention vs gold position (lost in the middle)
# --------------------------------------------------------------------------------------------------


def _gold_mass(ctx: Ctx, examples: list, pos: int, predictions: list[str], heads) -> tuple[float, float]:
    """Mean over examples of the top heads' mean attention mass on the gold document (own answers)."""
    from focuslens.score.contextual import score_spans
    from focuslens.tasks.metrics import mean_se

    vals = []
    for e, pred in zip(examples, predictions):
        if not pred.strip():
            continue
        r = render(e, ctx.model.tokenizer, gold_position=pos)
        p = r.prompt.with_response(ctx.model.tokenizer, pred)
        hs = score_spans(ctx.model, p.tokens, response=p.response, spans={"relevant": r.relevant}, sink=1)
        vals.append(float(torch.stack([hs.scores["relevant"][l, h] for l, h in heads]).mean()))
    return mean_se(vals) if vals else (float("nan"), float("nan"))


def positions(ctx: Ctx) -> dict:
    from plotly.subplots import make_subplots

    a = ctx.args
    heads = ctx.ranking[: a.k]
    ss = SplitSoftmax(heads, a.tau)
    d = directions_for(ctx, "likelihood")  # shared with fig4 (same cache key)
    fd_spec = Steer(d, k=min(a.k, len(d)), alpha=a.alpha)
    res: dict[str, Any] = {"k": a.k, "tau": a.tau, "alpha": a.alpha, "n": a.n, "by_docs": {}}
    fig = make_subplots(rows=2, cols=len(a.doc_counts), shared_xaxes=False, vertical_spacing=0.12,
                        subplot_titles=[f"{nd} documents: accuracy" for nd in a.doc_counts]
                        + [f"{nd} documents: top-{a.k} heads' attention on the gold document" for nd in a.doc_counts])
    shown: set = set()
    lines = [f"n = {a.n} held-out examples per position (seed {a.seed}; the same examples at every position); "
             f"split softmax τ={a.tau} and likelihood focus directions α={a.alpha} on the top-{a.k} heads (ranked on "
             f"{a.n_rank} {a.n_docs}-document training examples).", ""]
    for c, nd in enumerate(a.doc_counts, start=1):
        test = make_synthetic_qa(a.n, n_docs=nd, seed=a.seed)
        data = {"task": "synthetic_qa", "seed": a.seed, "n_docs": nd}
        conds = []
        for p in range(nd):
            for kind, tag, spec in (("unmodified", "unmodified", None), ("split_softmax", "ss", ss),
                                    ("focus_directions", "fd", fd_spec)):
                conds.append((f"{kind}|{p}", lambda m, p=p, tag=tag, spec=spec, nd=nd, test=test, data=data: ctx.ev(
                    "positions", f"d{nd}_p{p}_{tag}", test[:m], spec=spec, gold_position=p, data=data)))
        done = advance(ctx, conds, a.n)
        out: dict[str, Any] = {}
        for name, v in done.items():
            kind, p = name.split("|")
            out.setdefault(kind, {})[p] = v
        mass = [_gold_mass(ctx, test, p, out["unmodified"][str(p)]["predictions"], heads) for p in range(nd)]
        out = {kind: {p: _strip(v) for p, v in pts.items()} for kind, pts in out.items()}
        out["attention_mass"] = {str(p): {"mean": m, "se": s} for p, (m, s) in enumerate(mass)}
        res["by_docs"][str(nd)] = out
        xs = list(range(1, nd + 1))
        labels = {"unmodified": "unmodified", "split_softmax": f"split softmax, top-{a.k}, τ={a.tau}",
                  "focus_directions": f"focus directions (likelihood), top-{a.k}, α={a.alpha}"}
        series = [Series(labels[kind], kind, [out[kind][str(p)]["accuracy"] for p in range(nd)],
                         [out[kind][str(p)]["accuracy_se"] for p in range(nd)], a.n)
                  for kind in ("unmodified", "split_softmax", "focus_directions") if kind in out]
        att = Series(f"top-{a.k} heads' mass on gold (unmodified)", "unmodified", [m for m, _ in mass], [s for _, s in mass], a.n,
                     variant=1)
        for row, ss_ in ((1, series), (2, [att])):
            add_panel(fig, curves(xs, ss_, xaxis="gold position", yaxis=ACC, title="", y_range=None), row=row, col=c,
                      shown=shown)
        fig.update_xaxes(title_text="gold document position (1 = first)", tickvals=xs, row=2, col=c)
        fig.update_xaxes(tickvals=xs, row=1, col=c)
        lines += [f"**{nd} documents**", "", "| condition | " + " | ".join(f"p{p}" for p in xs) + " |",
                  "|---|" + "---|" * nd]
        for kind in ("unmodified", "split_softmax", "focus_directions"):
            if kind in out:
                lines.append(f"| {labels[kind]} | " + " | ".join(f"{out[kind][str(p)]['accuracy']:.2f}" for p in range(nd)) + " |")
        lines.append(f"| top-{a.k} mass on gold | " + " | ".join(f"{m:.3f}" for m, _ in mass) + " |")
        lines.append("")
    fig.update_yaxes(title_text=ACC, row=1, col=1)
    fig.update_yaxes(range=[-0.02, 1.02], row=1)
    fig.update_yaxes(title_text="attention mass on gold doc (fraction)", row=2, col=1)
    fig.update_layout(template="plotly_white", width=1300, height=900, legend={"font": {"size": 10}},
                      title={"font": {"size": 15}, "text": f"Lost in the middle · accuracy and attention vs gold position "
                                     f"(n={a.n} per point)<br><sub>{ctx.name} · error bars ± 1 SE (accuracy: binomial; mass: over examples)</sub>"})
    _save(ctx, fig, "positions", res, "\n".join(lines))
    return res


COMMANDS = {"fig4": fig4, "positions": positions}
