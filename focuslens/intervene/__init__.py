"""Step 3, interventions on single heads, as specs: values with a content identity that you
``attach`` (a handle with ``.remove()``) or use as a context manager, and that ``evaluate`` batches.

* :class:`SplitSoftmax` (exponent τ on a span), :class:`Pasta`, :class:`InjectVectors`,
  :class:`Ablate`, :class:`Compose` (``a + b``), :class:`NoIntervention`;
* label-free methods (:mod:`~focuslens.intervene.label_free`, ``docs/label_free.md``):
  :class:`PositionalCalibration`, :class:`SinkRedistribution`, :class:`Temperature`,
  :class:`SelfLocatedSpan` (with :func:`locate_span`, the model's own guess of the relevant document);
* the eager functions (:func:`split_softmax`, :func:`pasta`, :func:`inject_vectors`, :func:`compose`) are
  one-line sugar over the specs: the same validation, a handle back.
"""

from __future__ import annotations

from . import edits, eager, label_free, specs, span_specs, vector_specs
from .edits import *  # noqa: F401,F403
from .eager import *  # noqa: F401,F403
from .specs import *  # noqa: F401,F403
from .span_specs import *  # noqa: F401,F403
from .vector_specs import *  # noqa: F401,F403
from .label_free import *  # noqa: F401,F403

# each module's own __all__, in the order above
__all__ = [*edits.__all__, *eager.__all__, *specs.__all__, *span_specs.__all__, *vector_specs.__all__,
           *label_free.__all__]
