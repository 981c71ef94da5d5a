"""Distraction on the default synthetic task: accuracy vs number of documents (SmolLM2, CPU).

Measures best-subspan EM, distractor-copy rate and per-position accuracy of the default model on
the default synthetic task (capital relation, same-relation distractors, gold position uniform,
LitM prompt in the chat template, greedy decoding) with 1, 5, 10 and 20 documents, on the *same*
questions (examples are paired across document counts), plus the closed-book check ("negative"
variant: the gold document removed) at 10 documents. Also records the wall time of evaluating
100 examples of 10 documents.

Results stream to JSONL files under ``--run-dir`` (git-ignored ``runs/`` by default), so an
interrupted run resumes where it stopped; the summary is written to ``<run-dir>/summary.md`` and
``summary.json`` (copy the table into ``docs/tasks.md``).

Command used for docs/tasks.md::

    nice -n 10 python experiments/distraction.py --n 100 --docs 1 5 10 20 --negative 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="examples per setting")
    ap.add_argument("--docs", type=int, nargs="+", default=[1, 5, 10, 20], help="documents per example")
    ap.add_argument("--negative", type=int, nargs="*", default=[10],
                    help="document counts at which to also run the 'negative' (gold removed) variant")
    ap.add_argument("--relation", default="capital")
    ap.add_argument("--distractors", default="same_relation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=8, help="examples decoded together")
    ap.add_argument("--run-dir", default="runs/distraction")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    import focuslens as fl
    from focuslens.evaluation.runner import evaluate
    from focuslens.tasks import make_synthetic_qa

    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t_load = time.perf_counter()
    model = fl.load_model(verbose=False)
    t_load = time.perf_counter() - t_load

    settings = [(n, "original") for n in args.docs] + [(n, "negative") for n in args.negative if n > 1]
    rows = []
    for n_docs, variant in settings:
        examples = make_synthetic_qa(
            args.n, n_docs=n_docs, relation=args.relation, distractors=args.distractors, seed=args.seed
        )
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        res = evaluate(
            model, examples, variant=variant, max_new_tokens=args.max_new_tokens,
            output=run_dir / f"{args.relation}-{args.distractors}-docs{n_docs}-{variant}-s{args.seed}.jsonl",
            progress=not args.no_progress, batch_size=args.batch_size,
        )
        wall = time.perf_counter() - t0
        s = res.summary()
        gen_wall = sum(r["seconds"] for r in res.records)
        gen_cpu = sum(r.get("cpu_seconds", float("nan")) for r in res.records)
        row = {
            "n_docs": n_docs, "variant": variant, "n": s["n"],
            "accuracy": s["accuracy"], "accuracy_se": s["accuracy_se"],
            "distractor_copy": s["distractor_copy"], "distractor_copy_se": s["distractor_copy_se"],
            "mean_prompt_tokens": s["mean_prompt_tokens"], "mean_new_tokens": s["mean_new_tokens"],
            "generation_wall_s": gen_wall, "generation_cpu_s": gen_cpu,
            "this_call_wall_s": wall, "resumed": res.n_resumed,
            "loadavg_start": load0, "loadavg_end": os.getloadavg()[0],
            "by_position": s["by_position"],
        }
        rows.append(row)
        print(
            f"docs={n_docs:>2} {variant:<8} n={s['n']} acc={s['accuracy']:.3f}±{s['accuracy_se']:.3f} "
            f"copy={s['distractor_copy']:.3f} prompt={s['mean_prompt_tokens']:.0f} tok "
            f"gen wall={gen_wall:.0f}s cpu={gen_cpu:.0f}s (resumed {res.n_resumed})",
            flush=True,
        )

    by = {(r["n_docs"], r["variant"]): r for r in rows}
    lines = [
        f"Model {fl.core.DEFAULT_MODEL_NAME}; task make_synthetic_qa(relation={args.relation!r}, "
        f"distractors={args.distractors!r}, gold position uniform, seed={args.seed}); chat template; "
        f"greedy, max_new_tokens={args.max_new_tokens}, stop at EOS / first newline; "
        f"batch size {args.batch_size}; torch threads={args.threads}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores.",
        "",
        "| documents | variant | n | accuracy (EM) | distractor copy | prompt tokens | new tokens | generation wall (s) | generation CPU (s) | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n_docs']} | {r['variant']} | {r['n']} | {r['accuracy']:.2f} ± {r['accuracy_se']:.2f} | "
            f"{r['distractor_copy']:.2f} ± {r['distractor_copy_se']:.2f} | {r['mean_prompt_tokens']:.0f} | "
            f"{r['mean_new_tokens']:.1f} | {r['generation_wall_s']:.0f} | {r['generation_cpu_s']:.0f} | "
            f"{r['loadavg_start']:.1f}–{r['loadavg_end']:.1f} |"
        )
    if (1, "original") in by and (20, "original") in by:
        gap = by[(1, "original")]["accuracy"] - by[(20, "original")]["accuracy"]
        lines += ["", f"Accuracy with 1 document minus accuracy with 20 documents: {100 * gap:.0f} points."]
    if (10, "original") in by:
        r10 = by[(10, "original")]
        lines += [
            "",
            f"Per gold position at 10 documents (1-based): "
            + ", ".join(f"{p + 1}: {d['accuracy']:.2f} (n={d['n']})" for p, d in r10["by_position"].items()),
        ]
    lines += ["", f"Model load: {t_load:.1f} s. Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`"]
    md = "\n".join(lines)
    (run_dir / "summary.md").write_text(md + "\n")
    (run_dir / "summary.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2, default=str))
    print(md)
    return {"rows": rows}


if __name__ == "__main__":
    main()
