"""GPU check: fused-backend scoring and interventions at 32k tokens on a 3B-class model (random weights).

UNRUN so far: written in a session without a GPU, for a later session that has one. It needs no
download: the model is ``LlamaForCausalLM`` built from a ``LlamaConfig`` literal with the shape of
Llama-3.2-3B-Instruct (28 layers, 24 query / 8 KV heads, d_head 128, RoPE θ = 5e5 with llama3
scaling, 128k vocabulary, tied embeddings), randomly initialised in bf16. Random weights give the
same memory and time as the real ones; the scores themselves mean nothing.

What it does, in order (each step guarded so that an OOM is reported, not fatal):

1. exactness at 1,024 tokens: fused scores vs an HF eager ``output_attentions=True`` reduction
   (bf16 model, fp32 reductions; expect agreement to ~1e-2, bf16 attention noise),
2. for N in ``--lengths`` (default 8k, 16k, 32k): peak ``torch.cuda.max_memory_allocated`` above the
   loaded model and wall time of
   * ``forward``: plain SDPA forward, ``logits_to_keep=1`` (the reference),
   * ``score``: ``FusedModel.contextual_scores`` with |R| = 32 response rows,
   * ``split``: a forward under ``split_softmax`` on 20 heads (explicit rows in 1,024-row blocks),
   * ``inject``: a forward under ``inject_vectors`` on 20 heads,
   * ``eager_forward`` at N ≤ ``--eager-max`` only: HF eager attention (materialises [24, N, N]).

Command (one GPU, ~3-5 min including model construction)::

    python benchmarks/gpu_32k.py --out "${OUT:-.}/gpu_32k.json"

Prints one JSON line per measurement and writes them all to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import torch

LLAMA_3_2_3B = dict(
    vocab_size=128256,
    hidden_size=3072,
    intermediate_size=8192,
    num_hidden_layers=28,
    num_attention_heads=24,
    num_key_value_heads=8,
    head_dim=128,
    hidden_act="silu",
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    tie_word_embeddings=True,
    attention_bias=False,
    mlp_bias=False,
    bos_token_id=128000,
    eos_token_id=128009,
)


def build(device: str, n_layers: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**LLAMA_3_2_3B, **({"num_hidden_layers": n_layers} if n_layers else {})})
    cfg._attn_implementation = "sdpa"
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def measure(name, n, fn, device, results):
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    rec = {"what": name, "n": n}
    try:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = fn()
        if cuda:
            torch.cuda.synchronize(device)
        rec["time_s"] = time.perf_counter() - t0
        if cuda:
            rec["peak_extra_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
        del out
    except torch.OutOfMemoryError as e:
        rec["error"] = f"OOM: {str(e)[:200]}"
    except Exception as e:  # report and continue
        rec["error"] = f"{type(e).__name__}: {e}"[:400]
        traceback.print_exc()
    print(json.dumps(rec), flush=True)
    results.append(rec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", nargs="+", type=int, default=[8192, 16384, 32768])
    ap.add_argument("--eager-max", type=int, default=8192)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="gpu_32k.json")
    ap.add_argument("--smoke", action="store_true", help="CPU code-path check: 2 layers, N=256, no memory numbers")
    args = ap.parse_args()
    if args.smoke:
        args.device, args.lengths, args.eager_max = "cpu", [256], 256

    from focuslens.engine import FusedModel

    dev = torch.device(args.device)
    t0 = time.perf_counter()
    model = build(args.device, n_layers=2 if args.smoke else None)
    fm = FusedModel(model)
    results: list[dict] = [
        {
            "what": "setup",
            "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (smoke)",
            "build_s": time.perf_counter() - t0,
            "model_gib": torch.cuda.memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
            "torch": torch.__version__,
        }
    ]
    print(json.dumps(results[0]), flush=True)
    g = torch.Generator().manual_seed(0)
    n_layers = model.config.num_hidden_layers
    heads = [(l % n_layers, (7 * i) % 24) for i, l in enumerate(range(4, 24))]
    heads = list(dict.fromkeys(heads))
    vecs = {hd: torch.randn(128, generator=g) for hd in heads}

    # 1. exactness at 1k against HF eager attention
    n = 128 if args.smoke else 1024
    ids = torch.randint(1000, 120000, (n,), generator=g).to(dev)
    rel, resp = (n // 10, n // 2), (n - 32, n)
    try:
        got = fm.contextual_scores(ids, relevant=rel, response=resp)
        model.set_attn_implementation("eager")
        with torch.no_grad():
            att = model(ids[None], output_attentions=True, logits_to_keep=1).attentions
        model.set_attn_implementation("sdpa")
        ref = torch.stack([a[0, :, resp[0] : resp[1], rel[0] : rel[1]].float().sum(-1).mean(-1) for a in att]).cpu()
        del att
        rec = {"what": "exactness_vs_eager", "n": n, "max_abs_diff": float((got - ref).abs().max()), "max_score": float(ref.max())}
    except Exception as e:
        model.set_attn_implementation("sdpa")
        rec = {"what": "exactness_vs_eager", "n": n, "error": f"{type(e).__name__}: {e}"[:400]}
    print(json.dumps(rec), flush=True)
    results.append(rec)

    # 2. memory and time vs N
    for n in args.lengths:
        ids = torch.randint(1000, 120000, (n,), generator=g).to(dev)
        rel, resp = (n // 4, n // 4 + n // 10), (n - 32, n)
        measure("forward", n, lambda: model(input_ids=ids[None], use_cache=False, logits_to_keep=1).logits, dev, results)
        measure("score", n, lambda: fm.contextual_scores(ids, relevant=rel, response=resp), dev, results)

        def split():
            with fm.split_softmax(heads, span=rel, tau=0.5):
                return model(input_ids=ids[None], use_cache=False, logits_to_keep=1).logits

        def inject():
            with fm.inject_vectors(vecs, alpha=0.3):
                return model(input_ids=ids[None], use_cache=False, logits_to_keep=1).logits

        measure("split", n, split, dev, results)
        measure("inject", n, inject, dev, results)
        if n <= args.eager_max:

            def eager():
                model.set_attn_implementation("eager")
                try:
                    return model(input_ids=ids[None], use_cache=False, logits_to_keep=1).logits
                finally:
                    model.set_attn_implementation("sdpa")

            measure("eager_forward", n, eager, dev, results)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
