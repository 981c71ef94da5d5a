"""Shared fixtures: tiny random models of three architectures and the real SmolLM2 (session-scoped)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(int(os.environ.get("FOCUSLENS_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def load_script():
    """``load_script("benchmarks/bench_dtype.py")``: a repository script (benchmarks/, experiments/,
    scripts/) imported as a module by its path from the repository root, so that a test calls its
    ``main(argv)`` in-process. Registered in ``sys.modules`` under its file name (dataclasses and
    pickling look the module up there)."""
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def load(relpath: str):
        path = root / relpath
        spec = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = mod
        spec.loader.exec_module(mod)
        return mod

    return load


@pytest.fixture(scope="session")
def tok():
    from focuslens.testing import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama():
    """2 layers, 4 query heads sharing 2 KV heads (GQA), RoPE."""
    from focuslens.testing import tiny_model

    return tiny_model("llama")


@pytest.fixture(scope="session")
def tiny_llama_mha():
    from focuslens.testing import tiny_model

    return tiny_model("llama_mha")


@pytest.fixture(scope="session")
def tiny_gpt2():
    """Learned absolute positions, no rotary (uses hook_q / hook_k)."""
    from focuslens.testing import tiny_model

    return tiny_model("gpt2")


@pytest.fixture(scope="session")
def tiny_qwen2():
    from focuslens.testing import tiny_model

    return tiny_model("qwen2")


@pytest.fixture(scope="session")
def tiny_gemma3():
    """Gemma-3: layer 0 has a sliding window of 8, layer 1 is global; QK-norm; GQA (4 heads, 2 KV)."""
    from focuslens.testing import tiny_model

    return tiny_model("gemma3")


@pytest.fixture(scope="session", params=["llama", "gpt2", "qwen2"])
def tiny_any(request, tiny_llama, tiny_gpt2, tiny_qwen2):
    """Each tiny architecture in turn."""
    return {"llama": tiny_llama, "gpt2": tiny_gpt2, "qwen2": tiny_qwen2}[request.param]


@pytest.fixture(scope="session")
def smollm():
    """The real SmolLM2-135M-Instruct (embedded default). CI installs the wheel: never skipped."""
    import focuslens as fl

    return fl.load_model()


@pytest.fixture(autouse=True)
def _no_hook_leaks(request):
    """Every test must leave every model it touched without hooks."""
    yield
    from focuslens.core.hooks import count_hooks

    for name in ("tiny_llama", "tiny_llama_mha", "tiny_gpt2", "tiny_qwen2", "tiny_gemma3", "smollm"):
        if name in request.fixturenames:
            model = request.getfixturevalue(name)
            assert count_hooks(model) == 0, f"{request.node.name} left hooks on {name}"


def pytest_collection_modifyitems(config, items):
    """The fast tier (``pytest -m "not slow"``): tiny random models only. A test that needs the real
    SmolLM2 (the ``smollm`` fixture) or executes a notebook is slow, whether or not it says so."""
    for item in items:
        if "smollm" in getattr(item, "fixturenames", ()) or item.get_closest_marker("notebook"):
            item.add_marker(pytest.mark.slow)
