"""The legacy models of this folder (a plain module, importable by the tests and conftest.py)."""

from __future__ import annotations

import os

import torch

try:
    from transformer_lens import HookedTransformer, HookedTransformerConfig
except ImportError:  # TransformerLens 4
    HookedTransformer = HookedTransformerConfig = None

HAVE_LEGACY = HookedTransformer is not None
SKIP_REASON = (
    "needs a legacy TransformerLens HookedTransformer (TL <= 3.9); TL 4 removed it. "
    "Run: bash scripts/legacy_env.sh"
)

if not HAVE_LEGACY and os.environ.get("FOCUSLENS_REQUIRE_LEGACY") == "1":
    raise RuntimeError("FOCUSLENS_REQUIRE_LEGACY=1 but transformer_lens.HookedTransformer is not importable")

ARCHS = ("gpt2", "llama")


def build_legacy(arch: str, *, seed: int = 0, n_layers: int = 2):
    """A tiny random-init ``HookedTransformer`` of ``arch`` ("gpt2" or "llama"), eval mode, grads off."""
    from focuslens.core.models import prepare_tokenizer
    from focuslens.testing import tiny_tokenizer

    tok = prepare_tokenizer(tiny_tokenizer())
    common = dict(n_layers=n_layers, d_model=64, n_heads=4, d_head=16, d_mlp=128, n_ctx=512, d_vocab=len(tok),
                  seed=seed, device="cpu", dtype=torch.float32, default_prepend_bos=False)
    if arch == "gpt2":
        cfg = HookedTransformerConfig(act_fn="gelu", positional_embedding_type="standard",
                                      normalization_type="LN", **common)
    elif arch == "llama":
        cfg = HookedTransformerConfig(act_fn="silu", gated_mlp=True, positional_embedding_type="rotary",
                                      rotary_dim=16, normalization_type="RMS", final_rms=True,
                                      n_key_value_heads=2, **common)
    else:
        raise ValueError(arch)
    model = HookedTransformer(cfg, tokenizer=tok)
    model.cfg.model_name = f"legacy-{arch}"
    model.eval()
    with torch.no_grad():  # random init attends almost uniformly: sharpen it so edits are visible
        for name, p in model.named_parameters():
            if name.endswith(("W_Q", "W_K")):
                p.mul_(4.0)
    for p in model.parameters():
        p.requires_grad_(False)
    return model
