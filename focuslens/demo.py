"""`focuslens demo`: the whole method on one model and one task, end to end, resumable.

Steps (each writes its result into the output folder and is skipped on a rerun when its result is
already there with the same configuration; evaluations also resume example by example from JSONL):

1. ``baselines``  — accuracy on the original (all documents), gold-only and negative prompts.
2. ``scores``     — contextual scores of every head on separate examples (the model's own answers);
                    head-location heatmap; the ranking as JSON.
3. ``split_softmax`` — split softmax on the top-k contextual heads for k × τ, with k random heads as
                    the control; ablation-curve figure.
4. ``directions`` — focus directions learned on separate training examples (validation split for
                    early stopping), saved as an artefact folder.
5. ``alpha``      — accuracy vs α with the learned directions (negative α included), the matched-norm
                    random control and this project's magnitude control (``alpha="auto"``) in its
                    calibrated per-input form (docs/directions.md): one α per input, shared by the heads,
                    such that their mean sink mass falls by the fraction that the reference α removes on
                    average over the *validation* prompts (``calibrate_sink_target``; no labels, nothing
                    chosen on test). The reference α is the positive α of the sweep, chosen on the
                    validation examples (``select_alpha``) when there are several.

Per-condition evaluation files are named ``runs/{name}-{hash}.jsonl``; the hash covers the
intervention spec's identity (:mod:`focuslens.intervene.specs`: heads and τ, or the directions' checksum and α),
the test data and the decoding budget, so a changed ranking, retrained directions or another data
configuration never resume another condition's records.

Example sizes are small by default so that the demo finishes in about ten minutes on a 2-core CPU;
``--full`` runs the larger protocol. Every number in the report carries its sample size and standard
error.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .core.checks import read_json
from .core.generation import DEFAULT_MAX_NEW_TOKENS
from .core.io import atomic_write, atomic_write_json, content_hash

__all__ = ["DemoConfig", "run_demo"]


@dataclass
class DemoConfig:
    model: str | None = None
    n_docs: int = 10
    n_rank: int = 12  # examples for contextual scoring
    n_train: int = 32  # focus-direction training examples
    n_val: int = 8  # validation (early stopping)
    n_test: int = 16  # held-out evaluation examples per condition
    ks: tuple[int, ...] = (5, 20)
    taus: tuple[float, ...] = (0.2,)
    random_ks: tuple[int, ...] = (20,)  # k values that get the random-heads control
    random_seeds: tuple[int, ...] = (0,)
    k_directions: int = 20
    alphas: tuple[float, ...] = (-0.5, 0.5)
    objective: str = "attention"
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    seed: int = 0
    threads: int | None = None  # torch CPU threads; None: torch's default (one per core)

    # The defaults that read a name (``model``, ``n_docs``...) take the field's default above: a default
    # is evaluated in the class body, where the field names are bound to their defaults.
    @classmethod
    def full(
        cls,
        *,
        model: str | None = model,
        n_docs: int = n_docs,
        n_rank: int = 100,
        n_train: int = 200,
        n_val: int = 50,
        n_test: int = 100,
        ks: tuple[int, ...] = (5, 10, 20, 50),
        taus: tuple[float, ...] = (0.2, 0.5),
        random_ks: tuple[int, ...] = (5, 10, 20, 50),
        random_seeds: tuple[int, ...] = (0, 1, 2),
        k_directions: int = k_directions,
        alphas: tuple[float, ...] = (-0.5, -0.2, 0.2, 0.5, 1.0),
        objective: str = objective,
        max_new_tokens: int = max_new_tokens,
        seed: int = seed,
        threads: int | None = threads,
    ) -> "DemoConfig":
        """The larger protocol of ``focuslens demo --full`` (more examples, k, τ, seeds and α); any field
        may still be set, as in ``DemoConfig(...)``."""
        return cls(
            model=model, n_docs=n_docs, n_rank=n_rank, n_train=n_train, n_val=n_val, n_test=n_test, ks=ks,
            taus=taus, random_ks=random_ks, random_seeds=random_seeds, k_directions=k_directions, alphas=alphas,
            objective=objective, max_new_tokens=max_new_tokens, seed=seed, threads=threads,
        )


class _Steps:
    """Named steps whose results are cached as JSON under ``out/steps`` (keyed by a config hash)."""

    def __init__(self, out: Path, cfg: DemoConfig):
        self.dir = out / "steps"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cfg_key = json.dumps(asdict(cfg), sort_keys=True, default=str)

    def run(self, name: str, fn: Callable[[], dict]) -> dict:
        path = self.dir / f"{name}.json"
        if path.exists():
            saved = read_json(path, what=f"a demo step's cached result (delete {path} to recompute it)")
            if isinstance(saved, dict) and saved.get("_config") == self.cfg_key:
                print(f"[demo] {name}: done earlier, reusing {path}")
                return saved
        t0 = time.time()
        print(f"[demo] {name} ...", flush=True)
        res = fn()
        res["_seconds"] = round(time.time() - t0, 1)
        res["_config"] = self.cfg_key
        atomic_write_json(path, res)
        print(f"[demo] {name}: {res['_seconds']:.0f} s", flush=True)
        return res


def _pm(m: float, se: float) -> str:
    return "n/a" if m is None or (isinstance(m, float) and math.isnan(m)) else f"{m:.2f} ± {se:.2f}"


def run_demo(cfg: DemoConfig, out: str | os.PathLike = "demo_output", *, figures_dir: str | os.PathLike | None = None) -> dict:
    """Run the pipeline; return all step results.

    Figures go to ``out/figures`` and, when ``figures_dir`` is given, also to
    ``figures_dir/demo_<name>.{html,png}``.
    """
    from . import directions as fd
    from .core.models import load_model, model_info
    from .score.contextual import DatasetScores

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    out = Path(out)
    figs = _Figures(out, figures_dir)
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    steps = _Steps(out, cfg)
    t_start = time.time()

    model = load_model(cfg.model)
    info = model_info(model)
    data = _DemoData(cfg, model.tokenizer)
    ev = _Evaluator(cfg, model, data, runs)

    # 1. Baselines ---------------------------------------------------------------------------------
    base = steps.run("baselines", lambda: {v: ev(f"baseline_{v}", variant=v) for v in ("original", "gold_only", "negative")})
    # 2. Contextual scores -------------------------------------------------------------------------
    scores = steps.run("scores", lambda: _scores_step(cfg, model, info.name, data.rank_ex, out, figs))
    full_rank = DatasetScores.load(out / "contextual_heads.json").top_k(info.n_layers * info.n_heads)
    # 3. Split softmax -----------------------------------------------------------------------------
    split = steps.run("split_softmax", lambda: _split_softmax_step(cfg, model, full_rank, ev))
    figs.save(_split_softmax_figure(cfg, split, base), "split_softmax_curve")
    # 4. Focus directions --------------------------------------------------------------------------
    dir_path = out / "focus_directions"
    trained = steps.run("directions", lambda: _train_step(cfg, model, fd, full_rank, data, out, dir_path))
    directions = fd.FocusDirections.load(dir_path)
    # 5. Alpha sweep -------------------------------------------------------------------------------
    # "alpha_calibrated": the magnitude control is the calibrated per-input one (the step name changed
    # with it, so a demo folder of an older version recomputes this step instead of reusing its result)
    alpha_res = steps.run("alpha_calibrated", lambda: _alpha_sweep(cfg, directions, model, ev, fd, data.val_ex, out))
    figs.save(_alpha_figure(cfg, alpha_res, base), "focus_directions_alpha")

    results = {"config": asdict(cfg), "model": info.name, "baselines": base, "scores": scores,
               "split_softmax": split, "directions": trained, "alpha": alpha_res,
               "wall_seconds": round(time.time() - t_start, 1)}
    report = _report(cfg, results)
    atomic_write(out / "report.md", report)
    atomic_write_json(out / "results.json", results)
    print(report)
    extra = figs.extra
    print(f"[demo] wrote {out / 'report.md'} and figures in {figs.dir}" + (f" and {extra}/demo_*" if extra else ""))
    return results


class _Figures:
    """Where the demo's figures go: ``out/figures``, and ``figures_dir`` (prefixed ``demo_``) when given."""

    def __init__(self, out: Path, figures_dir: str | os.PathLike | None):
        self.dir = out / "figures"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.extra = Path(figures_dir) if figures_dir else None
        if self.extra is not None:
            self.extra.mkdir(parents=True, exist_ok=True)

    def save(self, fig, name: str) -> None:
        from .plot.figures import save_figure

        save_figure(fig, self.dir / name)
        if self.extra is not None:  # e.g. the repo's figures/: prefixed so experiment figures stay apart
            save_figure(fig, self.extra / f"demo_{name}")


class _DemoData:
    """Disjoint example sets from one seeded pool: ranking, training, validation and test never overlap."""

    def __init__(self, cfg: DemoConfig, tok):
        from .evaluation.sweeps import examples_identity
        from .tasks import make_synthetic_qa, render

        n_total = cfg.n_rank + cfg.n_train + cfg.n_val + cfg.n_test
        pool = make_synthetic_qa(n_total, n_docs=cfg.n_docs, seed=cfg.seed)
        self.rank_ex = pool[: cfg.n_rank]
        self.train_ex = pool[cfg.n_rank : cfg.n_rank + cfg.n_train]
        self.val_ex = pool[cfg.n_rank + cfg.n_train : cfg.n_rank + cfg.n_train + cfg.n_val]
        self.test_ex = pool[cfg.n_rank + cfg.n_train + cfg.n_val :]
        self.test_r = [render(e, tok) for e in self.test_ex]
        self.data_id = {"model": cfg.model, "test": examples_identity(self.test_ex)}


class _Evaluator:
    """``ev(name, variant=..., spec=...)``: one condition on the test examples, resumable from
    ``runs/{name}-{hash}.jsonl`` (the hash covers the spec's identity, the test data and the budget)."""

    def __init__(self, cfg: DemoConfig, model, data: _DemoData, runs: Path):
        self.cfg, self.model, self.data, self.runs = cfg, model, data, runs

    def __call__(self, name: str, *, variant: str = "original", spec=None) -> dict:
        from .evaluation.runner import evaluate

        cfg, data = self.cfg, self.data
        key = content_hash({"intervene": None if spec is None else spec.identity, "data": data.data_id,
                            "variant": variant, "max_new_tokens": cfg.max_new_tokens})
        res = evaluate(
            self.model, data.test_ex if variant != "original" else data.test_r, variant=variant, intervene=spec,
            output=self.runs / f"{name}-{key[:12]}.jsonl", max_new_tokens=cfg.max_new_tokens, tag=data.data_id,
        )
        s = res.summary()
        return {k: s[k] for k in ("n", "accuracy", "accuracy_se", "distractor_copy", "distractor_copy_se")}


def _scores_step(cfg: DemoConfig, model, model_name: str, rank_ex, out: Path, figs: _Figures) -> dict:
    """Contextual scores of every head on the ranking examples: saved ranking, heatmap, summary."""
    from .plot.figures import head_heatmap
    from .score.contextual import score_dataset
    from .tasks import render

    ds = score_dataset(model, [render(e, model.tokenizer) for e in rank_ex], response="generate",
                       max_new_tokens=cfg.max_new_tokens)
    ds.save(out / "contextual_heads.json")
    fig = head_heatmap(ds.mean["relevant"], top_k=20,
                       title=f"Contextual scores: attention mass from the answer to the gold document "
                             f"({model_name}, {cfg.n_docs} docs, n={ds.n})")
    figs.save(fig, "contextual_heads")
    m = ds.mean["relevant"]
    top = ds.ranking()[:20]
    return {
        "n": ds.n, "n_skipped": ds.n_skipped,
        "top20": [[l, h, round(v, 4)] for l, h, v in top],
        "mean_head": float(m.mean()), "median_head": float(m.median()),
        "top20_share_of_total": float(sum(v for _, _, v in top) / m.sum()),
        "mean_sink": float(ds.mean["sink"].mean()) if "sink" in ds.mean else None,
    }


def _split_softmax_step(cfg: DemoConfig, model, full_rank, ev: _Evaluator) -> dict:
    """Split softmax on the top-k contextual heads for k × τ, and on k random heads (the control)."""
    from .evaluation.sweeps import random_heads
    from .intervene.span_specs import SplitSoftmax

    res: dict[str, Any] = {"top": {}, "random": {}}
    for tau in cfg.taus:
        for k in cfg.ks:
            res["top"][f"{k}|{tau}"] = ev(f"ss_top{k}_tau{tau}", spec=SplitSoftmax(full_rank[:k], tau))
        for s in cfg.random_seeds:
            for k in cfg.random_ks:
                res["random"][f"{k}|{tau}|{s}"] = ev(f"ss_rand{k}_tau{tau}_s{s}",
                                                     spec=SplitSoftmax(random_heads(model, k, seed=s), tau))
    return res


def _split_softmax_figure(cfg: DemoConfig, split: dict, base: dict):
    """Accuracy vs k for the top-k and the random heads (mean over seeds), with the baselines."""
    from .plot.figures import ablation_curve

    series = {}
    for tau in cfg.taus:
        ys = [split["top"][f"{k}|{tau}"] for k in cfg.ks]
        series[f"top-k contextual heads, τ={tau}"] = ([y["accuracy"] for y in ys], [y["accuracy_se"] for y in ys])
        ys_r = []
        for k in cfg.ks:
            if k not in cfg.random_ks:
                ys_r.append((float("nan"), float("nan")))
                continue
            vals = [split["random"][f"{k}|{tau}|{s}"]["accuracy"] for s in cfg.random_seeds]
            ses = [split["random"][f"{k}|{tau}|{s}"]["accuracy_se"] for s in cfg.random_seeds]
            ys_r.append((sum(vals) / len(vals), math.sqrt(sum(x * x for x in ses)) / len(ses)))
        series[f"k random heads, τ={tau}"] = ([y[0] for y in ys_r], [y[1] for y in ys_r])
    return ablation_curve(
        list(cfg.ks), series,
        baselines={"gold only": base["gold_only"]["accuracy"], "original": base["original"]["accuracy"],
                   "negative": base["negative"]["accuracy"]},
        xaxis="k (heads edited)", yaxis="accuracy (best-subspan EM)",
        title=f"Split softmax on the top-k contextual heads ({cfg.n_docs} docs, n={cfg.n_test} per point; "
              "error bars ± 1 SE)",
        conditions={**{name: ("split_softmax" if name.startswith("top-k") else "random_heads") for name in series},
                    "gold only": "gold_only", "original": "unmodified", "negative": "negative"},
    )


def _train_step(cfg: DemoConfig, model, fd, full_rank, data: _DemoData, out: Path, dir_path: Path) -> dict:
    """Focus directions on the top heads, trained with early stopping on the validation examples; saved."""
    heads = full_rank[: cfg.k_directions]
    train_d = fd.make_direction_examples(model, data.train_ex, max_new_tokens=cfg.max_new_tokens)
    val_d = fd.make_direction_examples(model, data.val_ex, max_new_tokens=cfg.max_new_tokens)
    d = fd.train_focus_directions(model, train_d, heads=heads, objective=cfg.objective,
                                  val_examples=val_d, seed=cfg.seed, patience=5,
                                  checkpoint_dir=out / "directions_ckpt")
    d.save(dir_path)
    return {"heads": [list(h) for h in d.heads], "objective": d.objective,
            "norms": [round(float(x), 3) for x in d.norms()],
            "training": json.loads(json.dumps(d.training, default=str))}


def _alpha_figure(cfg: DemoConfig, alpha_res: dict, base: dict):
    """Accuracy vs α: learned and matched-norm random directions, with the magnitude control as a baseline."""
    from .plot.figures import ablation_curve

    xs = list(cfg.alphas)
    return ablation_curve(
        xs,
        {
            "learned focus directions": ([alpha_res["learned"][str(a)]["accuracy"] for a in xs],
                                         [alpha_res["learned"][str(a)]["accuracy_se"] for a in xs]),
            "random, matched norm": ([alpha_res["random"].get(str(a), {}).get("accuracy", float("nan")) for a in xs],
                                     [alpha_res["random"].get(str(a), {}).get("accuracy_se", float("nan")) for a in xs]),
        },
        baselines={"original": base["original"]["accuracy"], "gold only": base["gold_only"]["accuracy"],
                   "magnitude control (α = auto, calibrated per input)": alpha_res["auto"]["accuracy"]},
        conditions={"learned focus directions": "focus_directions", "random, matched norm": "random_directions",
                    "original": "unmodified", "gold only": "gold_only",
                    "magnitude control (α = auto, calibrated per input)": "magnitude_control"},
        xaxis="α", yaxis="accuracy (best-subspan EM)",
        title=f"Focus directions on the top-{cfg.k_directions} heads ({cfg.objective} objective, n={cfg.n_test} per point; "
              "error bars ± 1 SE)",
    )

def _alpha_sweep(cfg: DemoConfig, directions, model, ev, fd, val_ex, out: Path) -> dict:
    from .directions.artefact import Steer
    from .evaluation.sweeps import select_alpha
    from .tasks import render

    res: dict[str, Any] = {"learned": {}, "random": {}}
    rnd = fd.random_like(directions, seed=cfg.seed)
    for a in cfg.alphas:
        res["learned"][str(a)] = ev(f"fd_{cfg.objective}_a{a}", spec=Steer(directions, alpha=a))
        if a > 0:
            res["random"][str(a)] = ev(f"fd_random_a{a}", spec=Steer(rnd, alpha=a))
    # Calibrated per-input magnitude control: the reference α comes from validation, never from test.
    pos = [a for a in cfg.alphas if a > 0]
    if not pos:
        raise ValueError(f"DemoConfig.alphas needs a positive α for the magnitude control; got {cfg.alphas}.")
    if len(pos) > 1:
        sel = select_alpha(model, directions, val_ex, alphas=pos, max_new_tokens=cfg.max_new_tokens,
                           progress=False, output_dir=out / "runs" / "select_alpha")
        a_ref, how = float(sel.best_fixed["alpha"]), f"chosen on {len(val_ex)} validation examples"
    else:
        a_ref, how = float(pos[0]), "the sweep's only positive α"
    prompts = [render(e, model.tokenizer).prompt.tokens for e in val_ex]
    target = fd.calibrate_sink_target(model, directions, prompts, alpha=a_ref)
    res["auto"] = ev(f"fd_{cfg.objective}_auto_input",
                     spec=Steer(directions, alpha="auto", per="input", target=target))
    res["auto_calibration"] = {"alpha": a_ref, "alpha_from": how, "target": target, "n_prompts": len(prompts)}
    return res


def _report(cfg: DemoConfig, r: dict) -> str:
    b = r["baselines"]
    L = [
        f"# focuslens demo report — {r['model']}",
        "",
        f"Task: synthetic multi-document QA, {cfg.n_docs} documents, one gold; greedy decoding; "
        f"metric best-subspan EM (± standard error). Seed {cfg.seed}. Wall time {r['wall_seconds']:.0f} s.",
        "",
        "## Baselines",
        "",
        "| prompt | n | accuracy | distractor copy |",
        "|---|---|---|---|",
    ]
    for v in ("gold_only", "original", "negative"):
        L.append(f"| {v} | {b[v]['n']} | {_pm(b[v]['accuracy'], b[v]['accuracy_se'])} | "
                 f"{_pm(b[v]['distractor_copy'], b[v]['distractor_copy_se'])} |")
    s = r["scores"]
    L += ["", f"## Contextual heads (n = {s['n']} ranking examples)", "",
          "Top-10 heads by mean attention mass from the answer tokens to the gold document:", "",
          ", ".join(f"L{l}H{h} ({v:.2f})" for l, h, v in s["top20"][:10]), "",
          f"Average head: {s['mean_head']:.3f}; the top-20 hold {100 * s['top20_share_of_total']:.0f}% "
          f"of the total score. Figure: `figures/contextual_heads.html`.", "",
          f"## Split softmax (oracle span, n = {cfg.n_test} per cell)", "",
          "| heads | k | τ | accuracy | distractor copy |", "|---|---|---|---|---|"]
    for key, v in r["split_softmax"]["top"].items():
        k, tau = key.split("|")
        L.append(f"| top contextual | {k} | {tau} | {_pm(v['accuracy'], v['accuracy_se'])} | "
                 f"{_pm(v['distractor_copy'], v['distractor_copy_se'])} |")
    for key, v in r["split_softmax"]["random"].items():
        k, tau, s_ = key.split("|")
        L.append(f"| random (seed {s_}) | {k} | {tau} | {_pm(v['accuracy'], v['accuracy_se'])} | "
                 f"{_pm(v['distractor_copy'], v['distractor_copy_se'])} |")
    a = r["alpha"]
    L += ["", f"## Focus directions ({cfg.objective} objective, top-{cfg.k_directions} heads, n = {cfg.n_test} per cell)", "",
          "| directions | α | accuracy | distractor copy |", "|---|---|---|---|"]
    for k_, v in a["learned"].items():
        L.append(f"| learned | {k_} | {_pm(v['accuracy'], v['accuracy_se'])} | {_pm(v['distractor_copy'], v['distractor_copy_se'])} |")
    for k_, v in a["random"].items():
        L.append(f"| random, matched norm | {k_} | {_pm(v['accuracy'], v['accuracy_se'])} | {_pm(v['distractor_copy'], v['distractor_copy_se'])} |")
    v, c = a["auto"], a["auto_calibration"]
    L.append(f"| learned, magnitude control calibrated per input (target {c['target']:.2f}: the sink-mass drop of "
             f"α = {c['alpha']:g}, {c['alpha_from']}, over {c['n_prompts']} validation prompts) | auto | "
             f"{_pm(v['accuracy'], v['accuracy_se'])} | {_pm(v['distractor_copy'], v['distractor_copy_se'])} |")
    L += ["", "Small samples: differences under about two standard errors are noise. `focuslens demo --full` runs the larger protocol.", ""]
    return "\n".join(L)
