"""Activation patching on SmolLM2: batched vs one-by-one, and attribution patching (AtP/AtP*) vs exact.

Command (documented in docs/patching.md):

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python benchmarks/bench_patching.py \\
        --band 12 17 --sites z k v --out runs/bench_patching.json
    # (i) alone, e.g. to repeat it:
    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python benchmarks/bench_patching.py --band 12 17 --band-only \\
        --out runs/bench_band.json

What it does, in one process with one torch thread (side by side, so ratios are comparable):

1. Builds a clean/corrupted pair with :func:`focuslens.heads.patching.make_corrupted_pair` from a synthetic
   multi-document QA example (``--n-docs`` documents; the gold document's answer value is replaced by
   another of the same token length), and appends the model's own clean answer prefix to both
   prompts so that the next token is the answer. The metric is the logit difference clean answer −
   corrupted answer at the last position. Seeds are tried from ``--seed`` on until the model follows
   the gold document in both prompts (``m_clean > 0 > m_corrupt``).
2. (i) ``patch_heads(site="z")`` over the layer band ``--band`` × all heads with ``method="loop"`` and
   ``method="batched"``: CPU time (process time, robust to other processes on the machine) and wall
   time of each, their max |difference| and the speedup.
3. (ii) exact patching (batched) over **all** layers and heads for each of ``--sites``, and
   attribution patching (AtP; AtP* with the QK fix for q/k, plain AtP as well for comparison) from
   one call for all sites: time, Spearman rank correlation of the effects ``m_patched − m_corrupt``,
   top-10/top-20 overlap by |effect|, sign agreement on the exact top-20, and the worst misses (heads
   with a large exact effect that attribution ranks low).

Output: a table on stdout and the numbers as JSON (``--out``, written atomically).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch


def _timed(fn):
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c0, time.perf_counter() - w0


def _ranks(x: torch.Tensor) -> torch.Tensor:
    r = torch.empty_like(x, dtype=torch.float64)
    r[x.argsort()] = torch.arange(len(x), dtype=torch.float64)
    return r


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = _ranks(a.flatten().double()), _ranks(b.flatten().double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def compare(exact: torch.Tensor, est: torch.Tensor, m_corrupt: float, slot_name: str) -> dict:
    """Agreement of an attribution estimate with exact patching (both ``[layer, slot]`` patched metrics)."""
    e = (exact - m_corrupt).flatten()
    a = (est - m_corrupt).flatten()
    n_slots = exact.shape[1]
    top = lambda x, k: set(x.abs().topk(k).indices.tolist())
    rank_a = _ranks(-a.abs())  # 0 = largest |attribution|
    top20 = e.abs().topk(min(20, len(e))).indices
    misses = sorted(top20.tolist(), key=lambda i: -float(rank_a[i]))[:3]
    return {
        "spearman": spearman(e, a),
        "spearman_abs": spearman(e.abs(), a.abs()),
        "top10_overlap": len(top(e, 10) & top(a, 10)),
        "top20_overlap": len(top(e, 20) & top(a, 20)),
        "sign_agree_top20": int((torch.sign(e[top20]) == torch.sign(a[top20])).sum()),
        "max_abs_exact": float(e.abs().max()),
        "worst_misses": [
            {
                "layer": i // n_slots,
                slot_name: i % n_slots,
                "exact": float(e[i]),
                "attribution": float(a[i]),
                "attribution_rank": int(rank_a[i]),
            }
            for i in misses
        ],
    }


def build_pair(model, n_docs: int, seed: int, max_tries: int = 20, gold_position="random"):
    """``(clean_tokens, corrupt_tokens, metric, info)`` at the answer position (model follows the gold doc)."""
    from focuslens.heads.patching import logit_diff_metric, make_corrupted_pair
    from focuslens.tasks import make_synthetic_qa

    tok = model.tokenizer
    for s in range(seed, seed + max_tries):
        ex = make_synthetic_qa(1, n_docs=n_docs, seed=s, gold_position=gold_position)[0]
        try:
            clean, corrupt = make_corrupted_pair(model, ex)
        except ValueError:
            continue
        with torch.no_grad():
            out = model.generate(clean.tokens[None], max_new_tokens=16, do_sample=False, verbose=False)
        text = tok.decode(out[0, len(clean.tokens):])
        at = text.find(clean.answers[0])
        if at <= 0:
            continue
        suffix = torch.tensor(tok(text[:at].rstrip(), add_special_tokens=False)["input_ids"], dtype=torch.long)
        clean_t = torch.cat([clean.tokens, suffix])[None]
        corrupt_t = torch.cat([corrupt.tokens, suffix])[None]
        try:
            metric = logit_diff_metric(model, " " + clean.answers[0], " " + corrupt.answers[0])
        except ValueError:
            continue
        with torch.no_grad():
            m_clean, m_corrupt = float(metric(model(clean_t))), float(metric(model(corrupt_t)))
        if m_clean > 0 > m_corrupt:
            first = int((clean_t != corrupt_t).nonzero()[0, 1])
            info = {"seed": s, "n_tokens": int(clean_t.shape[1]), "first_difference": first,
                    "m_clean": m_clean, "m_corrupt": m_corrupt,
                    "answer": clean.answers[0], "corrupted_answer": corrupt.answers[0]}
            return clean_t, corrupt_t, metric, info
    raise RuntimeError(f"No seed in {seed}..{seed + max_tries - 1} where SmolLM2 follows the gold document.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-docs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gold-position", default="random",
                   help="gold document index (int, negative from the end) or 'random' (make_synthetic_qa)")
    p.add_argument("--band", type=int, nargs=2, default=(12, 17), metavar=("FIRST", "LAST"),
                   help="layer band for batched vs loop (inclusive)")
    p.add_argument("--sites", nargs="+", default=["z", "k", "v"], choices=["z", "q", "k", "v", "pattern"],
                   help="sites for exact vs attribution over all heads")
    p.add_argument("--band-only", action="store_true", help="only (i): batched vs loop over the band")
    p.add_argument("--out", default="runs/bench_patching.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    import focuslens as fl
    from focuslens.heads.attribution import attribution_patch_sites
    from focuslens.core.io import atomic_write_json
    from focuslens.heads.patching import patch_heads
    from focuslens.heads.patch_jobs import default_batch_size

    model = fl.load_model(verbose=False)
    gold = args.gold_position if args.gold_position == "random" else int(args.gold_position)
    clean_t, corrupt_t, metric, pair = build_pair(model, args.n_docs, args.seed, gold_position=gold)
    m_corrupt = pair["m_corrupt"]
    print(f"pair: {pair}")
    res: dict = {"model": model.cfg.model_name, "pair": pair, "threads": 1, "args": vars(args)}

    # (i) batched vs loop over a layer band, site z
    band = list(range(args.band[0], args.band[1] + 1))
    bs = default_batch_size(model, clean_t.shape[1])
    loop, c_loop, w_loop = _timed(lambda: patch_heads(model, corrupt_t, clean_t, metric, site="z", layers=band,
                                                      method="loop"))
    batched, c_b, w_b = _timed(lambda: patch_heads(model, corrupt_t, clean_t, metric, site="z", layers=band))
    diff = float((loop[band] - batched[band]).abs().max())
    res["batched_vs_loop"] = {
        "layers": band, "runs": len(band) * loop.shape[1], "batch_size": bs,
        "loop_cpu_s": c_loop, "loop_wall_s": w_loop, "batched_cpu_s": c_b, "batched_wall_s": w_b,
        "speedup_cpu": c_loop / c_b, "speedup_wall": w_loop / w_b, "max_abs_diff": diff,
    }
    print(f"(i) z, layers {band[0]}-{band[-1]} x {loop.shape[1]} heads = {len(band) * loop.shape[1]} runs, "
          f"batch {bs}: loop {c_loop:.1f} s CPU ({w_loop:.1f} s wall), batched {c_b:.1f} s CPU ({w_b:.1f} s wall); "
          f"speedup {c_loop / c_b:.2f}x CPU ({w_loop / w_b:.2f}x wall); max |diff| {diff:.2e}")

    if args.band_only:
        atomic_write_json(args.out, res)
        print(f"wrote {args.out}")
        return

    # (ii) attribution vs exact over all heads
    fixed, c_atp, w_atp = _timed(lambda: attribution_patch_sites(model, corrupt_t, clean_t, metric, sites=args.sites))
    qk = [s for s in args.sites if s in ("q", "k")]
    plain, c_plain, _ = (
        _timed(lambda: attribution_patch_sites(model, corrupt_t, clean_t, metric, sites=qk, qk_fix=False))
        if qk else (None, 0.0, 0.0)
    )
    res["attribution"] = {"sites": args.sites, "cpu_s": c_atp, "wall_s": w_atp, "plain_qk_cpu_s": c_plain}
    print(f"(ii) attribution for sites {args.sites} (one call): {c_atp:.1f} s CPU ({w_atp:.1f} s wall)")
    for site in args.sites:
        exact, c_e, w_e = _timed(lambda site=site: patch_heads(model, corrupt_t, clean_t, metric, site=site))
        slot = "kv_head" if site in ("k", "v") else "head"
        row = {"exact_cpu_s": c_e, "exact_wall_s": w_e, "runs": int(exact.numel()),
               "atp_star" if site in ("q", "k") else "atp": compare(exact, fixed[site], m_corrupt, slot)}
        if plain is not None and site in plain:
            row["atp_plain"] = compare(exact, plain[site], m_corrupt, slot)
        res.setdefault("sites", {})[site] = row
        for name in ("atp", "atp_star", "atp_plain"):
            if name in row:
                r = row[name]
                print(f"  {site:8s} {name:9s} exact {c_e:6.1f} s CPU ({exact.numel()} runs) | spearman {r['spearman']:+.3f} "
                      f"(|.| {r['spearman_abs']:+.3f}) top10 {r['top10_overlap']}/10 top20 {r['top20_overlap']}/20 "
                      f"sign(top20) {r['sign_agree_top20']}/20 max|exact| {r['max_abs_exact']:.3f} misses {r['worst_misses']}")
    atomic_write_json(args.out, res)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
