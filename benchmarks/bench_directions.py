"""Time to train focus directions (attention objective) on 20 heads × 200 examples, and the batched
optimiser against the authors' per-layer loop on the same cached tensors.

Command (run it on an idle machine; ≈ 3 min on 2 cores)::

    python benchmarks/bench_directions.py --n 200 --heads 20 --out runs/bench_directions.json

What is timed:
* ``train_focus_directions(model, examples, heads=top20, objective="attention")`` end to end: one frozen
  forward pass per example to cache the heads' post-RoPE queries (response rows) and keys (stopped
  after the last selected layer), then full-batch AdamW on the cached tensors with early stopping on
  held-out mass (40 validation examples, also cached: included in the time).
* On the first ``--small`` examples' cache: the authors' per-layer loop (per layer, batch 1, AdamW lr
  1e-3, wd 0.01, N(0, 0.01²) init, 10 epochs) and the batched optimiser; the ratio is the per-layer
  loop's time over the batched optimiser's time to first reach the per-layer loop's final held-out
  objective value.

Data: ``make_synthetic_qa`` (capital, 10 documents), the gold answer sentence as the response (the
number of response rows is what matters for the cost; the experiments use the model's gold-only answer,
11 tokens on average vs 12 here). Heads: the top 20 of ``runs/generalisation/prep.json`` when present,
else a ranking on 20 training examples.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--n-val", type=int, default=40)
    ap.add_argument("--heads", type=int, default=20)
    ap.add_argument("--small", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_directions.json"))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import focuslens as fl
    from focuslens.directions import cache_qk, heldout_attention, make_direction_examples, train_focus_directions
    from focuslens.tasks import make_synthetic_qa

    model = fl.load_model()
    exs = make_synthetic_qa(args.n + args.n_val, n_docs=10, seed=401)
    dx = make_direction_examples(model, exs, responses=[e.gold.text for e in exs])
    train, val = dx[: args.n], dx[args.n:]
    prep = ROOT / "runs" / "generalisation" / "prep.json"
    if prep.exists():
        heads = [tuple(h) for h in json.loads(prep.read_text())["heads"][: args.heads]]
    else:
        tot = sum(fl.contextual_scores(model, e.prompt.tokens, relevant=e.relevant, response=e.prompt.response)
                  for e in train[:20])
        H = model.cfg.n_heads
        heads = [(int(i) // H, int(i) % H) for i in torch.argsort(tot.flatten(), descending=True)[: args.heads]]

    t0 = time.perf_counter()
    d = train_focus_directions(model, train, heads=heads, objective="attention", val_examples=val, patience=5,
                               progress=False)
    t_total = time.perf_counter() - t0
    res = {"n_train": len(train), "n_val": len(val), "heads": len(heads), "threads": args.threads,
           "end_to_end_seconds": round(t_total, 1),
           "heldout_before": d.training["heldout_relevant_attention_before"],
           "heldout_after": d.training["heldout_relevant_attention_after"],
           "steps": d.training["history"][-1]["step"]}
    print(json.dumps(res), flush=True)

    # per-layer reference vs batched, on the same cached tensors of the first --small examples
    t0 = time.perf_counter()
    tr = cache_qk(model, train[: args.small], heads)
    va = cache_qk(model, val, heads)
    t_cache = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = train_focus_directions(model, train[: args.small], heads=heads, objective="attention", method="per_layer",
                                 progress=False, caches=(tr, None))
    t_ref = time.perf_counter() - t0
    v_ref = float(heldout_attention(va, ref.vectors).mean())
    t0 = time.perf_counter()
    fast = train_focus_directions(model, train[: args.small], heads=heads, objective="attention", val_examples=val,
                                  progress=False, caches=(tr, va), patience=5)
    t_fast = time.perf_counter() - t0
    hist = fast.training["history"]
    steps = hist[-1]["step"]
    reach = next((h["step"] for h in hist if h.get("val_mass", -1) >= v_ref), None)
    t_reach = None if reach is None else t_fast * reach / steps  # steps cost the same: linear in the step count
    res.update(small={"n": args.small, "cache_seconds": round(t_cache, 1),
                      "per_layer": {"seconds": round(t_ref, 2), "heldout": round(v_ref, 4)},
                      "batched": {"seconds": round(t_fast, 2), "steps": steps,
                                  "heldout": fast.training["heldout_relevant_attention_after"],
                                  "first_step_reaching_per_layer": reach,
                                  "seconds_to_reach": None if t_reach is None else round(t_reach, 2)},
                      "speedup_to_same_objective": None if t_reach is None else round(t_ref / t_reach, 1)})
    print(json.dumps(res, indent=1))
    from focuslens.io import atomic_write_json

    atomic_write_json(Path(args.out), res, indent=1)


if __name__ == "__main__":
    main()
