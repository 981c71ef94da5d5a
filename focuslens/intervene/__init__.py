"""Step 3, interventions on single heads, as specs: values with a content identity that you
``attach`` (a handle with ``.remove()``) or use as a context manager, and that ``evaluate`` batches.

* :class:`SplitSoftmax` (exponent τ on a span), :class:`Pasta`, :class:`InjectVectors`,
  :class:`Ablate`, :class:`Compose` (``a + b``), :class:`NoIntervention`;
* the eager functions (:func:`split_softmax`, :func:`pasta`, :func:`inject_vectors`, :func:`compose`) are
  one-line sugar over the specs: the same validation, a handle back.
"""

from __future__ import annotations

from .edits import (  # noqa: F401
    split_softmax_pattern,
    pasta_pattern,
)
from .eager import (  # noqa: F401
    split_softmax,
    pasta,
    inject_vectors,
    compose,
    ComposedHandle,
    InjectSite,
)
from .specs import (  # noqa: F401
    InterventionSpec,
    NoIntervention,
    Ablate,
    Compose,
    as_spec,
    check_batch,
    format_heads,
    tokens_of,
    SpanRule,
)
from .span_specs import (  # noqa: F401
    SplitSoftmax,
    Pasta,
)
from .vector_specs import (  # noqa: F401
    InjectVectors,
)

__all__ = [
    "split_softmax_pattern",
    "pasta_pattern",
    "split_softmax",
    "pasta",
    "inject_vectors",
    "compose",
    "ComposedHandle",
    "InjectSite",
    "InterventionSpec",
    "NoIntervention",
    "Ablate",
    "Compose",
    "as_spec",
    "check_batch",
    "format_heads",
    "tokens_of",
    "SpanRule",
    "SplitSoftmax",
    "Pasta",
    "InjectVectors",
]
