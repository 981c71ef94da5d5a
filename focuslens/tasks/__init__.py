"""Distraction tasks: multi-document QA records, generators, loaders and rendering with exact spans."""

from .records import LITM_INSTRUCTION, Document, RenderedExample, TaskExample, render

__all__ = ["Document", "TaskExample", "RenderedExample", "render", "LITM_INSTRUCTION"]
