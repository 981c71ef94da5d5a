"""focuslens: which attention heads decide what a language model reads in a long prompt, and how to steer them.

Implements (and goes beyond) *Focus Directions Make Your Language Models Pay More Attention to
Relevant Contexts* (Zhu et al., 2025) on TransformerLens hooked models:

* contextual scoring of heads (attention mass from response tokens to the relevant span),
* single-head interventions (split softmax, patching, ablation, query/key vector injection),
* focus directions (learned per-head query vectors applied with a factor alpha),
* figures: head-location heatmaps and ablation curves.
"""

from __future__ import annotations

import os as _os

# Never wait on a model hub from inside the library's own defaults.
_os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from .hooks import HookHandle, attach_hooks, count_hooks  # noqa: E402
from .models import (  # noqa: E402
    DEFAULT_MODEL_NAME,
    HookedModel,
    ModelInfo,
    check_context,
    check_heads,
    hook_name,
    load_model,
    model_info,
)
from .forward import run_until  # noqa: E402
from .prompts import LabelledPrompt, Segment, Span, as_span, build_prompt  # noqa: E402
from .scoring import (  # noqa: E402
    DatasetScores,
    HeadScores,
    contextual_heads,
    contextual_scores,
    load_heads,
    save_heads,
    score_dataset,
    score_many,
    score_spans,
)
from .interventions import compose, inject_vectors, pasta, split_softmax  # noqa: E402
from .patching import PatchMethod, ablate_heads, patch_heads  # noqa: E402
from .attribution import attribution_patch_heads, attribution_patch_sites  # noqa: E402
from .directions import FocusDirections, train_focus_directions  # noqa: E402
from .sweeps import select_alpha  # noqa: E402
from .evaluation import EvalResult, evaluate, teacher_forced_margins  # noqa: E402
from .plotting import CONDITION_COLORS, Baseline, Series, ablation_curve, curves, head_doc_view, head_heatmap, save_figure  # noqa: E402
from .generation import DEFAULT_MAX_NEW_TOKENS, generate_response, generate_responses, greedy_generate  # noqa: E402
from .lens import FocusLens  # noqa: E402
from .specs import Ablate, Compose, InjectVectors, InterventionSpec, NoIntervention, Pasta, SplitSoftmax, Steer  # noqa: E402
from .evaluation import Decoding  # noqa: E402
from .sweeps import random_heads  # noqa: E402
from .directions import TrainConfig  # noqa: E402
from .errors import OutputBusy, UsageError  # noqa: E402
from .finders import find_heads  # noqa: E402
from . import attention, directions, errors, finders, generation, io, specs, sweeps, tasks  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "FocusLens",
    "InterventionSpec",
    "NoIntervention",
    "SplitSoftmax",
    "Pasta",
    "pasta",
    "UsageError",
    "OutputBusy",
    "check_context",
    "run_until",
    "errors",
    "finders",
    "find_heads",
    "InjectVectors",
    "Steer",
    "Ablate",
    "Compose",
    "Decoding",
    "random_heads",
    "TrainConfig",
    "specs",
    "attention",
    "directions",
    "generation",
    "io",
    "sweeps",
    "tasks",
    "DEFAULT_MAX_NEW_TOKENS",
    "generate_response",
    "generate_responses",
    "greedy_generate",
    "DEFAULT_MODEL_NAME",
    "HookedModel",
    "ModelInfo",
    "load_model",
    "model_info",
    "hook_name",
    "check_heads",
    "HookHandle",
    "attach_hooks",
    "count_hooks",
    "LabelledPrompt",
    "Segment",
    "Span",
    "as_span",
    "build_prompt",
    "contextual_scores",
    "score_spans",
    "score_dataset",
    "score_many",
    "patch_heads",
    "PatchMethod",
    "attribution_patch_heads",
    "attribution_patch_sites",
    "ablate_heads",
    "evaluate",
    "EvalResult",
    "teacher_forced_margins",
    "contextual_heads",
    "HeadScores",
    "DatasetScores",
    "load_heads",
    "save_heads",
    "split_softmax",
    "inject_vectors",
    "compose",
    "FocusDirections",
    "select_alpha",
    "train_focus_directions",
    "head_heatmap",
    "ablation_curve",
    "curves",
    "head_doc_view",
    "Series",
    "Baseline",
    "CONDITION_COLORS",
    "save_figure",
]
