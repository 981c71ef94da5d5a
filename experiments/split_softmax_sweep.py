"""Split softmax on the top-k contextual heads vs k random heads: accuracy against k for several τ.

METHOD.md §3: on the selected heads, every query row's attention mass on the gold document moves
from π to π^τ. If the contextual heads are the ones that read the relevant context, this raises
accuracy from the *original* baseline toward the *gold-only* baseline, while k random heads do much
less.

Protocol (SmolLM2-135M-Instruct, synthetic multi-document QA, 10 documents, chat template, greedy):
  1. rank heads on separate examples (``--rank-seed``, ``--n-rank``) by the paper's contextual
     score (response = the model's own answer to the full prompt), with
     ``focuslens.score.contextual.score_dataset``;
  2. on ``--n`` held-out examples (``--seed``): the original, gold-only and negative baselines;
     split softmax on the top-k heads for every k in ``--ks`` and τ in ``--taus``; k random heads
     (``--random-k``, seeds ``--random-seeds``) at every τ;
  3. write the table (markdown, JSON) and the figure (``figures/split_softmax_curve.html/.png``).

Every condition is a resumable JSONL file under ``runs/split_softmax/`` (git-ignored): a killed run
restarts where it stopped. Run it in the background, politely:

    nice -n 10 python experiments/split_softmax_sweep.py --n 100 > runs/split_softmax.log 2>&1 &

Quick look (teacher-forced margins instead of generation is not needed here: generation is short):
    python experiments/split_softmax_sweep.py --n 20 --ks 20 --taus 0.2 --random-seeds 0
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import focuslens as fl  # noqa: E402
from focuslens.evaluation.runner import evaluate  # noqa: E402
from focuslens.core.io import atomic_write_json, content_hash  # noqa: E402
from focuslens.core.models import model_info  # noqa: E402
from focuslens.score.contextual import score_dataset  # noqa: E402
from focuslens.intervene.span_specs import SplitSoftmax  # noqa: E402
from focuslens.evaluation.sweeps import random_heads  # noqa: E402
from focuslens.tasks import make_synthetic_qa, render  # noqa: E402

RUN_DIR = ROOT / "runs" / "split_softmax"
FIG_BASE = ROOT / "figures" / "split_softmax_curve"


def rank_heads(model, examples, *, max_new_tokens: int) -> tuple[list[tuple[int, int, float]], str]:
    """(layer, head, score) sorted by the dataset contextual score (the library's score_dataset)."""
    rendered = [render(ex, model.tokenizer, variant="original", chat=True) for ex in examples]
    ds = score_dataset(model, rendered, response="generate", max_new_tokens=max_new_tokens, progress=False)
    return [(int(l), int(h), float(s)) for l, h, s in ds.ranking("relevant")], "focuslens.score.contextual.score_dataset"


def summarise(res) -> dict:
    s = res.summary()
    return {k: s[k] for k in ("n", "accuracy", "accuracy_se", "distractor_copy", "distractor_copy_se",
                              "seconds_per_example")}


def plot(results: dict, path_base: Path) -> list[str]:
    """The ablation-curve figure: accuracy vs k, one line per τ (top-k), random-k points, baselines."""
    from focuslens.plot.figures import ablation_curve, save_figure

    ks = sorted({int(k) for pts in results["top"].values() for k in pts}
                | {int(k) for pts in results["random"].values() for k in pts})
    nan = float("nan")
    series: dict = {}
    for tau, pts in sorted(results["top"].items(), key=lambda x: float(x[0])):
        series[f"top-k contextual heads, τ={tau}"] = (
            [pts[str(k)]["accuracy"] if str(k) in pts else nan for k in ks],
            [pts[str(k)]["accuracy_se"] if str(k) in pts else nan for k in ks],
        )
    for tau, pts in sorted(results["random"].items(), key=lambda x: float(x[0])):
        seeds = next(iter(pts.values()))["seeds"]
        series[f"k random heads, τ={tau} (mean ± sd, {len(seeds)} seeds)"] = (
            [pts[str(k)]["mean"] if str(k) in pts else nan for k in ks],
            [pts[str(k)]["sd"] if str(k) in pts else nan for k in ks],
        )
    baselines = {f"{name} ({d['accuracy']:.2f})": d["accuracy"] for name, d in results["baselines"].items()}
    fig = ablation_curve(
        ks, series, baselines=baselines, xaxis="k (heads edited by split softmax)",
        yaxis="accuracy (best-subspan EM)",
        title=f"Split softmax, SmolLM2-135M-Instruct, {results['n_docs']} documents, n={results['n']}",
    )
    for tr in fig.data:  # random-k appear at one k only: show markers
        if tr.name and tr.name.startswith("k random"):
            tr.mode = "markers"
            tr.marker.symbol = "x"
            tr.marker.size = 11
    return [str(x) for x in save_figure(fig, path_base)]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100, help="held-out test examples")
    p.add_argument("--n-docs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0, help="seed of the test examples")
    p.add_argument("--n-rank", type=int, default=30, help="examples used to rank heads (separate)")
    p.add_argument("--rank-seed", type=int, default=1000)
    p.add_argument("--ks", type=int, nargs="+", default=[5, 20, 50])
    p.add_argument("--taus", type=float, nargs="+", default=[0.2, 0.5])
    p.add_argument("--random-k", type=int, default=20)
    p.add_argument("--random-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--chunk", type=int, default=10, help="examples per step when conditions advance together")
    p.add_argument("--run-dir", type=Path, default=RUN_DIR)
    p.add_argument("--no-figure", action="store_true")
    p.add_argument("--report-only", action="store_true",
                   help="compute nothing: summarise the JSONL files that exist, on the examples that every "
                        "condition of a group has finished (paired), and write the table and figure")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    run_dir: Path = args.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    if args.report_only:
        return report_only(args, argv)
    model = fl.load_model(verbose=False)
    # --- ranking on separate examples (cached) ---
    # keyed by what produced it: the model (fingerprint), the ranking data and the generation budget
    rank_key = content_hash({"model": model_info(model).fingerprint(), "n_docs": args.n_docs, "seed": args.rank_seed,
                             "n": args.n_rank, "max_new_tokens": args.max_new_tokens})
    rank_path = run_dir / f"ranking_docs{args.n_docs}_seed{args.rank_seed}_n{args.n_rank}-{rank_key}.json"
    if rank_path.exists():
        ranking_info = json.loads(rank_path.read_text())
    else:
        rank_ex = make_synthetic_qa(args.n_rank, n_docs=args.n_docs, seed=args.rank_seed)
        ranking, how = rank_heads(model, rank_ex, max_new_tokens=args.max_new_tokens)
        ranking_info = {"ranking": ranking, "method": how, "n_rank": args.n_rank, "rank_seed": args.rank_seed}
        atomic_write_json(rank_path, ranking_info, indent=None)
    ranking = [(int(l), int(h)) for l, h, _ in ranking_info["ranking"]]
    print(f"[sweep] ranking ({ranking_info['method']}): top-10 {ranking[:10]}", flush=True)

    test = make_synthetic_qa(args.n, n_docs=args.n_docs, seed=args.seed)
    tag_base = f"docs{args.n_docs}_seed{args.seed}_n{args.n}_mnt{args.max_new_tokens}"

    def run(name: str, *, n: int, variant="original", heads=None, tau=None, quiet=False):
        spec = SplitSoftmax(heads, tau=tau) if heads is not None else None
        # the file name carries the intervention's content identity (heads, τ), so another ranking never resumes it
        out = run_dir / f"{tag_base}_{name}-{spec.id if spec is not None else 'none'}.jsonl"
        # evaluate() resumes from the JSONL file: growing prefixes of the same list add examples
        res = evaluate(model, test[:n], variant=variant, max_new_tokens=args.max_new_tokens, intervene=spec,
                       output=out, progress=False, tag=name)
        s = summarise(res)
        if not quiet:
            print(f"[sweep] {name:28s} n {s['n']:3d} acc {s['accuracy']:.3f} ± {s['accuracy_se']:.3f}  "
                  f"copy {s['distractor_copy']:.3f}  ({time.time() - t0:.0f} s)", flush=True)
        return s

    results: dict = {"n": args.n, "n_docs": args.n_docs, "seed": args.seed, "ranking": ranking_info["method"],
                     "n_rank": args.n_rank, "rank_seed": args.rank_seed, "max_new_tokens": args.max_new_tokens,
                     "baselines": {}, "top": {}, "random": {}, "top_heads": {},
                     "command": "python experiments/split_softmax_sweep.py " + " ".join(argv or sys.argv[1:])}
    # Conditions in groups of priority. Within a group the conditions advance together, --chunk
    # examples at a time (paired on the same examples), so a run stopped early has every condition of
    # the first groups at the same n. Group 1: what the claim needs (original, top-k vs random-k at
    # the first τ); group 2: gold-only and negative baselines; group 3: other k and τ.
    taus = sorted(args.taus)
    rk = args.random_k
    other_k = [k for k in sorted(args.ks) if k != rk]

    def top(k, tau):
        return ("top", k, tau, dict(name=f"top{k}_tau{tau}", heads=ranking[:k], tau=tau))

    def rand(k, tau, s):
        return ("random", k, tau, dict(name=f"random{k}_seed{s}_tau{tau}", heads=random_heads(model, k, seed=s), tau=tau))

    groups = [
        [("base", "original", None, dict(name="original"))]
        + ([top(rk, taus[0])] if rk in args.ks else [])
        + [rand(rk, taus[0], s) for s in args.random_seeds],
        [("base", v, None, dict(name=v, variant=v)) for v in ("gold_only", "negative")],
        [top(k, taus[0]) for k in other_k]
        + [c for tau in taus[1:] for c in ([top(rk, tau)] if rk in args.ks else []) + [top(k, tau) for k in other_k]
           + [rand(rk, tau, s) for s in args.random_seeds]],
    ]
    for group in groups:
        for n in list(range(args.chunk, args.n, args.chunk)) + [args.n]:
            for kind, key, tau, kw in group:
                s = run(n=n, **kw, quiet=n != args.n)
                if n != args.n:
                    continue
                if kind == "base":
                    results["baselines"][key] = s
                elif kind == "top":
                    results["top_heads"][str(key)] = kw["heads"]
                    results["top"].setdefault(str(tau), {})[str(key)] = s
                else:
                    results["random"].setdefault(str(tau), {}).setdefault(str(key), {"per_seed": []})["per_seed"].append(s)
            print(f"[sweep] group done up to n={n} ({time.time() - t0:.0f} s)", flush=True)
    for tau, pts in results["random"].items():
        for k, d in pts.items():
            accs = [x["accuracy"] for x in d["per_seed"]]
            m = sum(accs) / len(accs)
            d.update(mean=m, seeds=list(args.random_seeds),
                     sd=math.sqrt(sum((a - m) ** 2 for a in accs) / (len(accs) - 1)) if len(accs) > 1 else float("nan"),
                     copy_mean=sum(x["distractor_copy"] for x in d["per_seed"]) / len(accs))
    results["wall_seconds"] = time.time() - t0
    (run_dir / f"{tag_base}_results.json").write_text(json.dumps(results, indent=1))
    print(markdown(results), flush=True)
    if not args.no_figure:
        print("[sweep] figure:", plot(results, FIG_BASE), flush=True)
    return results


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()[1:]
    return [json.loads(l) for l in lines if l.strip()]


def _summ(recs: list[dict]) -> dict:
    from focuslens.tasks.metrics import mean_se

    a, ase = mean_se([float(r["em"]) for r in recs])
    c, cse = mean_se([float(r["distractor_copy"]) for r in recs])
    return {"n": len(recs), "accuracy": a, "accuracy_se": ase, "distractor_copy": c, "distractor_copy_se": cse}


def _one(run_dir: Path, pattern: str) -> Path | None:
    """The one file matching ``pattern`` (names end in the content hash of what produced them)."""
    found = sorted(run_dir.glob(pattern))
    if len(found) > 1:
        raise SystemExit(f"{len(found)} files match {run_dir / pattern} (runs of different rankings or models): "
                         "move the others away or use another --run-dir.")
    return found[0] if found else None


def report_only(args, argv) -> dict:
    """Summarise finished records without loading the model (partial runs: paired common prefix)."""
    run_dir = args.run_dir
    tag_base = f"docs{args.n_docs}_seed{args.seed}_n{args.n}_mnt{args.max_new_tokens}"
    rank_path = _one(run_dir, f"ranking_docs{args.n_docs}_seed{args.rank_seed}_n{args.n_rank}-*.json")
    ranking_info = json.loads(rank_path.read_text()) if rank_path else {"method": "?", "ranking": []}
    names = {"original": ("base", "original", None), "gold_only": ("base", "gold_only", None),
             "negative": ("base", "negative", None)}
    for tau in args.taus:
        for k in args.ks:
            names[f"top{k}_tau{tau}"] = ("top", k, tau)
        for sd in args.random_seeds:
            names[f"random{args.random_k}_seed{sd}_tau{tau}"] = ("random", args.random_k, tau)
    recs = {n: _read(p) if (p := _one(run_dir, f"{tag_base}_{n}-*.jsonl")) else [] for n in names}
    recs = {n: r for n, r in recs.items() if r}
    if not recs:
        raise SystemExit(f"No records under {run_dir} for {tag_base}.")
    # the first group (original, top-k_rk, random seeds at the first τ) on a common paired prefix
    t0_ = sorted(args.taus)[0]
    group1 = [n for n in recs if n == "original" or n == f"top{args.random_k}_tau{t0_}"
              or (n.startswith(f"random{args.random_k}_") and n.endswith(f"_tau{t0_}"))]
    n_common = min(len(recs[n]) for n in group1) if group1 else 0
    results: dict = {"n": n_common, "n_docs": args.n_docs, "seed": args.seed, "ranking": ranking_info["method"],
                     "n_rank": args.n_rank, "rank_seed": args.rank_seed, "max_new_tokens": args.max_new_tokens,
                     "baselines": {}, "top": {}, "random": {}, "partial": True,
                     "top10": ranking_info["ranking"][:10]}
    results["preliminary"] = {}
    for n, r in recs.items():
        kind, key, tau = names[n]
        r = r[:n_common] if n in group1 else r
        s = _summ(r)
        if len(r) < n_common:  # unfinished: listed in the table, kept out of the figure
            results["preliminary"][n] = s
            continue
        if kind == "base":
            results["baselines"][key] = s
        elif kind == "top":
            results["top"].setdefault(str(tau), {})[str(key)] = s
        else:
            results["random"].setdefault(str(tau), {}).setdefault(str(key), {"per_seed": []})["per_seed"].append(s)
    for tau, pts in results["random"].items():
        for k, d in pts.items():
            accs = [x["accuracy"] for x in d["per_seed"]]
            m = sum(accs) / len(accs)
            d.update(mean=m, seeds=list(args.random_seeds)[: len(accs)],
                     sd=math.sqrt(sum((a - m) ** 2 for a in accs) / (len(accs) - 1)) if len(accs) > 1 else float("nan"),
                     copy_mean=sum(x["distractor_copy"] for x in d["per_seed"]) / len(accs))
    (run_dir / f"{tag_base}_report.json").write_text(json.dumps(results, indent=1))
    print(markdown(results), flush=True)
    if not args.no_figure:
        print("[sweep] figure:", plot(results, FIG_BASE), flush=True)
    return results


def markdown(results: dict) -> str:
    b = results["baselines"]
    n_note = " (each row says its own n)" if results.get("partial") else ""
    lines = [f"n = {results['n']}{n_note} held-out examples, {results['n_docs']} documents; heads ranked on "
             f"{results['n_rank']} separate examples ({results['ranking']}).", "",
             "| condition | k | τ | n | accuracy ± se | distractor copy |", "|---|---|---|---|---|---|"]
    for name in ("original", "gold_only", "negative"):
        if name in b:
            lines.append(f"| baseline {name} | – | – | {b[name]['n']} | {b[name]['accuracy']:.3f} ± {b[name]['accuracy_se']:.3f} | "
                         f"{b[name]['distractor_copy']:.3f} |")
    for tau, pts in sorted(results["top"].items(), key=lambda x: float(x[0])):
        for k, d in sorted(pts.items(), key=lambda x: int(x[0])):
            lines.append(f"| top-k contextual | {k} | {tau} | {d['n']} | {d['accuracy']:.3f} ± {d['accuracy_se']:.3f} | "
                         f"{d['distractor_copy']:.3f} |")
    for tau, pts in sorted(results["random"].items(), key=lambda x: float(x[0])):
        for k, d in pts.items():
            per = ", ".join(f"{x['accuracy']:.2f}" for x in d["per_seed"])
            n_r = "/".join(str(x["n"]) for x in d["per_seed"])
            lines.append(f"| random heads (seeds {d['seeds']}: {per}) | {k} | {tau} | {n_r} | mean {d['mean']:.3f} (sd {d['sd']:.3f}) | "
                         f"{d['copy_mean']:.3f} |")
    for name, d in sorted(results.get("preliminary", {}).items()):
        lines.append(f"| *unfinished:* {name} | | | {d['n']} | {d['accuracy']:.3f} ± {d['accuracy_se']:.3f} | "
                     f"{d['distractor_copy']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
