"""Batched vs one-by-one evaluation under a per-example intervention (split softmax), side by side.

``evaluate`` attaches a per-example spec per *batch* (``spec.attach_batch``: each row its own gold
span, shifted by its left padding). This benchmark checks that batching pays and changes nothing:
split softmax on the top-k contextual heads (τ = 0.2 by default) over n synthetic QA examples with
10 documents, decoded with batch size 1 and batch size 8 **interleaved chunk by chunk in one
process** (batch 1 on examples 0-7, batch 8 on examples 0-7, batch 1 on 8-15, ...), so load from
other processes hits both alike. It reports wall and CPU seconds per example for each, their ratio,
the accuracy (EM ± SE) of each, and counts and shows every example whose answers differ (the
near-tie rule: float rounding of a batch may flip an argmax between two near-tied tokens).

Heads: the shipped SmolLM2 ranking ``figures/contextual_heads.json`` when the model is SmolLM2,
else :func:`focuslens.contextual_heads` from ``--rank-n`` synthetic examples scored here.

    nice -n 10 python benchmarks/bench_batched_eval.py                      # SmolLM2, CPU, n=56
    nice -n 10 python benchmarks/bench_batched_eval.py --dry-run            # tiny model, same code path
    python benchmarks/bench_batched_eval.py --device cuda                   # GPU: + peak memory
    python benchmarks/bench_batched_eval.py --device cuda --model /path/to/Llama-3.2-1B-Instruct \\
        --dtype bfloat16                                                    # a local 1-3B checkpoint

On ``--device cuda`` it also reports ``torch.cuda.max_memory_allocated`` for each batch size and
examples per second. Sized for a ten-minute GPU slot: the whole SmolLM2 run is 4.6 CPU-minutes on
one CPU thread (both batch sizes, n=56; docs/speed.md); it has not been timed on a GPU yet, so
start a 1-3B model with ``--n 16`` and raise it. ``--output`` writes the results as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import focuslens as fl  # noqa: E402
from focuslens.evaluation.runner import evaluate  # noqa: E402
from focuslens.core.models import model_info  # noqa: E402
from focuslens.intervene.span_specs import SplitSoftmax  # noqa: E402
from focuslens.tasks import make_synthetic_qa, render  # noqa: E402
from focuslens.tasks.metrics import mean_se  # noqa: E402


def _heads(model, k: int, rank_n: int, n_docs: int, seed: int) -> tuple[list[tuple[int, int]], str]:
    info = model_info(model)
    shipped = ROOT / "figures" / "contextual_heads.json"
    if shipped.exists():
        data = json.loads(shipped.read_text())
        if data.get("model") == info.name and data.get("fingerprint") == info.fingerprint():
            return fl.score.load_heads(shipped, k=k, model=model), f"shipped ranking {shipped.relative_to(ROOT)}"
    rank = [render(e, model) for e in make_synthetic_qa(rank_n, n_docs=n_docs, seed=seed + 1000)]
    ds = fl.score_dataset(model, rank, progress=False)
    return fl.score.contextual_heads(ds, k), f"contextual_heads from {rank_n} synthetic examples"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="local checkpoint folder or hub name (default: SmolLM2-135M)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--n", type=int, default=56, help="examples (a multiple of --batch keeps chunks even)")
    p.add_argument("--n-docs", type=int, default=10)
    p.add_argument("--k", type=int, default=20, help="edited heads (top-k contextual)")
    p.add_argument("--tau", type=float, default=0.2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=fl.core.DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--rank-n", type=int, default=8, help="examples to rank heads on when no shipped ranking fits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dry-run", action="store_true", help="tiny random model, n=8, 3 docs: the same code path, fast")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    if args.dry_run:
        from focuslens.testing import tiny_model

        model = tiny_model("llama")
        args.n, args.n_docs, args.k, args.max_new_tokens, args.rank_n = 8, 3, 4, 6, 2
    else:
        model = fl.load_model(args.model, device=args.device, dtype=dtype, verbose=False)
    info = model_info(model)
    heads, heads_from = _heads(model, args.k, args.rank_n, args.n_docs, args.seed)
    spec = SplitSoftmax(heads, args.tau)
    examples = [render(e, model) for e in make_synthetic_qa(args.n, n_docs=args.n_docs, seed=args.seed)]
    cuda = args.device.startswith("cuda")

    runs: dict[int, dict] = {b: {"records": [], "wall": 0.0, "cpu": 0.0, "peak": 0} for b in (1, args.batch)}
    for start in range(0, len(examples), args.batch):
        chunk = examples[start:start + args.batch]
        for b in (1, args.batch):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            _sync(args.device)
            t0, c0 = time.perf_counter(), time.process_time()
            res = evaluate(model, chunk, intervene=spec, batch_size=b, progress=False,
                           max_new_tokens=args.max_new_tokens)
            _sync(args.device)
            runs[b]["wall"] += time.perf_counter() - t0
            runs[b]["cpu"] += time.process_time() - c0
            runs[b]["records"] += res.records
            if cuda:
                runs[b]["peak"] = max(runs[b]["peak"], torch.cuda.max_memory_allocated())

    one, bat = runs[1]["records"], runs[args.batch]["records"]
    mismatches = [
        {"index": start, "id": a["id"], "batch_1": a["prediction"], f"batch_{args.batch}": b["prediction"]}
        for start, (a, b) in enumerate(zip(one, bat)) if a["prediction"] != b["prediction"]
    ]
    n = len(examples)

    def summary(b: int) -> dict:
        r = runs[b]
        acc, se = mean_se([float(x["em"]) for x in r["records"]])
        out = {"seconds_per_example": r["wall"] / n, "cpu_seconds_per_example": r["cpu"] / n,
               "examples_per_second": n / r["wall"], "accuracy": acc, "accuracy_se": se,
               "batch_sizes": sorted({x["batch_size"] for x in r["records"]})}
        if cuda:
            out["peak_memory_gib"] = r["peak"] / 2**30
        return out

    result = {
        "model": info.name, "device": args.device, "dtype": args.dtype, "n": n, "n_docs": args.n_docs,
        "mean_prompt_tokens": sum(len(r) for r in examples) / n, "heads": len(heads), "heads_from": heads_from,
        "tau": args.tau, "max_new_tokens": args.max_new_tokens, "threads": args.threads,
        "batch_1": summary(1), f"batch_{args.batch}": summary(args.batch),
        "speedup_wall": runs[1]["wall"] / runs[args.batch]["wall"],
        "speedup_cpu": runs[1]["cpu"] / max(runs[args.batch]["cpu"], 1e-9),
        "mismatches": len(mismatches), "mismatch_examples": mismatches,
        "command": "python benchmarks/bench_batched_eval.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    s1, sb = result["batch_1"], result[f"batch_{args.batch}"]
    print(f"{info.name} on {args.device} ({args.dtype}), n={n}, {args.n_docs} docs "
          f"(mean {result['mean_prompt_tokens']:.0f} prompt tokens), split softmax on {len(heads)} heads "
          f"({heads_from}), τ={args.tau}")
    print("| batch | s / example (wall) | CPU s / example | examples / s | accuracy (EM) |"
          + (" peak memory (GiB) |" if cuda else ""))
    print("|---|---|---|---|---|" + ("---|" if cuda else ""))
    for b, s in ((1, s1), (args.batch, sb)):
        print(f"| {b} | {s['seconds_per_example']:.3f} | {s['cpu_seconds_per_example']:.3f} | "
              f"{s['examples_per_second']:.2f} | {s['accuracy']:.3f} ± {s['accuracy_se']:.3f} |"
              + (f" {s['peak_memory_gib']:.2f} |" if cuda else ""))
    print(f"speed-up (wall) {result['speedup_wall']:.2f}×, (CPU) {result['speedup_cpu']:.2f}×; "
          f"answers differing: {len(mismatches)} of {n}")
    for m in mismatches:
        print(f"  mismatch {m}")
    if args.output:
        from focuslens.core.io import atomic_write_json

        atomic_write_json(Path(args.output), result)
    return result


if __name__ == "__main__":
    main()
