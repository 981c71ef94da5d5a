"""Memory and time of contextual scoring vs context length: eager TransformerLens path vs fused backend.

Each measurement runs in a fresh subprocess (so one mode's allocations cannot lower or raise
another's peak), with ``torch.set_num_threads(1)``, under ``nice``; every fused mode is warmed up by the
same short calls before its baseline is taken. Memory is the peak resident set
size during the measured call minus the RSS right after loading the model and a short warm-up,
sampled by a psutil thread every 2 ms (and cross-checked against ``ru_maxrss``). Time is wall-clock of
the call (best of ``--repeats``).

Modes:
    fused_forward       plain HF forward, SDPA attention, logits for the last position only
                        (``logits_to_keep=1``: the same call the fused scorer makes) — the reference
    fused_forward_full  plain HF forward with logits for every position (what ``model(ids)`` does)
    fused_score         FusedModel.contextual_scores: SDPA + response rows only
    eager_score         focuslens.score.contextual.contextual_scores on the TransformerLens bridge (eager
                        attention: an [H, N, N] pattern per layer)

Commands (about 30 min on 1 core of this machine, longer under load)::

    nice -n 10 python benchmarks/bench_long_context.py \
        --lengths 1024 2048 4096 8192 --modes fused_forward fused_score eager_score fused_forward_full
    nice -n 10 python benchmarks/bench_long_context.py --append --lengths 8192 --modes pair_time --repeats 3
    nice -n 10 python benchmarks/bench_long_context.py --lengths 8192 --samples 3   # allocator variance

Writes ``figures/long_context_results.json``, ``figures/long_context_memory.html`` (and ``.png`` when
kaleido finds a browser) and prints a markdown table for ``docs/scale.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIG = ROOT / "figures"
RESPONSE = 32
MODES = ("fused_forward", "fused_forward_full", "fused_score", "eager_score")
# timing only: forward and scoring alternated in one process, best of --repeats each (fair under a
# fluctuating machine load, which separate processes are not)
PAIR = "pair_time"


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class _PeakSampler:
    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = _rss()
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())


def pair_worker(n: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from focuslens.backends.fused import load_fused

    fm = load_fused()
    ids = torch.randint(100, 49000, (n,), generator=torch.Generator().manual_seed(0))
    relevant = (n // 4, n // 4 + max(16, n // 10))
    fwd, score = [], []
    with torch.no_grad():
        fm(input_ids=ids[:64][None], use_cache=False)
        for _ in range(repeats):
            t0 = time.perf_counter()
            fm(input_ids=ids[None], use_cache=False, logits_to_keep=1)
            fwd.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            fm.contextual_scores(ids, relevant=relevant, response=(n - RESPONSE, n))
            score.append(time.perf_counter() - t0)
    return {"mode": PAIR, "n": n, "forward_s": fwd, "score_s": score, "ratio_best": min(score) / min(fwd),
            "ratio_median_pairs": sorted(s / f for s, f in zip(score, fwd))[len(fwd) // 2]}


def worker(mode: str, n: int, repeats: int) -> dict:
    import resource

    import torch

    if mode == PAIR:
        return pair_worker(n, repeats)
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 49000, (n,), generator=g)
    relevant = (n // 4, n // 4 + max(16, n // 10))
    response = (n - RESPONSE, n)

    if mode == "eager_score":
        import focuslens as fl
        from focuslens.score.contextual import contextual_scores

        model = fl.load_model(verbose=False)

        def call():
            return contextual_scores(model, ids, relevant=relevant, response=response)

    else:
        from focuslens.backends.fused import load_fused

        fm = load_fused()

        if mode == "fused_score":

            def call():
                return fm.contextual_scores(ids, relevant=relevant, response=response)

        elif mode == "fused_forward":

            def call():
                return fm(input_ids=ids[None], use_cache=False, logits_to_keep=1).logits

        elif mode == "fused_forward_full":

            def call():
                return fm(input_ids=ids[None], use_cache=False).logits

        else:
            raise SystemExit(f"unknown mode {mode}")

    # Warm-up at a short length, the SAME sequence for every fused mode: one-off allocations are not
    # counted, and glibc's allocator (whose mmap/trim thresholds adapt to the largest block freed so
    # far) starts every fused mode from the same state. Different warm-ups per mode moved the fused
    # peaks by up to ~100 MB at 4k tokens in a first run.
    with torch.no_grad():
        short = ids[:64]
        if mode == "eager_score":
            contextual_scores(model, short, relevant=(4, 12), response=(32, 64))
        else:
            fm(input_ids=short[None], use_cache=False)
            fm(input_ids=short[None], use_cache=False, logits_to_keep=1)
            fm.contextual_scores(short, relevant=(4, 12), response=(32, 64))
    import gc

    gc.collect()
    base = _rss()
    base_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    with _PeakSampler() as s:
        for _ in range(repeats):
            t0 = time.perf_counter()
            with torch.no_grad():
                out = call()
            times.append(time.perf_counter() - t0)
            del out
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "mode": mode,
        "n": n,
        "response": RESPONSE,
        "time_s": min(times),
        "times_s": times,
        "peak_mb": (s.peak - base) / 2**20,
        "maxrss_delta_mb": (maxrss - max(base, base_maxrss)) / 2**20 if maxrss > base_maxrss else None,
        "baseline_mb": base / 2**20,
        "threads": torch.get_num_threads(),
    }


def run_one(mode: str, n: int, repeats: int, timeout: int) -> dict:
    cmd = ["nice", "-n", "10", sys.executable, __file__, "--worker", mode, str(n), "--repeats", str(repeats)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"mode": mode, "n": n, "error": f"timeout after {timeout} s"}
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"mode": mode, "n": n, "error": f"rc={p.returncode}: {p.stderr.strip()[-400:]}"}
    return json.loads(lines[-1])


def pair_table(results: list[dict]) -> str:
    rs = sorted((r for r in results if r["mode"] == PAIR and "error" not in r), key=lambda r: r["n"])
    if not rs:
        return ""
    lines = ["| N | forward s (each run) | scoring s (each run) | best/best | median of pair ratios |", "|---|---|---|---|---|"]
    for r in rs:
        f = ", ".join(f"{x:.1f}" for x in r["forward_s"])
        s = ", ".join(f"{x:.1f}" for x in r["score_s"])
        lines.append(f"| {r['n']} | {f} | {s} | {r['ratio_best']:.2f}× | {r['ratio_median_pairs']:.2f}× |")
    return "\n".join(lines)


def table(results: list[dict]) -> str:
    results = [r for r in results if r["mode"] != PAIR]
    by = {(r["mode"], r["n"]): r for r in results}
    ns = sorted({r["n"] for r in results})
    modes = [m for m in MODES if any(r["mode"] == m for r in results)]
    head = "| N | " + " | ".join(f"{m} MB / s" for m in modes) + " | fused_score / fused_forward (mem, time) |"
    lines = [head, "|" + "---|" * (len(modes) + 2)]
    for n in ns:
        cells = []
        for m in modes:
            r = by.get((m, n))
            if r is None:
                cells.append("–")
            elif "error" in r:
                cells.append(f"failed ({r['error'][:40]})")
            else:
                cells.append(f"{r['peak_mb']:.0f} / {r['time_s']:.1f}")
        ff, fs = by.get(("fused_forward", n)), by.get(("fused_score", n))
        if ff and fs and "error" not in ff and "error" not in fs:
            ratio = f"{fs['peak_mb'] / ff['peak_mb']:.2f}×, {fs['time_s'] / ff['time_s']:.2f}×"
        else:
            ratio = "–"
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def plot(results: list[dict]) -> None:
    import plotly.graph_objects as go

    fig = go.Figure()
    for m in MODES:
        rs = sorted((r for r in results if r["mode"] == m and "error" not in r and "peak_mb" in r), key=lambda r: r["n"])
        if rs:
            fig.add_trace(go.Scatter(x=[r["n"] for r in rs], y=[r["peak_mb"] for r in rs], mode="lines+markers", name=m))
    fig.update_layout(
        title=f"SmolLM2-135M, CPU fp32: peak memory above the loaded model (|R| = {RESPONSE})",
        xaxis_title="context length N (tokens)",
        yaxis_title="peak RSS increase (MB)",
        xaxis_type="log",
        yaxis_type="log",
        template="plotly_white",
    )
    FIG.mkdir(exist_ok=True)
    fig.write_html(FIG / "long_context_memory.html", include_plotlyjs="cdn")
    try:
        if "BROWSER_PATH" not in os.environ:
            import shutil

            b = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
            if b:
                os.environ["BROWSER_PATH"] = b
        fig.write_image(FIG / "long_context_memory.png", width=900, height=550)
    except Exception as e:  # no browser for kaleido: keep the HTML
        print(f"[bench] PNG export skipped ({type(e).__name__}: {e}); install chromium and kaleido for PNGs")


def samples(lengths: list[int], k: int, repeats: int, timeout: int) -> None:
    out = FIG / "long_context_samples.json"
    rows = json.loads(out.read_text()) if out.exists() else []
    for n in lengths:
        rows = [r for r in rows if r["n"] != n]
        for s in range(k):
            pair = {}
            for m in ("fused_forward", "fused_score"):
                pair[m] = run_one(m, n, repeats, timeout)
                print(json.dumps(pair[m]), flush=True)
            if any("error" in r for r in pair.values()):
                continue
            ff, fs = pair["fused_forward"], pair["fused_score"]
            rows.append({"n": n, "sample": s, "forward_mb": ff["peak_mb"], "score_mb": fs["peak_mb"],
                         "forward_s": ff["time_s"], "score_s": fs["time_s"],
                         "mem_ratio": fs["peak_mb"] / ff["peak_mb"], "time_ratio": fs["time_s"] / ff["time_s"]})
            FIG.mkdir(exist_ok=True)
            out.write_text(json.dumps(rows, indent=1))
    print("| N | sample | fused_forward MB | fused_score MB | memory ratio | time ratio (separate processes) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']} | {r['sample'] + 1} | {r['forward_mb']:.0f} | {r['score_mb']:.0f} | "
              f"{r['mem_ratio']:.2f}× | {r['time_ratio']:.2f}× |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=2, metavar=("MODE", "N"))
    ap.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096, 8192])
    ap.add_argument("--modes", nargs="+", default=["fused_forward", "fused_score", "eager_score"], choices=MODES + (PAIR,))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--append", action="store_true", help="merge into an existing results file")
    ap.add_argument("--samples", type=int, default=0,
                    help="repeat fused_forward and fused_score in this many alternating fresh processes per "
                         "length and report every sample's memory ratio (allocator variance); writes "
                         "figures/long_context_samples.json")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.repeats)))
        return
    if args.samples:
        samples(args.lengths, args.samples, args.repeats, args.timeout)
        return
    out = FIG / "long_context_results.json"
    results = json.loads(out.read_text()) if args.append and out.exists() else []
    for n in args.lengths:
        for m in args.modes:
            r = run_one(m, n, args.repeats, args.timeout)
            results = [x for x in results if (x["mode"], x["n"]) != (m, n)] + [r]
            print(json.dumps(r), flush=True)
            FIG.mkdir(exist_ok=True)
            out.write_text(json.dumps(results, indent=1))
    plot(results)
    print(table(results))
    print()
    print(pair_table(results))


if __name__ == "__main__":
    main()
