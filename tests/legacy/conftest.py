"""Fixtures for the legacy-``HookedTransformer`` leg (TransformerLens 3.9).

TransformerLens 4 removed ``HookedTransformer``: in the main environment every test here is collected
and skipped with a reason. ``scripts/legacy_env.sh`` runs them in ``.venv-legacy`` (TL 3.9) with
``FOCUSLENS_REQUIRE_LEGACY=1``, where a missing ``HookedTransformer`` is an error, not a skip.

Models are built directly from a ``HookedTransformerConfig`` (random init, no download): GPT-2 style
(LayerNorm, learned positions, GELU, multi-head attention) and Llama style (RMSNorm, RoPE, gated SiLU
MLP, grouped-query attention with 4 query heads on 2 KV heads), with the offline tiny tokenizer.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from legacy_models import ARCHS, HAVE_LEGACY, build_legacy  # noqa: E402,F401


@pytest.fixture(scope="session")
def legacy_gpt2():
    return build_legacy("gpt2")


@pytest.fixture(scope="session")
def legacy_llama():
    return build_legacy("llama")


@pytest.fixture(scope="session", params=ARCHS)
def legacy_any(request):
    return request.getfixturevalue(f"legacy_{request.param}")


@pytest.fixture(scope="session")
def legacy_smollm():
    """SmolLM2-135M-Instruct converted offline into a TL 3 HookedTransformer (no weight processing)."""
    import focuslens as fl

    return fl.load_model(backend="legacy")


@pytest.fixture(autouse=True)
def _no_legacy_hook_leaks(request):
    """Every legacy test must leave every model it touched without hooks."""
    yield
    if not HAVE_LEGACY:
        return
    from focuslens.core.hooks import count_hooks

    for name in ("legacy_gpt2", "legacy_llama", "legacy_any", "legacy_smollm"):
        if name in request.fixturenames:
            model = request.getfixturevalue(name)
            assert count_hooks(model) == 0, f"{request.node.name} left hooks on {name}"
