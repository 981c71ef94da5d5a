"""Step 6, figures: head-location heatmaps, ablation and sweep curves, the per-document head view,
saved as PNG + HTML (+ plotly JSON).
"""

from __future__ import annotations

from . import figures
from .figures import *  # noqa: F401,F403

# each module's own __all__, in the order above
__all__ = [*figures.__all__]
