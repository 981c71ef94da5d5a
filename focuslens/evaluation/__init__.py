"""Step 5, evidence: the resumable, content-keyed evaluation runner, teacher-forced margins, α
selection and random-head controls.
"""

from __future__ import annotations

from .intervention import (  # noqa: F401
    Intervene,
    intervention_entry,
    split_intervene,
    attached,
    attached_batch,
    label_of,
)
from .runner import (  # noqa: F401
    evaluate,
    EvalResult,
    config_hash,
    Decoding,
    RECORD_FORMAT_VERSION,
)
from .margins import (  # noqa: F401
    MarginResult,
    teacher_forced_margins,
)
from .sweeps import (  # noqa: F401
    select_alpha,
    selection_record,
    check_selection_grid,
    AlphaSelection,
    random_heads,
    examples_identity,
)

__all__ = [
    "Intervene",
    "intervention_entry",
    "split_intervene",
    "attached",
    "attached_batch",
    "label_of",
    "evaluate",
    "EvalResult",
    "config_hash",
    "Decoding",
    "RECORD_FORMAT_VERSION",
    "MarginResult",
    "teacher_forced_margins",
    "select_alpha",
    "selection_record",
    "check_selection_grid",
    "AlphaSelection",
    "random_heads",
    "examples_identity",
]
