"""The paper's figures, one named command each, resumable, in one visual style (focuslens.plot.figures).

    python experiments/figures.py headview            # one prompt, top heads × documents, before/after
    python experiments/figures.py fig3 --n 40         # split softmax: k × τ, top-k vs random heads
    python experiments/figures.py ablation --n 40     # zero / mean ablation of top-k vs random heads
    python experiments/figures.py positions --n 20    # accuracy and attention vs gold position
    python experiments/figures.py fig4 --n 40         # focus directions: accuracy vs α (expensive)
    python experiments/figures.py <command> --quick   # tiny random model, n = 2: tests the code path

Protocol shared by every command (SmolLM2-135M-Instruct, synthetic multi-document QA, chat template,
greedy decoding, best-subspan EM): heads are ranked by the contextual score on ``--n-rank`` *training*
examples (``--rank-seed``), every figure evaluates on ``--n`` held-out examples (``--seed``), and
random heads are :func:`focuslens.evaluation.sweeps.random_heads` (seeds 0, 1, 2).

Resumable and content-keyed: every condition is one JSONL file under ``experiments/results/figures/<command>/`` (tracked in git) named
``{condition}-{hash}.jsonl``; the hash covers the model fingerprint, the intervention's identity, the
data and the decoding settings, so a changed ranking or another data set never resumes another's
records. Conditions advance together ``--chunk`` examples at a time (paired on the same examples), so
a run stopped early has all conditions of a group at one n; ``--n <that n>`` then draws the figure
from the finished records without generating anything. Figures go to ``figures/<name>.{html,png}``
and the numbers to ``experiments/results/figures/<name>.json`` and ``.md``. ``--dtype`` (default bfloat16)
enters every key. Run long jobs politely:

    nice -n 19 .venv/bin/python experiments/figures.py fig3 --n 40 > /tmp/fig3.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from focuslens.evaluation.runner import evaluate  # noqa: E402
from focuslens.core.io import atomic_write, atomic_write_json, content_hash  # noqa: E402
from focuslens.core.models import model_identity, model_info  # noqa: E402
from focuslens.plot.figures import Baseline, Series, curves, head_doc_view, save_figure  # noqa: E402
from focuslens.intervene.specs import Ablate  # noqa: E402
from focuslens.intervene.span_specs import SplitSoftmax  # noqa: E402
from focuslens.evaluation.sweeps import random_heads  # noqa: E402
from focuslens.tasks import make_synthetic_qa, render  # noqa: E402

# Tracked in git: the records are content-keyed, small (one JSON line per example) and what the figures
# are drawn from, so a fresh clone redraws every figure and a later session resumes instead of starting over.
RUN_DIR = ROOT / "experiments" / "results" / "figures"
FIG_DIR = ROOT / "figures"
ACC = "accuracy (best-subspan EM, fraction of examples)"
DEFAULT_KS, DEFAULT_TAUS, DEFAULT_SEEDS = [1, 5, 10, 20, 50], [0.1, 0.2, 0.5], [0, 1, 2]
FIG4_KS = [5, 10, 20, 50]  # Figure 4's k grid (issue 16: k ∈ {5, 10, 20, 50})


# --------------------------------------------------------------------------------------------------
# Shared set-up: model, ranking on training examples, held-out test examples, resumable evaluation
# --------------------------------------------------------------------------------------------------


@dataclass
class Ctx:
    """What every command shares: the model, the ranking, the test data and a resumable evaluator."""

    args: argparse.Namespace
    model: Any
    run_dir: Path
    fig_dir: Path
    ranking: list[tuple[int, int]] = field(default_factory=list)
    t0: float = field(default_factory=time.time)
    _model_key: dict | None = None

    @property
    def model_key(self) -> dict:
        """The model's identity in every cache key: architecture fingerprint + weights digest (which
        covers the dtype, so a bfloat16 run never resumes float32 records)."""
        if self._model_key is None:
            self._model_key = model_identity(self.model)
        return self._model_key

    @property
    def name(self) -> str:
        return "tiny-llama (random weights, --quick)" if self.args.quick else model_info(self.model).name

    def log(self, msg: str) -> None:
        print(f"[figures {self.args.command}] {msg} ({time.time() - self.t0:.0f} s)", flush=True)

    def test(self, n_docs: int | None = None) -> list:
        a = self.args
        return make_synthetic_qa(a.n, n_docs=n_docs or a.n_docs, seed=a.seed)

    def ev(self, family: str, name: str, examples: list, *, spec=None, variant: str = "original",
           gold_position: int | None = None, data: dict) -> dict:
        """Evaluate ``examples`` under ``spec`` into a content-keyed, resumable JSONL; return the summary.

        ``data`` identifies the example *generator* (seed, n_docs), not the list, so that growing
        prefixes of the same list append to one file.
        """
        a = self.args
        key = content_hash({"model": self.model_key, "intervene": None if spec is None else spec.identity,
                            "data": data, "variant": variant, "gold_position": gold_position,
                            "max_new_tokens": a.max_new_tokens})
        kw = {} if gold_position is None else {"gold_position": gold_position}
        path = self.run_dir / family / f"{name}-{key[:12]}.jsonl"
        if a.partial:  # draw from finished records only: this point's n is what finished (maybe 0)
            have = max(0, len(path.read_text().splitlines()) - 1) if path.exists() else 0
            examples = examples[: min(have, len(examples))]
            if not examples:
                nan = float("nan")
                return {"n": 0, "accuracy": nan, "accuracy_se": nan, "distractor_copy": nan,
                        "distractor_copy_se": nan, "predictions": [], "partial": True}
        res = evaluate(self.model, examples, variant=variant, intervene=spec, max_new_tokens=a.max_new_tokens,
                       output=path, tag=data, progress=False, batch_size=a.batch_size, **kw)
        s = res.summary()
        out = {k: s[k] for k in ("n", "accuracy", "accuracy_se", "distractor_copy", "distractor_copy_se")}
        out["predictions"] = res.predictions
        out["partial"] = bool(a.partial)
        return out


def _rank(ctx: Ctx) -> list[tuple[int, int]]:
    """Heads ranked by the dataset contextual score on the training examples (cached by content)."""
    from focuslens.score.contextual import score_dataset

    a, model = ctx.args, ctx.model
    key = content_hash({"model": ctx.model_key, "n_docs": a.n_docs, "seed": a.rank_seed,
                        "n": a.n_rank, "max_new_tokens": a.max_new_tokens})
    path = ctx.run_dir / f"ranking-{key[:16]}.json"
    if path.exists():
        info = json.loads(path.read_text())
    else:
        ctx.log(f"ranking heads on {a.n_rank} training examples (seed {a.rank_seed})")
        ex = make_synthetic_qa(a.n_rank, n_docs=a.n_docs, seed=a.rank_seed)
        rendered = [render(e, model.tokenizer) for e in ex]
        ds = score_dataset(model, rendered, response="generate", max_new_tokens=a.max_new_tokens, progress=False)
        info = {"n_rank": ds.n, "rank_seed": a.rank_seed, "n_docs": a.n_docs,
                "ranking": [[int(l), int(h), float(s)] for l, h, s in ds.ranking("relevant")]}
        atomic_write_json(path, info, indent=None)
    ranking = [(int(l), int(h)) for l, h, _ in info["ranking"]]
    ctx.log(f"top-10 heads (ranked on n={info['n_rank']} training examples): {ranking[:10]}")
    return ranking


def advance(ctx: Ctx, conditions: list[tuple[str, Callable[[int], dict]]], n: int) -> dict[str, dict]:
    """Run ``conditions`` (name, fn(n) -> summary) together, ``--chunk`` examples at a time."""
    steps = [n] if ctx.args.partial else list(range(ctx.args.chunk, n, ctx.args.chunk)) + [n]
    out: dict[str, dict] = {}
    for m in steps:
        for name, fn in conditions:
            out[name] = fn(m)
        ctx.log(f"{len(conditions)} conditions done up to n={m}")
    return out


def _seed_mean(per_seed: list[dict]) -> dict:
    """Random-heads point: mean over seeds; SE = sqrt(Σ SE_s²) / S (example sampling), sd over seeds."""
    per_seed = [d for d in per_seed if d["n"] > 0] or per_seed[:1]  # --partial: seeds with records
    accs = [d["accuracy"] for d in per_seed]
    m = sum(accs) / len(accs)
    se = math.sqrt(sum(d["accuracy_se"] ** 2 for d in per_seed)) / len(per_seed)
    sd = math.sqrt(sum((x - m) ** 2 for x in accs) / (len(accs) - 1)) if len(accs) > 1 else float("nan")
    return {"accuracy": m, "accuracy_se": se, "seed_sd": sd, "per_seed": accs, "n": min(d["n"] for d in per_seed),
            "partial": per_seed[0].get("partial", False)}


def _baselines(ctx: Ctx, test: list, data: dict) -> list[tuple[str, Callable[[int], dict]]]:
    """Unmodified, gold-only and negative prompts: stored once under ``baselines/``, shared by every figure."""
    return [(v, (lambda m, v=v: ctx.ev("baselines", f"baseline_{v}", test[:m], variant=v, data=data)))
            for v in ("original", "gold_only", "negative")]


def _baseline_objs(res: dict) -> list[Baseline]:
    names = {"original": ("unmodified", "unmodified"), "gold_only": ("gold only", "gold_only"),
             "negative": ("distractors only", "negative")}
    return [Baseline(names[v][0], names[v][1], res[v]["accuracy"], res[v]["accuracy_se"], res[v]["n"])
            for v in ("gold_only", "original", "negative") if v in res]


def add_panel(fig, sub, *, row: int = 1, col: int, shown: set) -> None:
    """Copy the traces of figure ``sub`` into one subplot; each legend entry is shown once per figure."""
    for tr in sub.data:
        if tr.showlegend is not False:
            tr.showlegend = tr.name not in shown
            shown.add(tr.name)
        fig.add_trace(tr, row=row, col=col)


def _save(ctx: Ctx, fig, stem: str, results: dict, md: str) -> None:
    results = json.loads(json.dumps(results, default=str))
    results["command"] = "python experiments/figures.py " + " ".join(ctx.args.argv)
    results["wall_seconds"] = round(time.time() - ctx.t0, 1)
    atomic_write_json(ctx.run_dir / f"{stem}.json", results)
    atomic_write(ctx.run_dir / f"{stem}.md", md + "\n")
    paths = save_figure(fig, ctx.fig_dir / stem, formats=ctx.args.formats)
    # the figure as plotly JSON and its table, so notebooks/05_paper_figures.ipynb shows them without a model
    atomic_write(ctx.fig_dir / f"{stem}.plotly.json", fig.to_json())
    atomic_write(ctx.fig_dir / f"{stem}.md", f"`{results['command']}` ({results['wall_seconds']:.0f} s)\n\n{md}\n")
    paths += [ctx.fig_dir / f"{stem}.plotly.json", ctx.fig_dir / f"{stem}.md"]
    print(md, flush=True)
    ctx.log(f"wrote {[str(p) for p in paths]} and {ctx.run_dir / stem}.json/.md")


def _pm(d: dict) -> str:
    if d["n"] == 0:
        return "not run"
    return f"{d['accuracy']:.3f} ± {d['accuracy_se']:.3f}" + (f" (n={d['n']})" if d.get("partial") else "")


def _strip(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "predictions"}


# --------------------------------------------------------------------------------------------------
# Figure 3: split softmax on top-k contextual heads vs k random heads, k × τ
# --------------------------------------------------------------------------------------------------


def fig3(ctx: Ctx) -> dict:
    """Accuracy vs k for every τ: top-k contextual heads and k random heads (3 seeds), 3 baselines."""
    a, model = ctx.args, ctx.model
    test = ctx.test()
    data = {"task": "synthetic_qa", "seed": a.seed, "n_docs": a.n_docs}
    ks = [k for k in a.ks if k <= len(ctx.ranking)]
    taus = list(a.taus)
    # priority groups (a run stopped early has the most important ones at full n): the baselines; top-20
    # vs 20 random heads at τ = 0.2 (the claim); the other k at τ = 0.2; then each other τ
    t0 = 0.2 if 0.2 in taus else taus[0]
    k0 = 20 if 20 in ks else ks[-1]
    groups = [(t0, [k0]), (t0, [k for k in ks if k != k0])] + [(t, ks) for t in taus if t != t0]
    res: dict[str, Any] = {"baselines": {}, "top": {}, "random": {}}
    base = advance(ctx, _baselines(ctx, test, data), a.n)
    res["baselines"] = {k: _strip(v) for k, v in base.items()}
    for tau, gks in groups:
        if not gks:
            continue
        conds = []
        for k in gks:
            conds.append((f"top|{k}|{tau}", lambda m, k=k, tau=tau: ctx.ev(
                "fig3", f"top{k}_tau{tau}", test[:m], spec=SplitSoftmax(ctx.ranking[:k], tau), data=data)))
            for s in a.random_seeds:
                conds.append((f"random|{k}|{tau}|{s}", lambda m, k=k, tau=tau, s=s: ctx.ev(
                    "fig3", f"random{k}_seed{s}_tau{tau}", test[:m],
                    spec=SplitSoftmax(random_heads(model, k, seed=s), tau), data=data)))
        done = advance(ctx, conds, a.n)
        for name, d in done.items():
            parts = name.split("|")
            if parts[0] == "top":
                res["top"].setdefault(str(tau), {})[parts[1]] = _strip(d)
            else:
                res["random"].setdefault(str(tau), {}).setdefault(parts[1], []).append(_strip(d))
    for tau, pts in res["random"].items():
        for k in list(pts):
            pts[k] = _seed_mean(pts[k])
    n_note = f"n={a.n} per point" if not a.partial else f"n ≤ {a.n} per point, each in the legend"
    series = []
    for i, tau in enumerate(taus):
        top = [res["top"][str(tau)][str(k)] for k in ks]
        rnd = [res["random"][str(tau)][str(k)] for k in ks]
        series.append(Series(f"top-k contextual heads, τ={tau}", "split_softmax", [d["accuracy"] for d in top],
                             [d["accuracy_se"] for d in top], [d["n"] for d in top], variant=i))
        series.append(Series(f"k random heads, τ={tau} (mean of {len(a.random_seeds)} seeds)", "random_heads",
                             [d["accuracy"] for d in rnd], [d["accuracy_se"] for d in rnd], [d["n"] for d in rnd],
                             variant=i))
    fig = curves(ks, series, baselines=_baseline_objs(base), log_x=True, x_ticks=[str(k) for k in ks],
                 xaxis="k (heads edited by split softmax, log scale)", yaxis=ACC,
                 title=f"Figure 3 · split softmax on the top-k contextual heads vs k random heads ({n_note})",
                 subtitle=f"{ctx.name}, {a.n_docs} documents, held-out examples; heads ranked on {a.n_rank} training examples")
    lines = [f"{n_note} held-out examples (seed {a.seed}), {a.n_docs} documents; heads ranked on "
             f"{a.n_rank} training examples (seed {a.rank_seed}); random heads: seeds {a.random_seeds} "
             "(mean; ± = sqrt(Σ SE²)/S, sd over seeds in brackets).", "",
             "| condition | τ | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|---|" + "---|" * len(ks)]
    for v in ("original", "gold_only", "negative"):
        lines.append(f"| baseline {v} | – | {_pm(base[v])} |" + " |" * (len(ks) - 1))
    for tau in taus:
        lines.append(f"| top-k contextual | {tau} | " + " | ".join(_pm(res["top"][str(tau)][str(k)]) for k in ks) + " |")
        lines.append(f"| k random heads | {tau} | " + " | ".join(
            f"{_pm(d)} (sd {d['seed_sd']:.2f})" for d in (res["random"][str(tau)][str(k)] for k in ks)) + " |")
    res.update(n=a.n, ks=ks, taus=taus, n_rank=a.n_rank, top_heads=ctx.ranking[: max(ks)])
    _save(ctx, fig, "fig3_split_softmax", res, "\n".join(lines))
    return res


# --------------------------------------------------------------------------------------------------
# Ablation: zero / mean ablation of the top-k heads vs k random heads (necessity)
# --------------------------------------------------------------------------------------------------


def ablation(ctx: Ctx) -> dict:
    """Accuracy vs k under zero and mean ablation, top-k contextual vs k random heads, 2 prompt kinds."""
    from focuslens.heads.patching import head_means

    a, model = ctx.args, ctx.model
    info = model_info(model)
    test = ctx.test()
    data = {"task": "synthetic_qa", "seed": a.seed, "n_docs": a.n_docs}
    ks = [k for k in a.ks if k <= len(ctx.ranking)]
    # head means over the *training* prompts (never the test ones): the mean-ablation reference
    ref = [render(e, model.tokenizer).tokens for e in make_synthetic_qa(a.n_rank, n_docs=a.n_docs, seed=a.rank_seed)]
    means = head_means(model, [(l, h) for l in range(info.n_layers) for h in range(info.n_heads)], ref)

    def spec(heads, mode):
        return Ablate(heads, mode=mode, means={h: means[h] for h in heads} if mode == "mean" else None)

    res: dict[str, Any] = {}
    base = advance(ctx, _baselines(ctx, test, data), a.n)
    res["baselines"] = {k: _strip(v) for k, v in base.items()}
    for variant in a.variants:
        conds = []
        for mode in a.modes:
            for k in ks:
                conds.append((f"{variant}|{mode}|top|{k}", lambda m, k=k, mode=mode, variant=variant: ctx.ev(
                    "ablation", f"{variant}_{mode}_top{k}", test[:m], spec=spec(ctx.ranking[:k], mode),
                    variant=variant, data=data)))
                for s in a.random_seeds:
                    conds.append((f"{variant}|{mode}|random|{k}|{s}", lambda m, k=k, mode=mode, s=s, variant=variant:
                                  ctx.ev("ablation", f"{variant}_{mode}_random{k}_seed{s}", test[:m],
                                         spec=spec(random_heads(model, k, seed=s), mode), variant=variant, data=data)))
        for name, d in advance(ctx, conds, a.n).items():
            p = name.split("|")
            slot = res.setdefault(p[0], {}).setdefault(p[1], {"top": {}, "random": {}})
            if p[2] == "top":
                slot["top"][p[3]] = _strip(d)
            else:
                slot["random"].setdefault(p[3], []).append(_strip(d))
        for mode in a.modes:
            r = res[variant][mode]["random"]
            for k in list(r):
                r[k] = _seed_mean(r[k])
    from plotly.subplots import make_subplots

    titles = {"original": "all documents (distractor task)", "gold_only": "gold document only"}
    fig = make_subplots(rows=1, cols=len(a.variants), subplot_titles=[titles[v] for v in a.variants], shared_yaxes=True)
    shown: set = set()
    lines = [f"n = {a.n} held-out examples per point (seed {a.seed}), {a.n_docs} documents; heads ranked on "
             f"{a.n_rank} training examples; mean ablation: each head's mean output over the {len(ref)} training "
             f"prompts; random heads: seeds {a.random_seeds} (mean; ± = sqrt(Σ SE²)/S).", "",
             "| prompts | ablation | heads | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|---|---|" + "---|" * len(ks)]
    for c, variant in enumerate(a.variants, start=1):
        series = []
        for i, mode in enumerate(a.modes):
            top = [res[variant][mode]["top"][str(k)] for k in ks]
            rnd = [res[variant][mode]["random"][str(k)] for k in ks]
            series.append(Series(f"{mode} ablation, top-k contextual", f"ablation_{mode}", [d["accuracy"] for d in top],
                                 [d["accuracy_se"] for d in top], [d["n"] for d in top], variant=0))
            series.append(Series(f"{mode} ablation, k random heads", "random_heads", [d["accuracy"] for d in rnd],
                                 [d["accuracy_se"] for d in rnd], [d["n"] for d in rnd], variant=i))
            lines.append(f"| {variant} | {mode} | top-k | " + " | ".join(_pm(d) for d in top) + " |")
            lines.append(f"| {variant} | {mode} | random | " + " | ".join(_pm(d) for d in rnd) + " |")
        bl = [b for b in _baseline_objs(base) if (b.condition == "unmodified") == (variant == "original")
              and b.condition != "negative"]
        add_panel(fig, curves(ks, series, baselines=bl, xaxis="k", yaxis=ACC, title=""), col=c, shown=shown)
        fig.update_xaxes(type="log", tickvals=ks, ticktext=[str(k) for k in ks], title_text="k (heads ablated, log scale)",
                         row=1, col=c)
    fig.update_yaxes(title_text=ACC, row=1, col=1)
    fig.update_layout(template="plotly_white", width=1200, height=560, legend={"font": {"size": 10}},
                      yaxis={"range": [-0.02, 1.02]},
                      title={"text": f"Ablation · top-k contextual heads vs k random heads knocked out "
                                     f"({f'n ≤ {a.n} per point, each in the legend' if a.partial else f'n={a.n} per point'})"
                                     f"<br><sub>{ctx.name}, {a.n_docs} documents · error bars ± 1 SE · baselines (n="
                                     f"{base['original']['n']}): unmodified {base['original']['accuracy']:.3f} ± "
                                     f"{base['original']['accuracy_se']:.3f}, gold only {base['gold_only']['accuracy']:.3f} ± "
                                     f"{base['gold_only']['accuracy_se']:.3f}</sub>",
                             "font": {"size": 15}})
    res.update(n=a.n, ks=ks, modes=list(a.modes), variants=list(a.variants))
    _save(ctx, fig, "ablation_curves", res, "\n".join(lines))
    return res


# --------------------------------------------------------------------------------------------------
# Head view: one prompt, top-k heads × documents, before / after split softmax
# --------------------------------------------------------------------------------------------------


def doc_masses(model, r, response: str, heads) -> torch.Tensor:
    """``[k, n_docs]`` mean attention mass of ``heads`` from the response rows on each document.

    The attention pattern is read at ``hook_pattern`` *after* any intervention attached earlier (hooks
    run in registration order), so under split softmax this is the edited attention.
    """
    from focuslens.score.contextual import score_spans

    p = r.prompt.with_response(model.tokenizer, response)
    docs = {f"doc_{i + 1}": r.prompt[f"doc_{i + 1}"] for i in range(r.n_docs)}
    hs = score_spans(model, p.tokens, response=p.response, spans=docs, sink=1, method="pattern")
    return torch.stack([torch.stack([hs.scores[f"doc_{i + 1}"][l, h] for i in range(r.n_docs)]) for l, h in heads])


def _doc_hover(r) -> list[str]:
    out = []
    for i, d in enumerate(r.example.ctxs):
        words = " ".join(d.text.split()[:8])
        out.append(f"{i + 1}. <b>{d.title}</b>{' (gold)' if i == r.example.gold_index else ''}<br>{words} …")
    return out


def headview(ctx: Ctx) -> dict:
    """One example: the top-k heads' attention mass per document, unmodified and under split softmax."""
    a, model = ctx.args, ctx.model
    ex = make_synthetic_qa(a.example + 1, n_docs=a.n_docs, seed=a.seed)[a.example]
    r = render(ex, model.tokenizer)
    heads = ctx.ranking[: a.k]
    spec = SplitSoftmax(heads, a.tau)
    data = {"task": "synthetic_qa", "seed": a.seed, "n_docs": a.n_docs, "example": a.example}
    before = ctx.ev("headview", "unmodified", [r], data=data)
    after = ctx.ev("headview", f"top{a.k}_tau{a.tau}", [r], spec=spec, data=data)
    ans_b = before["predictions"][0] or " "
    ans_a = after["predictions"][0] or " "
    with torch.inference_mode():
        mb = doc_masses(model, r, ans_b, heads)
        with spec.attach(model, r):
            ma = doc_masses(model, r, ans_a, heads)
    g = r.example.gold_index
    fig = head_doc_view(mb, after=ma, heads=heads, docs=_doc_hover(r), gold=g,
                        after_label=f"split softmax on these {a.k} heads, τ={a.tau}",
                        title=f"Head view · attention mass from the answer on each document (n=1 example, gold = doc {g + 1})"
                              f"<br><sub>{ctx.name}, {a.n_docs} documents; top-{a.k} heads ranked on {a.n_rank} training "
                              f"examples · {ex.question} gold {ex.answers[0]!r}<br>answer unmodified {ans_b.strip()!r} · "
                              f"under split softmax {ans_a.strip()!r}</sub>")
    res = {"example": ex.id, "question": ex.question, "answers": ex.answers, "gold_position": g,
           "heads": [list(h) for h in heads], "tau": a.tau, "answer_unmodified": ans_b, "answer_split_softmax": ans_a,
           "mass_unmodified": [[round(float(v), 4) for v in row] for row in mb],
           "mass_split_softmax": [[round(float(v), 4) for v in row] for row in ma]}
    gm_b, gm_a = float(mb[:, g].mean()), float(ma[:, g].mean())
    md = (f"Example {ex.id} (gold = document {g + 1} of {a.n_docs}); top-{a.k} heads (ranked on {a.n_rank} training "
          f"examples). Mean mass of these heads on the gold document: unmodified {gm_b:.3f}, split softmax τ={a.tau} "
          f"{gm_a:.3f}. Answers: unmodified {ans_b.strip()!r}, split softmax {ans_a.strip()!r}, gold {ex.answers[0]!r}.")
    res.update(gold_mass_unmodified=gm_b, gold_mass_split_softmax=gm_a)
    _save(ctx, fig, "headview", res, md)
    return res


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

COMMANDS: dict[str, Callable[[Ctx], dict]] = {"fig3": fig3, "ablation": ablation, "headview": headview}


def _load_model(args):
    if args.quick:
        from focuslens.testing import tiny_model

        return tiny_model("llama")
    import focuslens as fl

    return fl.load_model(args.model, dtype=getattr(torch, args.dtype), verbose=False)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, helptext in (("headview", "one prompt: top-k heads × documents, before/after split softmax"),
                           ("fig3", "split softmax: k × τ, top-k contextual vs k random heads, 3 baselines"),
                           ("ablation", "zero/mean ablation of top-k vs random heads, distractor and gold-only prompts"),
                           ("positions", "accuracy and top-head attention vs gold position (10 and 20 documents)"),
                           ("fig4", "focus directions: accuracy vs α for k ∈ {5,10,20,50}, both objectives")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--quick", action="store_true", help="tiny random model, n=2: exercises the code path in seconds")
        s.add_argument("--model", default=None, help="model name/path (default: the embedded SmolLM2-135M-Instruct)")
        s.add_argument("--n", type=int, default=40, help="held-out test examples per point (bar: >= 40)")
        s.add_argument("--n-docs", type=int, default=10)
        s.add_argument("--seed", type=int, default=0, help="seed of the held-out test examples")
        s.add_argument("--n-rank", type=int, default=30, help="training examples that rank the heads")
        s.add_argument("--rank-seed", type=int, default=1000, help="seed of the ranking (training) examples")
        s.add_argument("--ks", type=int, nargs="+", default=FIG4_KS if name == "fig4" else DEFAULT_KS)
        s.add_argument("--taus", type=float, nargs="+", default=DEFAULT_TAUS)
        s.add_argument("--random-seeds", type=int, nargs="+", default=DEFAULT_SEEDS)
        s.add_argument("--max-new-tokens", type=int, default=16)
        s.add_argument("--batch-size", type=int, default=8)
        s.add_argument("--chunk", type=int, default=8, help="examples per step when conditions advance together")
        s.add_argument("--threads", type=int, default=1)
        s.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                       help="parameter dtype [bfloat16: the model's published dtype; 1.3-1.5x faster generation than float32 on "
                            "CPUs with AMX, and what GPUs run; every cache key and figure records it]")
        s.add_argument("--run-dir", type=Path, default=RUN_DIR)
        s.add_argument("--fig-dir", type=Path, default=FIG_DIR)
        s.add_argument("--partial", action="store_true",
                       help="generate nothing: draw every point from the records that finished (n per point shown)")
        s.add_argument("--formats", nargs="+", default=["html", "png"], choices=["html", "png", "svg", "pdf"],
                       help="figure files to write (PNG needs kaleido + Chromium)")
        if name == "headview":
            s.add_argument("--example", type=int, default=0, help="index of the test example to show")
            s.add_argument("--k", type=int, default=10, help="top heads shown (and edited)")
            s.add_argument("--tau", type=float, default=0.2)
        if name == "ablation":
            s.add_argument("--modes", nargs="+", default=["zero", "mean"], choices=["zero", "mean"])
            s.add_argument("--variants", nargs="+", default=["original", "gold_only"], choices=["original", "gold_only"])
        if name in ("positions", "fig4"):
            s.add_argument("--directions", type=Path, default=None,
                           help="a trained FocusDirections folder to use instead of training (fig4/positions)")
        if name == "positions":
            s.add_argument("--doc-counts", type=int, nargs="+", default=[10, 20])
            s.add_argument("--k", type=int, default=20, help="top heads for split softmax and the attention curve")
            s.add_argument("--tau", type=float, default=0.2)
            s.add_argument("--alpha", type=float, default=1.0, help="α of the focus directions")
        if name in ("positions", "fig4"):
            s.add_argument("--n-train", type=int, default=128, help="direction-training examples (seed rank-seed + 1)")
            s.add_argument("--n-val", type=int, default=40, help="validation examples (seed rank-seed + 2)")
        if name == "fig4":
            s.add_argument("--alphas", type=float, nargs="+", default=[-1.0, -0.5, 0.25, 0.5, 1.0, 2.0])
            s.add_argument("--objectives", nargs="+", default=["likelihood", "attention"], choices=["likelihood", "attention"])
    return p


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    args.argv = argv
    if args.quick:  # the code path on a 2-layer × 4-head random model, in seconds
        args.n, args.n_docs, args.n_rank, args.max_new_tokens, args.chunk = 2, 3, 2, 3, 1
        # sweep lists: tiny ones unless given on the command line
        if args.ks in (DEFAULT_KS, FIG4_KS):
            args.ks = [1, 2]
        if args.taus == DEFAULT_TAUS:
            args.taus = [0.5, 0.2]
        if args.random_seeds == DEFAULT_SEEDS:
            args.random_seeds = [0, 1]
        if args.command in ("headview", "positions"):
            args.k = 2
        if args.command == "positions":
            args.doc_counts = [2, 3]
        args.n_train, args.n_val = 2, 2
        if args.command == "fig4":
            args.alphas = [-0.5, 0.5]
        # never into the tracked records and figures of the real model
        if args.run_dir == RUN_DIR:
            args.run_dir = ROOT / "runs" / "figures-quick"
        if args.fig_dir == FIG_DIR:
            args.fig_dir = ROOT / "runs" / "figures-quick" / "figs"
    if args.n < 1 or args.chunk < 1 or args.n_rank < 1:
        raise SystemExit("--n, --chunk and --n-rank must be >= 1.")
    torch.set_num_threads(args.threads)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    model = _load_model(args)
    ctx = Ctx(args=args, model=model, run_dir=args.run_dir, fig_dir=args.fig_dir)
    ctx.ranking = _rank(ctx)
    if args.command in ("positions", "fig4"):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import fig_directions

        return fig_directions.COMMANDS[args.command](ctx)
    return COMMANDS[args.command](ctx)


if __name__ == "__main__":
    main()
