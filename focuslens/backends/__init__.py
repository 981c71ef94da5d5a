"""Alternative model backends for long contexts and large or remote models.

* :mod:`focuslens.backends.fused` — :func:`~focuslens.backends.fused.load_fused` loads a checkpoint as a
  :class:`focuslens.engine.FusedModel`: a Hugging Face model on its fused (SDPA) attention, scored and
  steered through a registered attention function: response-row scoring in ``O(heads·|R|·N)``,
  split softmax and query vectors without ``N×N`` patterns for the other heads; CPU/GPU, bf16,
  ``device_map="auto"``.
* :mod:`focuslens.backends.nnsight_backend` — contextual scoring through nnsight tracing, locally
  or on NDIF (``remote=True``); nnsight is optional and imported lazily.
"""

from .fused import load_fused

__all__ = [
    "load_fused",
    "NNsightScorer",
    "load_nnsight",
    "nnsight_contextual_scores",
    "nnsight_score_spans",
]


def __getattr__(name: str):  # lazy: importing focuslens.backends must not require nnsight
    if name in ("NNsightScorer", "load_nnsight", "nnsight_contextual_scores", "nnsight_score_spans"):
        from . import nnsight_backend

        return getattr(nnsight_backend, name)
    raise AttributeError(name)
