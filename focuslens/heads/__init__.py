"""Step 2, which heads matter: the head finders behind one entry point (:func:`find_heads`),
activation patching and ablation, attribution patching.
"""

from __future__ import annotations

from . import patch_jobs, patching, attribution, finders
from .patch_jobs import *  # noqa: F401,F403
from .patching import *  # noqa: F401,F403
from .attribution import *  # noqa: F401,F403
from .finders import *  # noqa: F401,F403

# each module's own __all__, in the order above
__all__ = [*patch_jobs.__all__, *patching.__all__, *attribution.__all__, *finders.__all__]
