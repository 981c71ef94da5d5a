"""Step 6, figures: head-location heatmaps, ablation and sweep curves, the per-document head view,
saved as PNG + HTML (+ plotly JSON).
"""

from __future__ import annotations

from .figures import (  # noqa: F401
    head_heatmap,
    finder_heatmaps,
    ablation_curve,
    curves,
    head_doc_view,
    Series,
    Baseline,
    Condition,
    CONDITION_COLORS,
    CONDITION_LABELS,
    condition_style,
    save_figure,
    notebook_figures,
    PNG_HELP,
)

__all__ = [
    "head_heatmap",
    "finder_heatmaps",
    "ablation_curve",
    "curves",
    "head_doc_view",
    "Series",
    "Baseline",
    "Condition",
    "CONDITION_COLORS",
    "CONDITION_LABELS",
    "condition_style",
    "save_figure",
    "notebook_figures",
    "PNG_HELP",
]
