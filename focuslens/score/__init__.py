"""Step 1, contextual scoring: per head, the attention mass from response tokens onto a labelled
span; the ranked ``[layer, head]`` tables and their files (see ``docs/method.md`` §1).
"""

from __future__ import annotations

from . import ranking, contextual
from .ranking import *  # noqa: F401,F403
from .contextual import *  # noqa: F401,F403

# each module's own __all__, in the order above
__all__ = [*ranking.__all__, *contextual.__all__]
