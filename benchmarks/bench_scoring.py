"""Time and peak memory of contextual scoring on SmolLM2: plain forward vs focuslens vs the naive route.

Command (documented in docs/scoring.md):

    nice -n 10 python benchmarks/bench_scoring.py --lengths 512 2048 --rounds 2
    nice -n 10 python benchmarks/bench_scoring.py --padding-check 200 260 300 320

Every (round, length, route) runs in a *fresh subprocess* with one torch thread, so memory numbers are
not polluted by earlier runs; rounds interleave the routes so that a burst of load from other
processes does not hit one route only. In the subprocess the model is loaded, warmed up on 64 tokens
(this pages in the memory-mapped weights, ~520 MB, which would otherwise count as the first route's
memory) and the input built; then the route runs once while a thread samples the resident set size
(RSS, psutil) every 5 ms.

Reported per route: **CPU time** of the process (user + system, one torch thread: the compute cost,
robust to other processes sharing the cores), wall time (inflated by any contention), and the peak RSS
*above the RSS just before the run* (torch CPU tensors are malloc'd memory that tracemalloc does not
see, so RSS is the sound measure; ``ru_maxrss``, the kernel's high-water mark, is a cross-check).
The minimum over rounds is reported for times, the maximum for memory.

Routes:
    plain    model(tokens) without hooks (logits computed, as a user's forward pass would).
    qk       focuslens.score.contextual.score_spans(..., method="qk")   (response rows from post-RoPE q/k)
    pattern  focuslens.score.contextual.score_spans(..., method="pattern") (response rows of hook_pattern)
    naive    run_with_cache(names_filter=hook_pattern), then reduce the cached patterns.
The input is random token ids; the response is the last 32 tokens and the relevant span 100 tokens at
a quarter of the sequence (attention cost does not depend on the ids).
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
    from focuslens.score.contextual import score_spans

    model = fl.load_model(verbose=False)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(10, model.cfg.d_vocab, (1, length), generator=g)
    R = (length - RESPONSE_LEN, length)
    relevant = (length // 4, length // 4 + min(100, length // 4))
    n_layers = model.cfg.n_layers

    def run() -> torch.Tensor:
        if route == "plain":
            with torch.inference_mode():
                return model(tokens)
        if route in ("qk", "pattern"):
            return score_spans(model, tokens, response=R, spans={"relevant": relevant}, method=route).relevant
        with torch.inference_mode():
            _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("attn.hook_pattern"))
            # reduce layer by layer (stacking all cached patterns first would double the peak)
            return torch.stack([
                cache[f"blocks.{l}.attn.hook_pattern"][0, :, R[0]:R[1], relevant[0]:relevant[1]].sum(-1).mean(-1)
                for l in range(n_layers)
            ])

    # Warm up on a short input of the same route: weights are memory-mapped from safetensors and only
    # become resident on first use (~520 MB), which would otherwise count as the route's memory.
    full = tokens
    tokens = full[:, :64]
    R, relevant = (32, 64), (4, 20)
    run()
    tokens, R, relevant = full, (length - RESPONSE_LEN, length), (length // 4, length // 4 + min(100, length // 4))

    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    times, cpus = [], []
    result = None
    for _ in range(repeats):
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - t0)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpus.append((r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime))
    stop.set()
    th.join()
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {
        "route": route,
        "length": length,
        "times_s": times,
        "time_s": min(times),
        "cpu_s": min(cpus),
        "peak_rss_delta_mb": (peak[0] - base) / 2**20,
        "maxrss_delta_mb": max(0, maxrss_after - maxrss_before) / 2**20,
        "baseline_rss_mb": base / 2**20,
    }
    if route != "plain":
        out["checksum"] = float(result.sum())
    return out


def _padding_check(lengths: list[int]) -> None:
    """CPU time of one pass per sequence vs one right-padded batch (same model, plain forward).

    The padded batch is run without an attention mask: a masked batch does at least this much work,
    so this is a lower bound on the batch's cost.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    import focuslens as fl

    model = fl.load_model(verbose=False)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(10, model.cfg.d_vocab, (1, n), generator=g) for n in lengths]
    with torch.inference_mode():
        model(seqs[0][:, :64])  # warm-up

        def cpu() -> float:
            r = resource.getrusage(resource.RUSAGE_SELF)
            return r.ru_utime + r.ru_stime

        for rnd in range(2):
            t = cpu()
            for s in seqs:
                model(s, return_type=None)
            loop = cpu() - t
            batch = torch.cat([torch.nn.functional.pad(s, (0, max(lengths) - s.shape[1])) for s in seqs])
            t = cpu()
            model(batch, return_type=None)
            padded = cpu() - t
            print(f"padding check round {rnd}: lengths {lengths}: one pass each {loop:.2f} s CPU, "
                  f"one padded batch {padded:.2f} s CPU ({padded / loop:.2f}x)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--routes", nargs="+", default=list(ROUTES), choices=ROUTES)
    ap.add_argument("--rounds", type=int, default=2, help="fresh-process runs per (length, route), interleaved")
    ap.add_argument("--repeats", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help="also write the raw rows as JSON here")
    ap.add_argument("--padding-check", type=int, nargs="+", metavar="LEN",
                    help="instead: compare one pass per sequence with one padded batch of these lengths")
    ap.add_argument("--worker", nargs=2, metavar=("ROUTE", "LENGTH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(_worker(args.worker[0], int(args.worker[1]), args.repeats)))
        return
    if args.padding_check:
        _padding_check(args.padding_check)
        return
    raw = []
    for rnd in range(args.rounds):
        for length in args.lengths:
            for route in args.routes:
                cmd = [sys.executable, __file__, "--worker", route, str(length), "--repeats", str(args.repeats)]
                p = subprocess.run(cmd, capture_output=True, text=True)
                line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
                if p.returncode or not line:
                    raise RuntimeError(f"{route}@{length} failed:\n{p.stderr[-3000:]}")
                r = json.loads(line[0][7:])
                r["round"] = rnd
                raw.append(r)
                print(f"round {rnd} {length:5d} {route:8s} cpu {r['cpu_s']:7.2f} s  wall {r['time_s']:7.2f} s  "
                      f"peak RSS +{r['peak_rss_delta_mb']:6.0f} MB (ru_maxrss +{r['maxrss_delta_mb']:.0f} MB)", flush=True)
    rows = []
    for length in args.lengths:
        for route in args.routes:
            rs = [r for r in raw if r["length"] == length and r["route"] == route]
            rows.append({"length": length, "route": route, "cpu_s": min(r["cpu_s"] for r in rs),
                         "time_s": min(r["time_s"] for r in rs),
                         "peak_rss_delta_mb": max(r["peak_rss_delta_mb"] for r in rs),
                         "checksum": rs[0].get("checksum")})
    print()
    print("| tokens | route | CPU time (s) | × plain | wall (s) | peak RSS Δ (MB) | × plain |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for length in args.lengths:
        plain = next((r for r in rows if r["length"] == length and r["route"] == "plain"), None)
        for r in (r for r in rows if r["length"] == length):
            tr = f"{r['cpu_s'] / plain['cpu_s']:.2f}" if plain else "-"
            mr = f"{r['peak_rss_delta_mb'] / plain['peak_rss_delta_mb']:.2f}" if plain else "-"
            print(f"| {length} | {r['route']} | {r['cpu_s']:.2f} | {tr} | {r['time_s']:.1f} | "
                  f"{r['peak_rss_delta_mb']:.0f} | {mr} |")
    for length in args.lengths:
        vals = [r["checksum"] for r in rows if r["length"] == length and r["checksum"] is not None]
        if len(vals) > 1:
            print(f"checksum agreement at {length} (sum of the 270 head scores, qk/pattern/naive): "
                  f"max diff {max(vals) - min(vals):.2e}")
    if args.out is None:
        return
    from focuslens.core.io import atomic_write_json

    atomic_write_json(args.out, {"raw": raw, "rows": rows, "threads": 1, "response_len": RESPONSE_LEN}, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
