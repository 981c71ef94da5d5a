"""Top-level names that moved into the story folders, reachable from ``focuslens`` for one release with a warning.

Why: the top level is now the one-screen API (``focuslens.__all__``, 30 names); everything else lives
in the subpackage of its step. A notebook written against 0.1 keeps running and is told, once per
name, where the name lives now and what to write instead. The names leave the top level in the next
minor release. (The package version is unchanged by the move on purpose: it is part of every spec's
content identity, and the move changes no computation, so stored records stay valid.)
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

__all__ = ["MOVED", "deprecated_attribute"]

#: old top-level name -> (module it lives in now, attribute, what to write instead)
MOVED: dict[str, tuple[str, str | None, str]] = {
    # eager shortcuts: the spec is the one way (same validation; evaluate batches it correctly)
    "pasta": ("focuslens.intervene.eager", "pasta", "fl.Pasta(heads, coefficient=..., span=...).attach(model, example)"),
    "inject_vectors": ("focuslens.intervene.eager", "inject_vectors", "fl.InjectVectors(vectors, alpha=...).attach(model)"),
    "compose": ("focuslens.intervene.eager", "compose", "fl.Compose(a, b) or a + b (specs)"),
    "ablate_heads": ("focuslens.heads.patching", "ablate_heads", "fl.Ablate(heads, mode=...).attach(model)"),
    "NoIntervention": ("focuslens.intervene.specs", "NoIntervention", "focuslens.intervene.NoIntervention"),
    # moved into their step's subpackage
    "OutputBusy": ("focuslens.core.errors", "OutputBusy", "focuslens.core.errors.OutputBusy"),
    "check_context": ("focuslens.core.models", "check_context", "focuslens.core.check_context"),
    "run_until": ("focuslens.core.forward", "run_until", "focuslens.core.run_until"),
    "DEFAULT_MAX_NEW_TOKENS": ("focuslens.core.generation", "DEFAULT_MAX_NEW_TOKENS", "focuslens.core.DEFAULT_MAX_NEW_TOKENS"),
    "generate_response": ("focuslens.core.generation", "generate_response", "focuslens.core.generate_response"),
    "generate_responses": ("focuslens.core.generation", "generate_responses", "focuslens.core.generate_responses"),
    "greedy_generate": ("focuslens.core.generation", "greedy_generate", "focuslens.core.greedy_generate"),
    "DEFAULT_MODEL_NAME": ("focuslens.core.models", "DEFAULT_MODEL_NAME", "focuslens.core.DEFAULT_MODEL_NAME"),
    "ModelInfo": ("focuslens.core.models", "ModelInfo", "focuslens.core.ModelInfo"),
    "hook_name": ("focuslens.core.models", "hook_name", "focuslens.core.hook_name"),
    "check_heads": ("focuslens.core.checks", "check_heads", "focuslens.core.check_heads"),
    "HookHandle": ("focuslens.core.hooks", "HookHandle", "focuslens.core.HookHandle"),
    "attach_hooks": ("focuslens.core.hooks", "attach_hooks", "focuslens.core.attach_hooks"),
    "count_hooks": ("focuslens.core.hooks", "count_hooks", "focuslens.core.count_hooks"),
    "Segment": ("focuslens.core.prompts", "Segment", "focuslens.core.Segment"),
    "as_span": ("focuslens.core.prompts", "as_span", "focuslens.core.as_span"),
    "score_spans": ("focuslens.score.contextual", "score_spans", "focuslens.score.score_spans"),
    "score_many": ("focuslens.score.contextual", "score_many", "focuslens.score.score_many"),
    "contextual_heads": ("focuslens.score.ranking", "contextual_heads", "focuslens.score.contextual_heads"),
    "HeadScores": ("focuslens.score.ranking", "HeadScores", "focuslens.score.HeadScores"),
    "load_heads": ("focuslens.score.ranking", "load_heads", "focuslens.score.load_heads"),
    "save_heads": ("focuslens.score.ranking", "save_heads", "focuslens.score.save_heads"),
    "PatchMethod": ("focuslens.heads.patching", "PatchMethod", "focuslens.heads.PatchMethod"),
    "attribution_patch_sites": ("focuslens.heads.attribution", "attribution_patch_sites", "focuslens.heads.attribution_patch_sites"),
    "teacher_forced_margins": ("focuslens.evaluation.margins", "teacher_forced_margins", "focuslens.evaluation.teacher_forced_margins"),
    "select_alpha": ("focuslens.evaluation.sweeps", "select_alpha", "focuslens.evaluation.select_alpha"),
    "random_heads": ("focuslens.evaluation.sweeps", "random_heads", "focuslens.evaluation.random_heads"),
    "curves": ("focuslens.plot.figures", "curves", "focuslens.plot.curves"),
    "head_doc_view": ("focuslens.plot.figures", "head_doc_view", "focuslens.plot.head_doc_view"),
    "Series": ("focuslens.plot.figures", "Series", "focuslens.plot.Series"),
    "Baseline": ("focuslens.plot.figures", "Baseline", "focuslens.plot.Baseline"),
    "CONDITION_COLORS": ("focuslens.plot.figures", "CONDITION_COLORS", "focuslens.plot.CONDITION_COLORS"),
    "save_figure": ("focuslens.plot.figures", "save_figure", "focuslens.plot.save_figure"),
    # modules that moved into folders
    "attention": ("focuslens.core.attention", None, "focuslens.core.attention"),
    "errors": ("focuslens.core.errors", None, "focuslens.core.errors"),
    "io": ("focuslens.core.io", None, "focuslens.core.io"),
    "generation": ("focuslens.core.generation", None, "focuslens.core.generation"),
    "finders": ("focuslens.heads.finders", None, "focuslens.heads.finders"),
    "specs": ("focuslens.intervene", None, "focuslens.intervene"),
    "sweeps": ("focuslens.evaluation.sweeps", None, "focuslens.evaluation.sweeps"),
}


def deprecated_attribute(name: str) -> Any:
    """The object an old top-level ``name`` refers to, after a ``DeprecationWarning`` naming its new home.

    Raises ``AttributeError`` (what ``getattr`` expects) for a name that never was top-level.
    """
    if name not in MOVED:
        raise AttributeError(f"module 'focuslens' has no attribute {name!r}")
    module, attr, instead = MOVED[name]
    warnings.warn(f"focuslens.{name} moved and leaves the top level in the next minor release: use {instead}.",
                  DeprecationWarning, stacklevel=3)
    mod = importlib.import_module(module)
    return mod if attr is None else getattr(mod, attr)
