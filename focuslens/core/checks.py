"""One validation per concept, shared by every route (eager sugar, specs, the wrapper, the CLI).

Why one module: the same mistake must be refused the same way wherever it is made. Before this
module, ``SplitSoftmax(heads, tau=True)`` was refused while ``split_softmax(m, heads, span, True)`` ran
as τ = 1, and float heads were truncated by one route and refused by another. Every public entry
point that takes heads, a strength (τ, α, a coefficient) or vectors calls the functions here.

* heads: ``(layer, head)`` pairs of integers (Python, numpy or 0-dim integer tensors); bools and
  floats are refused (never truncated), duplicates are refused, an empty list is refused;
  :func:`check_heads` adds the model's ranges.
* strengths: real, finite numbers, never a bool (:func:`real`); :func:`positive` when the
  neutral value is 1 and the scale is multiplicative (τ, PASTA's coefficient).
* vectors: a non-empty ``{(layer, head): Tensor[d_head]}`` of finite 1-D tensors of one width
  (:func:`frozen_vectors`; ``rows=True`` also takes ``[batch, d_head]``, one vector per batch row); the
  width is checked against the model where one is known, and :func:`check_scaled` refuses an
  ``alpha * u`` that is not finite in the model's dtype (1e38 × 10 overflows float32).
* token ids: integers inside the model's vocabulary (:func:`check_token_ids`, called by
  ``core.models.check_context`` and ``core.forward``), never a bare ``IndexError`` from the embedding.
* files: :func:`check_regular_file` (a FIFO, ``/dev/zero``, an unreadable or huge file is named as
  such before it is opened) and :func:`read_json` / :func:`parse_json` (invalid or too deeply nested
  JSON names the file); dtypes by name: :func:`as_dtype`.

This module imports nothing else of focuslens at import time (``core.models`` uses it).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import stat
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from .errors import UsageError

__all__ = ["Head", "is_index", "head_list", "validate_heads", "check_heads", "real", "positive",
           "frozen_vectors", "check_count", "check_scaled", "check_token_ids", "check_regular_file", "read_json",
           "parse_json", "JSON_MAX_BYTES", "as_dtype", "DTYPES", "check_device"]

Head = tuple[int, int]


def is_index(x: Any) -> bool:
    """An integer (Python, numpy, or a 0-dim integer tensor), not a bool or a float."""
    if isinstance(x, bool):
        return False
    if isinstance(x, torch.Tensor):
        return x.dim() == 0 and not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _pair(h: Any, *, what: str) -> Head:
    try:
        pair = tuple(h)
    except TypeError:
        raise UsageError(f"{what}: heads must be (layer, head) pairs of ints, got {h!r}.") from None
    if len(pair) != 2 or not all(is_index(x) for x in pair):
        raise UsageError(
            f"{what}: heads must be (layer, head) pairs of ints, got {h!r} (bools and floats are not "
            "taken as indices: pass ints, e.g. [(17, 3), (8, 0)]).")
    return int(pair[0]), int(pair[1])


def head_list(heads: Iterable[Sequence[int]], *, what: str = "heads") -> tuple[Head, ...]:
    """``(layer, head)`` pairs of ints, at least one, none twice (no model needed: specs check this
    at construction and the model's ranges when attached)."""
    if isinstance(heads, (str, bytes)) or not isinstance(heads, Iterable):
        raise UsageError(f"{what}: heads must be a list of (layer, head) pairs of ints, got {heads!r}.")
    out = tuple(_pair(h, what=what) for h in heads)
    if not out:
        raise UsageError(f"{what} needs at least one (layer, head); got an empty list.")
    if len(set(out)) != len(out):
        dup = sorted({h for h in out if out.count(h) > 1})
        raise UsageError(f"{what}: heads {dup} are listed twice.")
    return out


def validate_heads(heads: Iterable[Sequence[int]], *, n_layers: int, n_heads: int,
                   what: str = "heads") -> list[Head]:
    """:func:`head_list` plus the ranges ``0 <= layer < n_layers``, ``0 <= head < n_heads``."""
    out = list(head_list(heads, what=what))
    for l, hh in out:
        if not (0 <= l < n_layers and 0 <= hh < n_heads):
            raise UsageError(
                f"Unknown head (layer={l}, head={hh}): this model has layers 0..{n_layers - 1} "
                f"and query heads 0..{n_heads - 1}."
            )
    return out


def check_heads(model: Any, heads: Iterable[Sequence[int]], *, what: str = "heads") -> list[Head]:
    """Validate ``(layer, head)`` pairs against the model; return them as a list of int tuples.

    Raises ``ValueError`` naming the offending head and the valid ranges.
    """
    cfg = getattr(model, "cfg", None)  # what model_info reads; not imported, so that core.models can use these checks
    if cfg is None:
        raise TypeError(f"{what}: expected a TransformerLens hooked model (fl.load_model(...)), got "
                        f"{type(model).__name__}.")
    return validate_heads(heads, n_layers=int(cfg.n_layers), n_heads=int(cfg.n_heads), what=what)


def _number(x: Any, *, name: str, what: str) -> float:
    """``float(x)`` for a real scalar (finite or not); bools, complex numbers and non-scalars refused."""
    if isinstance(x, bool) or (isinstance(x, torch.Tensor) and x.dtype == torch.bool):
        raise UsageError(f"{what}: {name} must be a real number, got {x!r} (a bool is not taken as 0/1).")
    if isinstance(x, torch.Tensor) and x.dim() != 0:
        raise UsageError(f"{what}: {name} must be a real number, got a tensor of shape {tuple(x.shape)}.")
    if isinstance(x, (complex, str, bytes)) or (isinstance(x, torch.Tensor) and x.is_complex()):
        raise UsageError(f"{what}: {name} must be a real number, got {x!r}.")
    try:
        return float(x)
    except (TypeError, ValueError):
        raise UsageError(f"{what}: {name} must be a real number, got {x!r}.") from None


def real(x: Any, *, name: str, what: str) -> float:
    """A real, finite number (an int, a float, a numpy or 0-dim tensor scalar), never a bool or a string."""
    f = _number(x, name=name, what=what)
    if not math.isfinite(f):
        raise UsageError(f"{what}: {name} must be finite, got {x!r}.")
    return f


def positive(x: Any, *, name: str, what: str, why: str = "") -> float:
    """:func:`real` and > 0 (a multiplicative strength: τ, PASTA's coefficient); ``why`` explains the scale.

    Zero, negative and non-finite values get one message, ``"{name} must be > 0 and finite"``.
    """
    f = _number(x, name=name, what=what)
    if not (math.isfinite(f) and f > 0):
        raise UsageError(f"{what}: {name} must be > 0 and finite, got {x!r}{': ' + why if why else '.'}")
    return f


def check_count(k: Any, *, name: str = "k", what: str, upper: int | None = None) -> int:
    """A count ``k >= 1`` (an int, not a bool or a float), at most ``upper`` where given."""
    if not is_index(k) or int(k) < 1 or (upper is not None and int(k) > upper):
        rng = f"1..{upper}" if upper is not None else ">= 1"
        raise UsageError(f"{what}: {name} must be an int in {rng}, got {k!r}.")
    return int(k)


def frozen_vectors(vectors: Mapping[Any, Any], *, what: str, d_head: int | None = None,
                   rows: bool = False) -> Mapping[Head, Tensor]:
    """A read-only private copy of ``{(layer, head): Tensor[d_head]}``: finite 1-D tensors of one width.

    ``rows=True`` also takes ``Tensor[batch, d_head]`` for every head (one vector per batch row, the same
    ``batch`` for all). Why a copy: changing the caller's tensor later must not change a spec's effect
    or identity.
    """
    if not isinstance(vectors, Mapping) or len(vectors) == 0:
        raise UsageError(f"{what} needs a non-empty mapping {{(layer, head): Tensor[d_head]}}.")
    out: dict[Head, Tensor] = {}
    shape = None
    for key, u in vectors.items():
        layer, head = _pair(key, what=what)
        if (layer, head) in out:
            raise UsageError(f"{what}: head {(layer, head)} is listed twice.")
        t = _vector(u, (layer, head), what=what, rows=rows)
        if shape is not None and t.shape != shape:
            raise UsageError(f"{what}: vectors have different shapes ({tuple(shape)} and {tuple(t.shape)}): give "
                             "every head [d_head]" + (", or every head [batch, d_head]." if rows else "."))
        if d_head is not None and t.shape[-1] != d_head:
            raise UsageError(f"{what}: the vector for {(layer, head)} has {t.shape[-1]} entries; this model's "
                             f"heads have d_head = {d_head} (give vectors of shape [{d_head}]).")
        shape = t.shape
        out[(layer, head)] = t
    return MappingProxyType(out)


def _vector(u: Any, head: Head, *, what: str, rows: bool) -> Tensor:
    try:
        if isinstance(u, (bool, str, bytes)):
            raise TypeError
        t = torch.as_tensor(u).detach().to("cpu").clone()
    except (TypeError, ValueError, RuntimeError):
        raise UsageError(f"{what}: the vector for {head} must be a 1-D tensor, got {type(u).__name__}.") from None
    if t.dtype == torch.bool or t.is_complex():
        raise UsageError(f"{what}: the vector for {head} must be real-valued, got dtype {t.dtype}.")
    if not (t.dim() == 1 or (rows and t.dim() == 2 and t.shape[0] >= 1)) or t.shape[-1] == 0:
        want = "[d_head] (or [batch, d_head], one per batch row)" if rows else "[d_head]"
        raise UsageError(f"{what}: the vector for {head} has shape {tuple(t.shape)}; expected {want}.")
    if not torch.isfinite(t).all():
        raise UsageError(f"{what}: the vector for {head} contains NaN or inf.")
    return t


def check_scaled(vectors: Mapping[Head, Tensor], alpha: float, *, dtype: torch.dtype, what: str) -> None:
    """``alpha * u`` must be finite in ``dtype`` (the model's): a finite α times finite entries can still
    overflow (1e38 × 10 is inf in float32), and an inf query turns every logit into NaN without an error."""
    for head, u in vectors.items():
        scaled = (alpha * u.to(torch.float64)).to(dtype)
        if not torch.isfinite(scaled).all():
            big = float(u.abs().max())
            raise UsageError(
                f"{what}: alpha * vector for {head} is not finite in {str(dtype).replace('torch.', '')} "
                f"(alpha = {alpha:g}, largest |entry| = {big:g}): use a smaller alpha or rescale the vector.")


def check_token_ids(tokens: Tensor, d_vocab: int, *, what: str = "tokens") -> None:
    """Token ids are integers in ``0..d_vocab-1`` (the model's vocabulary); an id outside it would fail deep
    inside the embedding with a bare ``IndexError`` (or read another row on some devices)."""

    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise UsageError(f"{what} must be integer token ids, got dtype {str(tokens.dtype).replace('torch.', '')}; "
                         "tokenize the text first (model.tokenizer(text).input_ids or build_prompt).")
    if tokens.numel() == 0:
        raise UsageError(f"{what} is empty (no token ids); give at least one token.")
    if tokens.device.type == "meta" or not d_vocab:
        return
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= d_vocab:
        bad = lo if lo < 0 else hi
        raise UsageError(f"{what} has token id {bad}, outside this model's vocabulary (ids 0..{d_vocab - 1}); "
                         "tokenize with this model's own tokenizer (model.tokenizer).")


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def check_regular_file(path: str | os.PathLike, *, what: str, max_bytes: int | None = None) -> Path:
    """``path`` is a readable regular file of at most ``max_bytes``: refused before it is opened, since
    opening a FIFO blocks forever and reading a link to ``/dev/zero`` never ends.

    Raises ``FileNotFoundError`` for a missing file and :class:`~focuslens.core.errors.UsageError` for
    anything else, naming the file, what is wrong with it and what to give instead (``what``).
    """

    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: no such file; give {what}.") from None
    except OSError as e:
        raise UsageError(f"{p}: cannot be read ({e.strerror}); give {what}.") from None
    link = f" (a symlink to {os.path.realpath(p)})" if p.is_symlink() else ""
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{p}{link} is {_file_kind(st.st_mode)}, not a regular file; give {what}.")
    if max_bytes is not None and st.st_size > max_bytes:
        raise UsageError(f"{p}{link} is too large ({st.st_size} bytes; at most {max_bytes} are read); give {what}.")
    if not os.access(p, os.R_OK):
        raise UsageError(f"{p}{link} is not readable (permission denied); give {what} that you can read.")
    return p


JSON_MAX_BYTES = 1 << 30  # 1 GiB: far above any ranking, config or record file focuslens writes


def parse_json(text: str | bytes, path: str | os.PathLike, *, what: str) -> Any:
    """``json.loads(text)`` of the file ``path``; invalid or too deeply nested JSON is a
    :class:`~focuslens.core.errors.UsageError` naming the file (``what``: what was expected, and the fix)."""

    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); {what}.") from None
    except RecursionError:
        raise UsageError(f"{path}: the JSON is nested too deeply to read (thousands of levels of [ or {{); "
                         f"{what}.") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not a text file (not UTF-8); {what}.") from None


def read_json(path: str | os.PathLike, *, what: str, max_bytes: int = JSON_MAX_BYTES) -> Any:
    """The JSON of a user-given file (:func:`check_regular_file` then :func:`parse_json`): every failure
    names the file and says what is wrong with it."""
    p = check_regular_file(path, what=what, max_bytes=max_bytes)

    try:
        data = p.read_bytes()
    except OSError as e:
        raise UsageError(f"{p}: cannot be read ({e.strerror or e}); give {what}.") from None
    return parse_json(data, p, what=f"give {what}")


def check_device(device: Any, *, name: str = "device") -> torch.device:
    """A device this torch can use (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``), as a ``torch.device``;
    a misspelt name, a GPU this machine does not have, or a bool is a :class:`~focuslens.core.errors.UsageError`
    naming ``name`` (the argument or the CLI option), never torch's ``RuntimeError`` from deep inside a load."""

    cpu = f"{name} cpu" if name.startswith("--") else "device='cpu'"  # the fix, in the interface that was used
    try:
        if isinstance(device, bool):
            raise TypeError
        d = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"{name} {device!r} is not a torch device; use cpu, cuda, cuda:1 or mps.") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{name} {device}: this torch sees no CUDA GPU (torch.cuda.is_available() is False); "
                             f"use {cpu}.")
        n = torch.cuda.device_count()
        if d.index is not None and d.index >= n:
            raise UsageError(f"{name} {device}: there are {n} CUDA devices (cuda:0..cuda:{n - 1}).")
    elif d.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"{name} {device}: MPS is not available here; use {cpu}.")
    elif d.type != "cpu":
        raise UsageError(f"{name} {device}: focuslens runs on cpu, cuda or mps.")
    return d


DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
    {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16})


def as_dtype(x: Any, *, name: str = "dtype", what: str) -> torch.dtype | None:
    """A floating-point ``torch.dtype`` from a dtype or its name (``"float32"``, ``"float16"``, ``"bfloat16"``,
    also ``"torch.float16"``); ``None`` passes through. Anything else is refused naming the choices."""

    if x is None or isinstance(x, torch.dtype) and x.is_floating_point:
        return x
    if isinstance(x, str) and x.removeprefix("torch.") in DTYPES:
        return DTYPES[x.removeprefix("torch.")]
    raise UsageError(f"{what}: {name} must be a floating-point torch dtype or one of {', '.join(map(repr, DTYPES))}, "
                     f"got {x!r}.")
