"""Atomic writes and content identities: the one place where focuslens writes files and hashes content.

Why one module: a research tool's stored results must never be half-written (a crash mid-write would
leave a truncated JSON that a resume then trusts) and must carry the identity of what produced them
(a result keyed by a *name* is silently reused by another run with the same name). Every file the
library writes goes through :func:`atomic_write` (a file) or :func:`atomic_dir` (a folder artefact);
every stored result is keyed with :func:`content_hash` of what produced it.

Nothing here unpickles: files the library reads are JSON, JSONL or safetensors.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

__all__ = ["atomic_write", "atomic_write_json", "atomic_dir", "content_hash", "tensor_checksum", "file_checksum"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, data: str | bytes | Callable[[str], Any]) -> Path:
    """Write ``path`` so that a reader sees either the old file or the whole new one, never half.

    ``data`` is the text, the bytes, or a callable ``write(tmp_path)`` that writes the file itself
    (plotly's ``write_html``/``write_image``, safetensors' ``save_file``). The temporary file sits
    beside the target (same file system, so the final ``os.replace`` is atomic), keeps the target's
    suffix (some writers choose the format from it) and gets the usual umask permissions.
    """
    path = Path(path)
    if path.exists() and path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file path to write.")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f"{path.suffix}.tmp", dir=path.parent)
    try:
        if callable(data):
            os.close(fd)
            data(tmp)
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """:func:`atomic_write` of ``json.dumps(obj)`` (floats such as numpy scalars become numbers)."""
    return atomic_write(path, json.dumps(obj, indent=indent, default=_json_default))


def _json_default(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Build a folder artefact in a temporary sibling, then move it to ``path`` in one step.

    Yields the temporary folder to fill. On success it replaces ``path`` (an existing folder is
    moved aside first and deleted after; with ``replace=False`` an existing folder is kept and the new
    one discarded — a concurrent writer finished first). On an exception the temporary folder is
    removed and a previous artefact at ``path`` is left intact.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder; give a folder path for this artefact.")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old = None
    try:
        yield tmp
        if target.exists():
            if not replace:
                shutil.rmtree(tmp, ignore_errors=True)
                return
            old = target.parent / f".{target.name}.old-{os.getpid()}-{time.time_ns()}"
            os.replace(target, old)
        os.replace(tmp, target)
    except BaseException:
        if old is not None and not target.exists():
            os.replace(old, target)
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def content_hash(obj: Any, *, n: int = 16) -> str:
    """A short stable hash of a JSON-serialisable description (keys sorted; tensors by value).

    This is the key of every stored result: two runs share stored results only if everything in the
    description (model fingerprint, data, intervention identity, decoding settings) is equal.
    """
    text = json.dumps(obj, sort_keys=True, default=_hash_default, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def _hash_default(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return {"tensor": tensor_checksum(x)}
    identity = getattr(x, "identity", None)
    if isinstance(identity, dict):
        return identity
    return _json_default(x) if not isinstance(x, (set, frozenset)) else sorted(x)


def tensor_checksum(x: torch.Tensor, *, n: int = 16) -> str:
    """SHA-256 of a tensor's dtype, shape and exact bytes (CPU, contiguous): equal iff bit-identical."""
    t = x.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:n]


def file_checksum(path: str | os.PathLike, *, n: int = 16) -> str:
    """SHA-256 of a file's bytes (streamed): the identity of a ranking file, a data file, an input."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:n]
