"""The one exception type for "the user gave something wrong": bad values, files, formats, devices, data.

Why a type of its own: the command line must tell a user's mistake (exit 2, one line saying what is
wrong and how to fix it) from a bug (a traceback worth reporting). Library code raises
:class:`UsageError` — a ``ValueError``, so ``except ValueError`` keeps working — wherever the cause is
the input, with a message that names the value or file, the rule it breaks and the fix;
:func:`focuslens.cli.main` maps it (and the other expected failures: missing files, corrupt formats)
to exit 2, and anything else to one line plus the file holding the traceback.
"""

from __future__ import annotations

import os
import sys

__all__ = ["UsageError", "OutputBusy", "is_expected", "one_line", "write_traceback"]


class UsageError(ValueError):
    """A problem with the input (argument, file, data, device, model), not with focuslens.

    The message names what is wrong and how to fix it; the CLI prints it as one line and exits 2.
    """


class OutputBusy(UsageError):
    """Another focuslens process is writing the same output (see :func:`focuslens.core.io.output_lock`)."""


def is_expected(e: BaseException) -> bool:
    """Whether ``e`` is caused by the input (a file, format, device, model, data or argument) rather than
    a bug: :class:`UsageError` and the other ``ValueError`` / ``TypeError`` s the library raises for bad
    values, ``OSError`` (missing, unreadable or corrupt files, a full disk; ``gzip.BadGzipFile``),
    ``EOFError`` (a truncated ``.gz``), safetensors' ``SafetensorError`` and running out of memory.
    Everything else (``KeyError``, ``AttributeError``, ``IndexError``, a plain ``RuntimeError``...) is
    treated as a bug: a message of the library never escapes as one of those."""
    import torch

    kinds: list[type[BaseException]] = [ValueError, TypeError, OSError, EOFError, torch.OutOfMemoryError]
    try:
        from safetensors import SafetensorError

        kinds.append(SafetensorError)
    except ImportError:  # pragma: no cover - a hard dependency
        pass
    return isinstance(e, tuple(kinds))


def one_line(e: BaseException, *, limit: int = 400) -> str:
    """The message of ``e`` on one line (whitespace collapsed, at most ``limit`` characters)."""
    text = " ".join(str(e).split())
    if isinstance(e, KeyError) and len(e.args) == 1:
        text = f"missing key {e.args[0]!r}"
    return (text if len(text) <= limit else text[: limit - 1] + "…") or type(e).__name__


def write_traceback(label: str) -> str:
    """Write the traceback being handled to a new temporary file and return its path (for bug reports)."""
    import tempfile
    import traceback

    fd, path = tempfile.mkstemp(prefix=f"focuslens-{label}-", suffix=".traceback.txt")
    try:
        os.write(fd, f"focuslens {label}: {' '.join(sys.argv)}\n\n{traceback.format_exc()}".encode())
    finally:
        os.close(fd)
    return path
