"""The fused-attention backend for long contexts and large models: :func:`load_fused`.

:class:`~focuslens.engine.fused.FusedModel` (a Hugging Face model on its SDPA attention, scored and
steered through a registered attention function) lives in :mod:`focuslens.engine`, which
:func:`focuslens.evaluation.runner.evaluate` also runs on; this module loads a checkpoint into one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..engine.fused import DEFAULT_MLP_CHUNK, DEFAULT_ROW_BLOCK, FusedModel

__all__ = ["load_fused"]


def load_fused(
    name_or_path: str | os.PathLike | None = None,
    *,
    device: str | None = "cpu",
    dtype: torch.dtype = torch.float32,
    device_map: str | dict | None = None,
    row_block: int = DEFAULT_ROW_BLOCK,
    mlp_chunk: int | None = DEFAULT_MLP_CHUNK,
    **from_pretrained_kwargs: Any,
) -> FusedModel:
    """Load an HF causal LM with SDPA attention and wrap it as a :class:`FusedModel`.

    Args:
        name_or_path: ``None`` for the embedded SmolLM2-135M-Instruct (``default_model_dir()``,
            created on first use), a local checkpoint folder, or a hub name (network or HF cache).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``; ignored when ``device_map`` is given.
        dtype: parameter dtype, e.g. ``torch.bfloat16`` on GPUs (reductions stay fp32).
        device_map: e.g. ``"auto"`` to split a large model over several GPUs (needs ``accelerate``);
            partial scores are moved to the input-embedding device.
        row_block, mlp_chunk: see :class:`FusedModel`.
        from_pretrained_kwargs: passed on (e.g. ``max_memory={0: "20GiB", 1: "20GiB"}``).

    Example:
        >>> fm = load_fused("Qwen/Qwen2.5-7B-Instruct", device="cuda", dtype=torch.bfloat16)
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path is None:
        from ..core.models import ensure_default_checkpoint

        src = str(ensure_default_checkpoint())
    else:
        src = str(Path(name_or_path).expanduser()) if Path(str(name_or_path)).expanduser().exists() else str(name_or_path)
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": "sdpa", **from_pretrained_kwargs}
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(src, **kwargs)
    if device_map is None and device is not None:
        model = model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(src)
    return FusedModel(model, tok, row_block=row_block, mlp_chunk=mlp_chunk)
