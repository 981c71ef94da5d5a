"""focuslens: which attention heads decide what a language model reads in a long prompt, and how to steer them.

Implements (and goes beyond) *Focus Directions Make Your Language Models Pay More Attention to
Relevant Contexts* (Zhu et al., 2025) on TransformerLens hooked models; ``docs/method.md`` is the
method as implemented. The package reads as the method's story, one folder a step:

    core/        the model, hooks, forward passes, attention maths, spans, validation, io
    tasks/       distraction tasks with exact spans (synthetic QA, lost-in-the-middle, real documents)
    score/       1. contextual scores: attention mass from the response onto the relevant span
    heads/       2. which heads matter: find_heads, activation/attribution patching, ablation
    intervene/   3. interventions as specs: SplitSoftmax, Pasta, InjectVectors, Ablate, Compose
    directions/  4. focus directions: train, save/load, Steer (apply with α)
    evaluation/  5. evidence: the resumable evaluate runner, margins, α selection, controls
    plot/        6. figures: head heatmaps, ablation and sweep curves
    FocusLens    the notebook wrapper over all of it; ``focuslens`` the CLI

The names below are the one-screen API; everything else lives in its subpackage
(``focuslens.score.score_spans``, ``focuslens.intervene.Pasta``...). Older top-level names still work
for one release with a ``DeprecationWarning`` that names their new home (``focuslens.deprecations``).
"""

from __future__ import annotations

import os as _os

# Never wait on a model hub from inside the library's own defaults.
_os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# the model and the prompt
from .core.models import HookedModel, load_model, model_info  # noqa: E402
from .core.prompts import LabelledPrompt, Span, build_prompt  # noqa: E402
from .core.errors import UsageError  # noqa: E402

# 1-2. score heads, find the ones that matter
from .score.contextual import contextual_scores, score_dataset  # noqa: E402
from .score.ranking import DatasetScores  # noqa: E402
from .heads.finders import find_heads  # noqa: E402
from .heads.patching import patch_heads  # noqa: E402
from .heads.attribution import attribution_patch_heads  # noqa: E402

# 3. intervene (specs; split_softmax is the eager one-liner kept from the paper's name)
from .intervene.specs import Ablate, Compose, InterventionSpec  # noqa: E402
from .intervene.span_specs import Pasta, SplitSoftmax  # noqa: E402
from .intervene.vector_specs import InjectVectors  # noqa: E402
from .intervene.eager import split_softmax  # noqa: E402

# 4. focus directions
from .directions.artefact import FocusDirections, Steer  # noqa: E402
from .directions.config import TrainConfig  # noqa: E402
from .directions.train import train_focus_directions  # noqa: E402

# 5-6. evaluate, plot
from .evaluation.runner import Decoding, EvalResult, evaluate  # noqa: E402
from .plot.figures import ablation_curve, head_heatmap  # noqa: E402

# the notebook wrapper
from .lens import FocusLens  # noqa: E402

from .core.version import __version__  # noqa: E402
from .deprecations import deprecated_attribute  # noqa: E402

__all__ = [
    # the model and the prompt
    "load_model", "HookedModel", "model_info", "build_prompt", "LabelledPrompt", "Span",
    # 1-2. score, find heads
    "contextual_scores", "score_dataset", "DatasetScores", "find_heads", "patch_heads", "attribution_patch_heads",
    # 3. intervene
    "InterventionSpec", "SplitSoftmax", "Pasta", "InjectVectors", "Ablate", "Compose", "split_softmax",
    # 4. focus directions
    "FocusDirections", "Steer", "train_focus_directions", "TrainConfig",
    # 5-6. evaluate, plot
    "evaluate", "EvalResult", "Decoding", "head_heatmap", "ablation_curve",
    # the wrapper, the error users catch
    "FocusLens", "UsageError",
]


def __getattr__(name: str):
    """Older top-level names: still reachable for one release, with a warning naming the new home."""
    return deprecated_attribute(name)
