"""Step 2, which heads matter: the head finders behind one entry point (:func:`find_heads`),
activation patching and ablation, attribution patching.
"""

from __future__ import annotations

from .patch_jobs import (  # noqa: F401
    default_batch_size,
    run_patch_jobs,
)
from .patching import (  # noqa: F401
    PatchSite,
    PatchMethod,
    AblationMode,
    patch_heads,
    patch_head_z,
    patch_head_q,
    patch_head_k,
    patch_head_v,
    patch_head_pattern,
    cache_sites,
    ablate_heads,
    head_means,
    make_corrupted_pair,
    logit_diff_metric,
)
from .attribution import (  # noqa: F401
    attribution_patch_heads,
    attribution_patch_sites,
)
from .finders import (  # noqa: F401
    FinderName,
    FINDERS,
    find_heads,
    contextual_finder,
    retrieval_scores,
    retrieval_finder,
    qrhead_finder,
    patching_finder,
    needle_answer_tokens,
    spearman,
    top_k_overlap,
    compare_finders,

)

__all__ = [
    "default_batch_size",
    "run_patch_jobs",
    "PatchSite",
    "PatchMethod",
    "AblationMode",
    "patch_heads",
    "patch_head_z",
    "patch_head_q",
    "patch_head_k",
    "patch_head_v",
    "patch_head_pattern",
    "cache_sites",
    "ablate_heads",
    "head_means",
    "make_corrupted_pair",
    "logit_diff_metric",
    "attribution_patch_heads",
    "attribution_patch_sites",
    "FinderName",
    "FINDERS",
    "find_heads",
    "contextual_finder",
    "retrieval_scores",
    "retrieval_finder",
    "qrhead_finder",
    "patching_finder",
    "needle_answer_tokens",
    "spearman",
    "top_k_overlap",
    "compare_finders",
]
