"""The fused engine: a hooked model's interventions at its Hugging Face model's own speed.

A TransformerLens bridge computes every layer's attention eagerly so that ``hook_pattern`` exists,
even when an intervention edits 20 heads of 270 or none. The engine runs the same weights as a plain
Hugging Face model on SDPA (:func:`engine_for`: a second module tree sharing the bridge's parameter
tensors, nothing copied) through a registered attention function (:mod:`focuslens.engine.attention`):
layers with no edited head run the model's fused attention; an edited head gets its attention rows
recomputed explicitly, for that head only (:class:`~focuslens.engine.fused.FusedModel`).

Specs opt in with ``spec.fused`` / ``spec.attach_fused(engine, examples, offsets=...)``
(:class:`~focuslens.intervene.specs.InterventionSpec`); :func:`resolve_engine` decides per run, and
:func:`focuslens.evaluation.runner.evaluate` (``engine="auto" | "fused" | "eager"``) decodes on it with
:mod:`focuslens.core.generation`'s loop (``forward=engine.forward_with_cache``).
"""

from .attention import ATTN_IMPL, is_registered
from .bridge import EngineChoice, engine_for, engine_refusal, resolve_engine
from .fused import BackendHandle, FusedModel

__all__ = ["ATTN_IMPL", "is_registered", "FusedModel", "BackendHandle", "EngineChoice", "engine_for",
           "engine_refusal", "resolve_engine"]
