"""float32 vs bfloat16 on this machine: is the low-precision dtype a speed-up or an emulation?

bfloat16 is 1.3–2.6× faster than float32 on CPUs with AMX / AVX-512 BF16 (and on GPUs) and several
times *slower* on CPUs without them, where PyTorch emulates it. The tracked experiment records use
bfloat16 (measured on an AMX machine); before running an experiment in a given dtype here, this
prints what each costs on this CPU: a bare matmul and one SmolLM2 forward per dtype, interleaved
(float32, bfloat16, float32, ...) in one process so that load from other processes hits both alike,
and the ratio of the medians. ``focuslens.core.models.cpu_lacks_fast`` is the rule that ``load_model``
warns with; the table shows whether it agrees with the clock.

    python benchmarks/bench_dtype.py                      # SmolLM2, 512 tokens, 3 repeats, 2 threads
    python benchmarks/bench_dtype.py --tiny               # tiny random model (smoke test)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import focuslens as fl  # noqa: E402
from focuslens.core.models import cpu_lacks_fast  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=512, help="prompt length of the timed forward")
    p.add_argument("--matmul", type=int, default=1024, help="side of the timed square matmul")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="tiny random llama instead of SmolLM2")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    import warnings

    from focuslens.testing import tiny_hf_model, tiny_tokenizer

    with warnings.catch_warnings():  # the warning is what this script measures
        warnings.simplefilter("ignore", RuntimeWarning)
        models = {dt: (fl.load_model(tiny_hf_model().to(dt), tokenizer=tiny_tokenizer()) if a.tiny
                       else fl.load_model(dtype=dt, verbose=False)) for dt in DTYPES}
    vocab = int(next(iter(models.values())).cfg.d_vocab)
    toks = torch.randint(0, vocab, (1, a.tokens), generator=torch.Generator().manual_seed(0))
    x = torch.randn(a.matmul, a.matmul, generator=torch.Generator().manual_seed(0))
    times: dict[torch.dtype, dict[str, list[float]]] = {dt: {"matmul": [], "forward": []} for dt in DTYPES}
    with torch.no_grad():
        for dt in DTYPES:  # warm-up, untimed
            models[dt](toks[:, :8])
            _ = x.to(dt) @ x.to(dt)
        for _ in range(a.repeats):
            for dt in DTYPES:
                xd = x.to(dt)
                t = time.perf_counter()
                _ = xd @ xd
                times[dt]["matmul"].append(time.perf_counter() - t)
                t = time.perf_counter()
                models[dt](toks)
                times[dt]["forward"].append(time.perf_counter() - t)
    med = {dt: {k: statistics.median(v) for k, v in d.items()} for dt, d in times.items()}
    gflops = {dt: 2 * a.matmul ** 3 / med[dt]["matmul"] / 1e9 for dt in DTYPES}
    ratio = med[torch.bfloat16]["forward"] / med[torch.float32]["forward"]
    out = {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "cpu_lacks_fast_bfloat16": cpu_lacks_fast(torch.bfloat16),
           "threads": a.threads, "tokens": a.tokens, "repeats": a.repeats,
           "model": "tiny" if a.tiny else "SmolLM2-135M-Instruct",
           "matmul_gflops": {str(dt): round(g, 2) for dt, g in gflops.items()},
           "forward_s": {str(dt): round(med[dt]["forward"], 3) for dt in DTYPES},
           "bfloat16_over_float32": round(ratio, 2)}
    print(f"CPU capability {out['cpu_capability']}; cpu_lacks_fast(bfloat16) = {out['cpu_lacks_fast_bfloat16']}; "
          f"{a.threads} threads, median of {a.repeats}")
    print("| dtype | matmul GFLOP/s | forward of {} tokens (s) |".format(a.tokens))
    print("|---|---|---|")
    for dt in DTYPES:
        print(f"| {str(dt).replace('torch.', '')} | {gflops[dt]:.2f} | {med[dt]['forward']:.3f} |")
    print(f"bfloat16 / float32 forward time: {ratio:.2f}x")
    return out


if __name__ == "__main__":
    main()
