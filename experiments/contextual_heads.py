"""Where are SmolLM2's contextual heads? Score every head on the default synthetic task and plot them.

Command (documented in docs/scoring.md):

    nice -n 10 python experiments/contextual_heads.py --n 120 --n-docs 10 --seed 0

Setting: ``make_synthetic_qa`` (made-up "The capital of E is V." documents, same-relation distractors,
gold position uniform), 10 documents, the Lost-in-the-Middle prompt in the chat template, the model's
own greedy response to the full prompt (the paper's default), one forward pass per example scoring
every head (``focuslens.score.contextual.score_dataset``). Writes

    figures/contextual_heads.html / .png   heatmap of the mean contextual score, top-20 marked
    figures/contextual_heads.json          full ranking + mean/stderr of relevant/sink/distractor masses

and prints the summary quoted in docs/scoring.md.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch


def _figure(ds, args, head_heatmap):
    return head_heatmap(
        ds.mean["relevant"], top_k=args.top_k, colorbar_title="attention on<br>gold document",
        title=(f"SmolLM2-135M-Instruct: contextual scores<br><sup>n={ds.n}, {args.n_docs} documents, the model's "
               f"own greedy answer; top {args.top_k} numbered by rank</sup>"),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=120, help="number of examples")
    ap.add_argument("--n-docs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("figures/contextual_heads"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--replot", action="store_true", help="only redraw the figure from the saved JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import focuslens as fl
    from focuslens.plot.figures import head_heatmap, save_figure
    from focuslens.score.contextual import score_dataset
    from focuslens.tasks import make_synthetic_qa, render
    from focuslens.tasks.metrics import best_subspan_em, distractor_copy

    if args.replot:
        from focuslens.score.contextual import DatasetScores

        ds = DatasetScores.load(args.out.with_suffix(".json"))
        print(save_figure(_figure(ds, args, head_heatmap), args.out))
        return
    t0 = time.time()
    model = fl.load_model(verbose=False)
    records = make_synthetic_qa(args.n, n_docs=args.n_docs, seed=args.seed)
    examples = [render(r, model, variant="original", chat=True) for r in records]
    lengths = [len(e.prompt) for e in examples]
    print(f"{len(examples)} examples, {args.n_docs} documents, prompt length {min(lengths)}-{max(lengths)} tokens")

    ds = score_dataset(model, examples, response="generate", max_new_tokens=args.max_new_tokens, progress=True)
    used = [examples[i] for i in ds.indices]
    acc = [best_subspan_em(r, e.answers) for r, e in zip(ds.responses, used)]
    cp = [distractor_copy(r, e.distractor_answers, e.answers) for r, e in zip(ds.responses, used)]

    ds.save(args.out.with_suffix(".json"))
    rel, se = ds.mean["relevant"], ds.stderr["relevant"]
    L, H = rel.shape
    top = ds.ranking()[: args.top_k]
    fig = _figure(ds, args, head_heatmap)
    written = save_figure(fig, args.out)

    print(f"scored n={ds.n} (skipped {ds.n_skipped}) in {time.time() - t0:.0f} s; wrote {', '.join(map(str, written))} "
          f"and {args.out.with_suffix('.json')}")
    if acc:
        print(f"accuracy of these responses (best-subspan EM): {sum(acc) / len(acc):.3f}; "
              f"distractor copy: {sum(cp) / len(cp):.3f}")
    print(f"\ntop {args.top_k} heads (mean ± stderr of attention mass on the gold document; sink; distractors total/max):")
    for i, (l, h, s) in enumerate(top, start=1):
        print(f"{i:3d}. L{l}H{h}: {s:.3f} ± {float(se[l, h]):.3f}   sink {float(ds.mean['sink'][l, h]):.3f}   "
              f"distractors {float(ds.mean['distractors_total'][l, h]):.3f} / max {float(ds.mean['distractors_max'][l, h]):.3f}")
    layers = Counter(l for l, _, _ in top)
    print("\nlayers of the top heads:", dict(sorted(layers.items())))
    for lo, hi in ((0, 6), (7, 13), (14, 23), (24, L - 1)):
        print(f"  layers {lo}-{hi}: {sum(v for k, v in layers.items() if lo <= k <= hi)} of {args.top_k}")
    flat = rel.flatten()
    srt = flat.sort(descending=True).values
    n_docs = args.n_docs
    print(f"\nconcentration: mean head {flat.mean():.3f}, median {flat.median():.3f}, "
          f"top-1 {srt[0]:.3f}, top-{args.top_k} mean {srt[:args.top_k].mean():.3f}; "
          f"top {args.top_k} of {flat.numel()} heads ({args.top_k / flat.numel():.0%}) hold "
          f"{srt[:args.top_k].sum() / flat.sum():.0%} of the summed score; "
          f"heads above 0.2: {(flat > 0.2).sum().item()}, above 0.1: {(flat > 0.1).sum().item()}")
    gold_tokens = sum(len(e.relevant) for e in examples) / len(examples)
    ctx_tokens = sum(len(e.relevant) + sum(len(d) for d in e.distractors) for e in examples) / len(examples)
    print(f"uniform-over-documents reference: the gold document is {gold_tokens:.0f} of {ctx_tokens:.0f} "
          f"document tokens ({gold_tokens / ctx_tokens:.3f}; 1/{n_docs} = {1 / n_docs:.3f})")
    print(f"sink mass: mean head {ds.mean['sink'].mean():.3f}; distractors total: mean head "
          f"{ds.mean['distractors_total'].mean():.3f}")


if __name__ == "__main__":
    main()
