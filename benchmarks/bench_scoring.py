"""Time and peak memory of contextual scoring on SmolLM2: plain forward vs focuslens vs the naive route.

Command (documented in docs/scoring.md):

    nice -n 10 python benchmarks/bench_scoring.py --lengths 512 2048 --repeats 2

Every (length, route) runs in a *fresh subprocess* (one torch thread), so that memory numbers are not
polluted by earlier runs. In that subprocess the model is loaded and the input built, then the
resident set size (RSS) is sampled every 2 ms by a thread (psutil) while the route runs ``--repeats``
times. Reported: the fastest wall time, and the peak RSS *above the RSS just before the first run*
(torch CPU tensors are malloc'd memory that tracemalloc does not see, so RSS is the sound measure).
``ru_maxrss`` (the kernel's high-water mark) is recorded too as a cross-check.

Routes:
    plain    model(tokens) without hooks (logits computed, as a user's forward pass would).
    qk       focuslens.scoring.score_spans(..., method="qk")   (response rows from post-RoPE q/k)
    pattern  focuslens.scoring.score_spans(..., method="pattern") (response rows of hook_pattern)
    naive    run_with_cache(names_filter=hook_pattern), then reduce the cached patterns.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROUTES = ("plain", "qk", "pattern", "naive")
RESPONSE_LEN = 32


def _worker(route: str, length: int, repeats: int) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import psutil
    import torch

    torch.set_num_threads(1)
    import focuslens as fl
    from focuslens.scoring import score_spans

    model = fl.load_model(verbose=False)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(10, model.cfg.d_vocab, (1, length), generator=g)
    R = (length - RESPONSE_LEN, length)
    relevant = (length // 4, length // 4 + 100)
    n_layers = model.cfg.n_layers

    def run() -> torch.Tensor:
        if route == "plain":
            with torch.inference_mode():
                return model(tokens)
        if route in ("qk", "pattern"):
            return score_spans(model, tokens, response=R, spans={"relevant": relevant}, method=route).relevant
        with torch.inference_mode():
            _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("attn.hook_pattern"))
            pats = torch.stack([cache[f"blocks.{l}.attn.hook_pattern"][0] for l in range(n_layers)])
            return pats[:, :, R[0]:R[1], relevant[0]:relevant[1]].sum(-1).mean(-1)

    # Warm up on a short input of the same route: weights are memory-mapped from safetensors and only
    # become resident on first use (~520 MB), which would otherwise count as the route's memory.
    full = tokens
    tokens = full[:, :64]
    R, relevant = (32, 64), (4, 20)
    run()
    tokens, R, relevant = full, (length - RESPONSE_LEN, length), (length // 4, length // 4 + 100)

    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    times = []
    result = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - t0)
    stop.set()
    th.join()
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {
        "route": route,
        "length": length,
        "times_s": times,
        "time_s": min(times),
        "peak_rss_delta_mb": (peak[0] - base) / 2**20,
        "maxrss_delta_mb": max(0, maxrss_after - maxrss_before) / 2**20,
        "baseline_rss_mb": base / 2**20,
    }
    if route != "plain":
        out["checksum"] = float(result.sum())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--routes", nargs="+", default=list(ROUTES), choices=ROUTES)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="also write the raw rows as JSON here")
    ap.add_argument("--worker", nargs=2, metavar=("ROUTE", "LENGTH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(_worker(args.worker[0], int(args.worker[1]), args.repeats)))
        return
    rows = []
    for length in args.lengths:
        for route in args.routes:
            cmd = [sys.executable, __file__, "--worker", route, str(length), "--repeats", str(args.repeats)]
            p = subprocess.run(cmd, capture_output=True, text=True)
            line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
            if p.returncode or not line:
                raise RuntimeError(f"{route}@{length} failed:\n{p.stderr[-3000:]}")
            r = json.loads(line[0][7:])
            rows.append(r)
            print(f"{length:5d} {route:8s} time {r['time_s']:7.2f} s  (runs {', '.join(f'{t:.2f}' for t in r['times_s'])})"
                  f"  peak RSS +{r['peak_rss_delta_mb']:7.0f} MB  (ru_maxrss +{r['maxrss_delta_mb']:.0f} MB)", flush=True)
    print()
    print("| tokens | route | time (s) | × plain | peak RSS Δ (MB) | × plain |")
    print("|---:|---|---:|---:|---:|---:|")
    for length in args.lengths:
        plain = next((r for r in rows if r["length"] == length and r["route"] == "plain"), None)
        for r in (r for r in rows if r["length"] == length):
            tr = f"{r['time_s'] / plain['time_s']:.2f}" if plain else "-"
            mr = f"{r['peak_rss_delta_mb'] / plain['peak_rss_delta_mb']:.2f}" if plain else "-"
            print(f"| {length} | {r['route']} | {r['time_s']:.2f} | {tr} | {r['peak_rss_delta_mb']:.0f} | {mr} |")
    checks = {(r["length"], r["route"]): r.get("checksum") for r in rows}
    for length in args.lengths:
        vals = [checks.get((length, k)) for k in ("qk", "pattern", "naive") if checks.get((length, k)) is not None]
        if len(vals) > 1:
            print(f"checksum agreement at {length}: max diff {max(vals) - min(vals):.2e} (sum over 270 heads)")
    if args.out is None:
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rows": rows, "threads": 1, "response_len": RESPONSE_LEN}, indent=1))
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
