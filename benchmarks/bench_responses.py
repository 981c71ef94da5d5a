"""Responses to score or train on: one prompt at a time vs ``batch_size`` together.

Contextual scoring (``score_dataset(response="generate" | "gold_only")``) and focus-direction data
(``make_direction_examples``) first need the model's greedy response to every example. This times
:func:`focuslens.core.generation.generate_responses` at batch 1 and at ``--batch`` on the same prompts,
**interleaved** chunk by chunk in one process (batch 1, batch B, batch 1, ...) so that load from
other processes hits both alike, for both kinds of prompt: full 10-document prompts (what
``response="generate"`` decodes) and gold-only prompts (what focus directions train on). It reports
seconds per example, the ratio, and how many responses differ (the near-tie rule of
``greedy_generate_batch``: expected 0).

    python benchmarks/bench_responses.py                    # SmolLM2, 16 examples, batch 8
    python benchmarks/bench_responses.py --tiny --n 4       # tiny random model (smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import focuslens as fl  # noqa: E402
from focuslens.core.generation import generate_responses  # noqa: E402
from focuslens.tasks import make_synthetic_qa, render  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16, help="examples per prompt kind")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--n-docs", type=int, default=None, help="documents per prompt (default 10; 3 with --tiny)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--tiny", action="store_true", help="tiny random llama instead of SmolLM2")
    p.add_argument("--output", type=Path, default=None, help="write the numbers as JSON here")
    a = p.parse_args(argv)
    if a.n < 1 or a.batch < 2:
        p.error("--n must be >= 1 and --batch >= 2")
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    if a.tiny:
        from focuslens.testing import tiny_model

        model = tiny_model("llama")
    else:
        model = fl.load_model(verbose=False)
    n_docs = a.n_docs if a.n_docs is not None else (3 if a.tiny else 10)
    exs = make_synthetic_qa(a.n, n_docs=n_docs, seed=0)
    kinds = {
        "full prompt (response='generate')": [render(e, model.tokenizer).prompt.tokens for e in exs],
        "gold-only prompt (focus-direction data)": [render(e, model.tokenizer, variant="gold_only").prompt.tokens
                                                    for e in exs],
    }
    rows = []
    for kind, prompts in kinds.items():
        secs = {1: 0.0, a.batch: 0.0}
        got: dict[int, list[list[int]]] = {1: [], a.batch: []}
        for c in range(0, len(prompts), a.batch):
            chunk = prompts[c:c + a.batch]
            for bs in (1, a.batch):  # interleaved: both batch sizes take turns on the same chunk
                t0 = time.perf_counter()
                out = generate_responses(model, chunk, batch_size=bs)
                secs[bs] += time.perf_counter() - t0
                got[bs] += [o.tolist() for o in out]
        diff = sum(x != y for x, y in zip(got[1], got[a.batch]))
        rows.append({"prompts": kind, "n": len(prompts),
                     "mean_prompt_tokens": round(sum(int(t.numel()) for t in prompts) / len(prompts), 1),
                     "s_per_example_batch1": round(secs[1] / len(prompts), 3),
                     f"s_per_example_batch{a.batch}": round(secs[a.batch] / len(prompts), 3),
                     "speedup": round(secs[1] / secs[a.batch], 2), "responses_differing": diff})
    res = {"model": "tiny llama" if a.tiny else "SmolLM2-135M-Instruct", "threads": torch.get_num_threads(),
           "n_docs": n_docs,
           "batch": a.batch, "rows": rows}
    print(f"{res['model']}, {res['threads']} threads, batch 1 vs {a.batch}, interleaved chunk by chunk")
    print(f"| prompts | n | tokens | s / example, batch 1 | batch {a.batch} | speed-up | responses differing |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['prompts']} | {r['n']} | {r['mean_prompt_tokens']} | {r['s_per_example_batch1']} | "
              f"{r[f's_per_example_batch{a.batch}']} | {r['speedup']}× | {r['responses_differing']} |")
    if a.output is not None:
        from focuslens.core.io import atomic_write_json

        atomic_write_json(a.output, res)
    return res


if __name__ == "__main__":
    main()
