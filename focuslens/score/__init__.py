"""Step 1, contextual scoring: per head, the attention mass from response tokens onto a labelled
span; the ranked ``[layer, head]`` tables and their files (see ``docs/method.md`` §1).
"""

from __future__ import annotations

from .ranking import (  # noqa: F401
    HeadScores,
    DatasetScores,
    contextual_heads,
    save_heads,
    load_heads,
    RANKING_FORMAT,
    DISTRACTORS_TOTAL,
    DISTRACTORS_MAX,
)
from .contextual import (  # noqa: F401
    ScoringMethod,
    ResponseMode,
    contextual_scores,
    score_spans,
    score_many,
    score_dataset,
    qk_route_available,
)

__all__ = [
    "HeadScores",
    "DatasetScores",
    "contextual_heads",
    "save_heads",
    "load_heads",
    "RANKING_FORMAT",
    "DISTRACTORS_TOTAL",
    "DISTRACTORS_MAX",
    "ScoringMethod",
    "ResponseMode",
    "contextual_scores",
    "score_spans",
    "score_many",
    "score_dataset",
    "qk_route_available",
]
