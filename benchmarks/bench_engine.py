"""Evaluation on the fused engine vs the TransformerLens bridge vs Hugging Face SDPA ``generate`` (issue 37).

For 10- and 20-document NQ-open prompts (real passages, ``tests/data/nq-open-oracle-30.jsonl.gz``:
≈ 1.6k and ≈ 3.2k tokens on SmolLM2), three ways to get the same greedy answers, **interleaved example
by example in one process** (so load from other processes hits all alike):

* ``bridge``: ``evaluate(..., engine="eager")`` — today's path: every layer's attention eager on the
  TransformerLens bridge, ``[heads, N, N]`` patterns materialised;
* ``engine``: ``evaluate(..., engine="fused")`` — the bridge's weights on SDPA, only the edited heads'
  attention rows recomputed (:mod:`focuslens.engine`);
* ``hf``: ``hf_model.generate`` with SDPA attention of the same prompts, no intervention (the bar),
  greedy, ``max_new_tokens`` as ``evaluate`` uses, stopping by the same rule (end-of-turn tokens, the
  first newline once text has started), so every path runs the same number of forward passes.

Two interventions: unmodified, and split softmax on the top-k (20) contextual heads at τ = 0.2
(heads from the shipped SmolLM2 ranking ``figures/contextual_heads.json``; else ranked here). It
reports seconds per example (wall and CPU) per path and the ratios engine/hf and bridge/hf, counts
answers that differ between bridge and engine (the near-tie rule), and with ``--device cuda`` the
peak memory (``torch.cuda.max_memory_allocated``) of each path.

    nice -n 10 python benchmarks/bench_engine.py                       # SmolLM2, CPU, 3 examples per setting
    python benchmarks/bench_engine.py --n 50 --n-docs 10               # the issue's bar (≥ 50 examples)
    python benchmarks/bench_engine.py --device cuda --n 20             # GPU: + peak memory
    python benchmarks/bench_engine.py --dry-run                        # tiny random model, same code path
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
from focuslens.core.generation import stop_ids  # noqa: E402
from focuslens.core.models import model_info  # noqa: E402
from focuslens.engine import engine_for  # noqa: E402
from focuslens.evaluation.runner import evaluate  # noqa: E402
from focuslens.intervene.span_specs import SplitSoftmax  # noqa: E402
from focuslens.tasks import build_from_oracle, make_synthetic_qa, render  # noqa: E402

ORACLE = ROOT / "tests" / "data" / "nq-open-oracle-30.jsonl.gz"  # shipped: 30 questions
FULL_ORACLE = ROOT.parent / "shared" / "data" / "litm" / "nq-open-oracle.jsonl.gz"  # the full NQ-open oracle file, where present
PATHS = ("bridge", "engine", "hf")


def _heads(model, k: int, examples) -> tuple[list[tuple[int, int]], str]:
    info = model_info(model)
    shipped = ROOT / "figures" / "contextual_heads.json"
    if shipped.exists():
        data = json.loads(shipped.read_text())
        if data.get("model") == info.name and data.get("fingerprint") == info.fingerprint():
            return fl.score.load_heads(shipped, k=k, model=model), f"shipped ranking {shipped.relative_to(ROOT)}"
    ds = fl.score_dataset(model, examples, progress=False)
    return fl.score.contextual_heads(ds, k), f"contextual_heads from {len(examples)} examples scored here"


class _NewlineStop:
    """HF stopping criterion with evaluate's rule: stop once the answer's text (left-stripped) has a newline."""

    def __init__(self, tok, width: int):
        self.tok, self.width = tok, width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
        new = input_ids[:, self.width:]
        return torch.tensor(["\n" in self.tok.decode(r, skip_special_tokens=True).lstrip() for r in new.tolist()],
                            device=input_ids.device)


def _hf_generate(model, r, max_new_tokens: int) -> str:
    from transformers import StoppingCriteriaList

    hf = engine_for(model).hf_model  # the bridge's weights, plain SDPA (no focuslens context active)
    ids = r.tokens[None].to(hf.device)
    stops = sorted(stop_ids(model))
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                      eos_token_id=stops, pad_token_id=stops[0],
                      stopping_criteria=StoppingCriteriaList([_NewlineStop(model.tokenizer, ids.shape[1])]))
    new = [t for t in out[0, ids.shape[1]:].tolist() if t not in stops]
    return model.tokenizer.decode(new, skip_special_tokens=True)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="local checkpoint folder or hub name (default: SmolLM2-135M)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--n", type=int, default=3, help="examples per setting")
    p.add_argument("--n-docs", type=int, nargs="+", default=[10, 20])
    p.add_argument("--k", type=int, default=20, help="split-softmax heads (top-k contextual)")
    p.add_argument("--tau", type=float, default=0.2)
    p.add_argument("--max-new-tokens", type=int, default=fl.core.DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dry-run", action="store_true", help="tiny random model, synthetic 3-document prompts")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    p.add_argument("--oracle", default=None,
                   help="NQ-open oracle .jsonl(.gz) to draw questions from [the full file in ../shared/data/litm if "
                        "present, else the 30 shipped in tests/data]; --n above 30 needs the full file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    oracle = Path(args.oracle) if args.oracle else (FULL_ORACLE if FULL_ORACLE.is_file() else ORACLE)

    if args.dry_run:
        from focuslens.testing import tiny_model

        model = tiny_model("llama")
        args.n, args.n_docs, args.k, args.max_new_tokens = 2, [3], 4, 4
    else:
        model = fl.load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype), verbose=False)
    info = model_info(model)
    engine_for(model)  # built once (shares the bridge's weights), not timed

    settings = {}
    for nd in args.n_docs:
        if args.dry_run:
            tasks = make_synthetic_qa(args.n, n_docs=nd, seed=0)
        else:
            tasks = build_from_oracle(oracle, n_docs=nd, n_examples=args.n, gold_position="random", seed=0)
        settings[nd] = [render(e, model) for e in tasks]
    heads, heads_from = _heads(model, args.k, settings[args.n_docs[0]])
    specs = {"unmodified": None, f"split_softmax_top{len(heads)}": SplitSoftmax(heads, args.tau)}

    rows: dict[tuple[int, str, str], dict] = {}
    preds: dict[tuple[int, str, str], list[str]] = {}
    for nd, rendered in settings.items():
        for i, r in enumerate(rendered):
            for name, spec in specs.items():
                order = PATHS if i % 2 == 0 else PATHS[::-1]  # alternate who goes first
                for path in order:
                    if path == "hf" and spec is not None:
                        continue  # the bar: plain HF generate, timed once per example
                    key = (nd, name if path != "hf" else "unmodified", path)
                    if cuda:
                        torch.cuda.reset_peak_memory_stats()
                    _sync(args.device)
                    t0, c0 = time.perf_counter(), time.process_time()
                    if path == "hf":
                        text = _hf_generate(model, r, args.max_new_tokens)
                    else:
                        res = evaluate(model, [r], intervene=spec, batch_size=1, progress=False,
                                       max_new_tokens=args.max_new_tokens,
                                       engine="eager" if path == "bridge" else "fused")
                        text = res.predictions[0]
                    _sync(args.device)
                    row = rows.setdefault(key, {"wall": 0.0, "cpu": 0.0, "peak": 0})
                    row["wall"] += time.perf_counter() - t0
                    row["cpu"] += time.process_time() - c0
                    if cuda:
                        row["peak"] = max(row["peak"], torch.cuda.max_memory_allocated())
                    preds.setdefault(key, []).append(text)

    result: dict = {"model": info.name, "device": args.device, "dtype": args.dtype, "n": args.n,
                    "heads": len(heads), "heads_from": heads_from, "tau": args.tau,
                    "max_new_tokens": args.max_new_tokens, "threads": args.threads, "settings": [],
                    "oracle": str(oracle), "command": "python benchmarks/bench_engine.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(f"{info.name} on {args.device} ({args.dtype}), {args.n} examples per setting, split softmax on "
          f"{len(heads)} heads ({heads_from}), τ={args.tau}, up to {args.max_new_tokens} new tokens, "
          f"{args.threads} thread(s)")
    print("| docs | prompt tokens | intervention | bridge s/ex | engine s/ex | HF generate s/ex | engine / HF "
          "| bridge / HF | bridge / engine | answers bridge ≠ engine |" + (" peak GiB bridge / engine / HF |" if cuda else ""))
    print("|---|---|---|---|---|---|---|---|---|---|" + ("---|" if cuda else ""))
    for nd, rendered in settings.items():
        n = len(rendered)
        hf = rows[(nd, "unmodified", "hf")]
        for name in specs:
            b, e = rows[(nd, name, "bridge")], rows[(nd, name, "engine")]
            diff = sum(x != y for x, y in zip(preds[(nd, name, "bridge")], preds[(nd, name, "engine")]))
            s = {"n_docs": nd, "mean_prompt_tokens": sum(len(r) for r in rendered) / n, "intervention": name,
                 "bridge_s": b["wall"] / n, "engine_s": e["wall"] / n, "hf_s": hf["wall"] / n,
                 "bridge_cpu_s": b["cpu"] / n, "engine_cpu_s": e["cpu"] / n, "hf_cpu_s": hf["cpu"] / n,
                 "engine_over_hf": e["wall"] / hf["wall"], "bridge_over_hf": b["wall"] / hf["wall"],
                 "bridge_over_engine": b["wall"] / e["wall"], "answers_differ": diff,
                 "hf_answers_differ_from_engine_unmodified": sum(
                     x != y for x, y in zip(preds[(nd, "unmodified", "hf")], preds[(nd, "unmodified", "engine")]))}
            if cuda:
                s.update(peak_gib_bridge=b["peak"] / 2**30, peak_gib_engine=e["peak"] / 2**30, peak_gib_hf=hf["peak"] / 2**30)
            result["settings"].append(s)
            print(f"| {nd} | {s['mean_prompt_tokens']:.0f} | {name} | {s['bridge_s']:.2f} | {s['engine_s']:.2f} | "
                  f"{s['hf_s']:.2f} | {s['engine_over_hf']:.2f}× | {s['bridge_over_hf']:.2f}× | "
                  f"{s['bridge_over_engine']:.2f}× | {diff} of {n} |"
                  + (f" {s['peak_gib_bridge']:.2f} / {s['peak_gib_engine']:.2f} / {s['peak_gib_hf']:.2f} |" if cuda else ""))
    if args.output:
        from focuslens.core.io import atomic_write_json

        atomic_write_json(Path(args.output), result)
    return result


if __name__ == "__main__":
    main()
