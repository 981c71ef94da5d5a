"""Greedy generation time under split softmax and query-vector injection vs plain generation.

The interventions act at the prefill and at every decoding step (KV cache), so their cost is paid
per generated token. This benchmark times ``model.generate`` (greedy, KV cache, fixed number of new
tokens, EOS ignored) on one synthetic 10-document prompt for three conditions, **interleaved** in
one process (plain, split softmax, vector injection, plain, ...) so that load from other processes
hits all conditions alike, and reports the median time and its ratio to plain generation.

    nice -n 10 python benchmarks/bench_generation.py                # SmolLM2, 20 heads, 32 tokens
    nice -n 10 python benchmarks/bench_generation.py --tiny         # tiny random model (smoke test)
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
from focuslens.intervene.eager import inject_vectors, split_softmax  # noqa: E402
from focuslens.core.models import model_info  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=int, default=20, help="number of edited heads")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--n-docs", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="tiny random llama instead of SmolLM2")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.tiny:
        from focuslens.testing import tiny_model

        model = tiny_model("llama")
        tokens = torch.randint(1, 300, (1, 300))
        span = fl.Span(100, 130)
    else:
        from focuslens.tasks import make_synthetic_qa, render

        model = fl.load_model(verbose=False)
        r = render(make_synthetic_qa(1, n_docs=args.n_docs, seed=0)[0], model.tokenizer)
        tokens, span = r.tokens[None], r.relevant
    info = model_info(model)
    g = torch.Generator().manual_seed(0)
    all_heads = [(l, h) for l in range(info.n_layers) for h in range(info.n_heads)]
    perm = torch.randperm(len(all_heads), generator=g)[: args.heads].tolist()
    heads = sorted(all_heads[i] for i in perm)
    vectors = {h: torch.randn(info.d_head, generator=g) * 0.1 for h in heads}

    def gen():
        return model.generate(tokens, max_new_tokens=args.new_tokens, do_sample=False, verbose=False,
                              use_past_kv_cache=True, stop_at_eos=False)

    conditions = {
        "plain": lambda: __import__("contextlib").nullcontext(),
        f"split_softmax ({len(heads)} heads, tau=0.2)": lambda: split_softmax(model, heads, span, 0.2),
        f"inject_vectors ({len(heads)} heads, alpha=1)": lambda: inject_vectors(model, vectors, alpha=1.0),
    }
    with torch.no_grad():
        gen()  # warm-up
        times: dict[str, list[float]] = {k: [] for k in conditions}
        for _ in range(args.repeats):
            for name, make in conditions.items():
                with make():
                    t0 = time.perf_counter()
                    out = gen()
                    times[name].append(time.perf_counter() - t0)
                assert out.shape[1] == tokens.shape[1] + args.new_tokens
    assert fl.core.count_hooks(model) == 0
    plain = statistics.median(times["plain"])
    print(f"model {info.name or 'tiny'}: prompt {tokens.shape[1]} tokens, {args.new_tokens} new tokens, "
          f"{args.repeats} interleaved repeats, {args.threads} thread(s)")
    print("| condition | median s | min s | ratio to plain (median) |")
    print("|---|---|---|---|")
    res = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        res[name] = {"median": med, "min": min(ts), "ratio": med / plain}
        print(f"| {name} | {med:.3f} | {min(ts):.3f} | {med / plain:.3f} |")
    return res


if __name__ == "__main__":
    main()
