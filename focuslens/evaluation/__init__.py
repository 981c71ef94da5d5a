"""Step 5, evidence: the resumable, content-keyed evaluation runner, teacher-forced margins, α
selection and random-head controls.
"""

from __future__ import annotations

from . import intervention, runner, margins, sweeps
from .intervention import *  # noqa: F401,F403
from .runner import *  # noqa: F401,F403
from .margins import *  # noqa: F401,F403
from .sweeps import *  # noqa: F401,F403

# each module's own __all__, in the order above
__all__ = [*intervention.__all__, *runner.__all__, *margins.__all__, *sweeps.__all__]
