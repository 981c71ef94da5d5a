"""Distraction tasks: multi-document QA records, generators, loaders and rendering with exact spans."""

from .records import (
    KV_INSTRUCTION,
    LITM_INSTRUCTION,
    NEEDLE_INSTRUCTION,
    QA_INSTRUCTION,
    TEMPLATES,
    VARIANTS,
    Document,
    RenderedExample,
    TaskExample,
    format_prompt_text,
    normalise_variant,
    render,
    render_many,
)
from .synthetic import (
    DISTRACTOR_KINDS,
    RELATIONS,
    Relation,
    made_up_name,
    make_kv_retrieval,
    make_needle,
    make_synthetic_qa,
)

__all__ = [
    "Document",
    "TaskExample",
    "RenderedExample",
    "render",
    "render_many",
    "format_prompt_text",
    "normalise_variant",
    "LITM_INSTRUCTION",
    "QA_INSTRUCTION",
    "KV_INSTRUCTION",
    "NEEDLE_INSTRUCTION",
    "TEMPLATES",
    "VARIANTS",
    "make_synthetic_qa",
    "make_kv_retrieval",
    "make_needle",
    "made_up_name",
    "RELATIONS",
    "Relation",
    "DISTRACTOR_KINDS",
]
