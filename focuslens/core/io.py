"""Atomic writes and content identities: the one place where focuslens writes files and hashes content.

Why one module: a research tool's stored results must never be half-written (a crash mid-write would
leave a truncated JSON that a resume then trusts) and must carry the identity of what produced them
(a result keyed by a *name* is silently reused by another run with the same name). Every file the
library writes goes through :func:`atomic_write` (a file) or :func:`atomic_dir` (a folder artefact);
every stored result is keyed with :func:`content_hash` of what produced it.

Two processes writing one output would interleave records or replace each other's artefact halfway:
:func:`output_lock` (an ``flock`` on a hidden sibling ``.NAME.lock`` file, non-blocking) refuses the
second writer with a message naming the first one's pid. :func:`atomic_dir` takes it, and the CLI
takes it for every output it writes. A reader that may also write (``evaluate`` resuming a records file)
takes :func:`output_lock_if_writable`: on a read-only file system it reads without the lock and refuses
only an actual write.

Writes never destroy what focuslens did not create: :func:`atomic_dir` refuses a symbolic link as the
folder and keeps every file of the previous folder that the new artefact does not write (a user's
``NOTES.md`` in an artefact folder survives a save); :func:`atomic_write` replaces a symbolic link at
the target by the new file and never writes through it (the file the link pointed to is untouched);
:func:`refuse_link` is the check for writers that append in place.

Nothing here unpickles: files the library reads are JSON, JSONL or safetensors.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .errors import OutputBusy, UsageError

try:  # POSIX; elsewhere output_lock degrades to no locking
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["atomic_write", "atomic_write_json", "atomic_dir", "recover_dir", "output_lock", "output_lock_if_writable",
           "refuse_link", "content_hash", "tensor_checksum", "file_checksum"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, data: str | bytes | Callable[[str], Any]) -> Path:
    """Write ``path`` so that a reader sees either the old file or the whole new one, never half.

    ``data`` is the text, the bytes, or a callable ``write(tmp_path)`` that writes the file itself
    (plotly's ``write_html``/``write_image``, safetensors' ``save_file``). The temporary file sits
    beside the target (same file system, so the final ``os.replace`` is atomic), keeps the target's
    suffix (some writers choose the format from it) and gets the usual umask permissions. A symbolic
    link at ``path`` is replaced by the new file, never written through: the file it pointed to is
    left as it was.
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


# --------------------------------------------------------------------------------------------------
# Output locks
# --------------------------------------------------------------------------------------------------

_HELD: dict[str, list] = {}  # lock file -> [fd, depth]: re-entrant within one process


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of an output: the hidden sibling ``.NAME.lock`` (its content is the holder's pid)."""
    p = Path(path).absolute()
    return p.parent.resolve() / f".{p.name}.lock"  # one lock whatever symlinks lead to the folder


@contextlib.contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold the write lock of ``path`` (a file or a folder) for the ``with`` block, or refuse at once.

    A second process that asks for the same output while the first holds it gets
    :class:`~focuslens.core.errors.OutputBusy` ("another focuslens process is writing X (pid N); wait for it
    or choose another output") instead of interleaving records or replacing a folder halfway. The
    lock is ``fcntl.flock`` on ``.NAME.lock`` beside ``path`` (non-blocking), so the kernel drops it
    when the holder exits or is killed: a stale lock file never blocks anyone (a clean exit removes
    it; a killed holder leaves an unlocked, harmless file). Re-entrant within one
    process (the CLI locks a command's output and the library then locks the same path again).
    """
    lock = lock_path(path)
    key = str(lock)
    held = _HELD.get(key)
    if held is not None:
        held[1] += 1
        try:
            yield Path(path)
        finally:
            held[1] -= 1
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                        raise
                    pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                    raise OutputBusy(
                        f"another focuslens process is writing {Path(path)} (pid {pid}); wait for it to finish "
                        "or choose another output."
                    ) from None
            try:  # the holder before us may have removed the file after we opened it: lock the live one
                same = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        break
    _HELD[key] = [fd, 1]
    try:
        yield Path(path)
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            os.unlink(lock)  # while still holding it: a waiter that opened it retries on the new file
        os.close(fd)  # closing the descriptor releases the flock


#: errno values of a file system that refuses to create the lock file (read-only mount, no permission).
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


@contextlib.contextmanager
def output_lock_if_writable(path: str | os.PathLike) -> Iterator[OSError | None]:
    """:func:`output_lock` of ``path`` where the lock file can be made; yields ``None`` while holding it.

    Where the file system refuses to create the lock file (a read-only mount or folder: ``EROFS``,
    ``EACCES``, ``EPERM``) nothing is held and the refusal is yielded: the caller may read ``path`` but
    must not write it, and should name that error when a write turns out to be needed. A reader of a
    finished file therefore works on a read-only file system. Another process holding the lock is
    still refused with :class:`~focuslens.core.errors.OutputBusy`.
    """
    refused: OSError | None = None
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(output_lock(path))
        except OSError as e:  # OutputBusy is not an OSError: a busy output is still refused
            if e.errno not in _READ_ONLY:
                raise
            refused = e
        yield refused


def refuse_link(path: str | os.PathLike, *, what: str = "output") -> None:
    """Raise :class:`~focuslens.core.errors.UsageError` if ``path`` is a symbolic link.

    For writers that modify a file in place (append, truncate): through a link they would change a
    file the user keeps elsewhere. Links in the folders above ``path`` are fine.
    """
    p = Path(path)
    if p.is_symlink():
        raise UsageError(f"{p} is a symbolic link (to {os.readlink(p)}); focuslens does not write an {what} "
                         "through a link, so that the file it points to is never changed: give the real path "
                         "or choose another output path.")


def _try_lock(path: Path):
    """``output_lock(path)`` if it is free, else ``None`` (somebody is writing); ``False`` if no lock can be made."""
    try:
        cm = output_lock(path)
        cm.__enter__()
        return cm
    except OutputBusy:
        return None
    except OSError:  # read-only folder: nobody can be writing there through focuslens either
        return False


# --------------------------------------------------------------------------------------------------
# Folder artefacts
# --------------------------------------------------------------------------------------------------

_RENAME_EXCHANGE = 2  # linux/fs.h
_renameat2 = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    global _renameat2
    if _renameat2 is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            _renameat2 = fn
        except (AttributeError, OSError):
            _renameat2 = False
    if _renameat2 is False:
        return False
    AT_FDCWD = -100
    if _renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _leftovers(target: Path) -> tuple[list[Path], list[Path]]:
    """Hidden siblings left by interrupted writers: (``.NAME.old-*`` previous artefacts, ``.NAME.tmp-*``)."""
    def mtime(p: Path) -> int:
        try:
            return p.stat().st_mtime_ns
        except OSError:  # removed meanwhile
            return -1

    olds = sorted((p for p in target.parent.glob(f".{target.name}.old-*") if p.is_dir()), key=mtime, reverse=True)
    return olds, [p for p in target.parent.glob(f".{target.name}.tmp-*") if p.is_dir()]


def _recover_locked(target: Path) -> None:
    """With the lock held (so no writer is alive): put a previous artefact back if ``target`` is
    missing, then delete every leftover of dead writers."""
    olds, tmps = _leftovers(target)
    if not target.exists() and olds:
        os.replace(olds[0], target)
        olds = olds[1:]
    for p in olds + tmps:
        shutil.rmtree(p, ignore_errors=True)


def recover_dir(path: str | os.PathLike, *, wait: float = 10.0) -> Path:
    """Make a folder artefact at ``path`` readable after an interrupted writer; returns the folder to read.

    :func:`atomic_dir` replaces a folder with one atomic exchange where the OS has it (Linux), else
    with two renames (``path`` -> ``.NAME.old-*``, then the new folder -> ``path``); a kill between
    those two leaves ``path`` missing. Here, when no writer holds the lock, the previous artefact is
    moved back and leftovers (``.NAME.old-*``, ``.NAME.tmp-*``) are deleted; while a writer holds it,
    this waits up to ``wait`` seconds for ``path`` to reappear. In a read-only folder nothing is
    changed and the newest previous artefact is returned to be read where it lies.
    """
    target = Path(path)
    olds, tmps = _leftovers(target)
    if not olds and not tmps:
        return target
    lock = _try_lock(target)
    if lock is False:
        return target if target.exists() or not olds else olds[0]
    if lock is None:  # a writer is between its renames (microseconds) or still building
        deadline = time.monotonic() + wait
        while not target.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return target
    try:
        _recover_locked(target)
    finally:
        lock.__exit__(None, None, None)
    return target


def _publishable(folder: Path) -> None:
    """Give a finished temporary folder the permissions a plain ``mkdir`` + write would have.

    ``mkdtemp`` makes the folder 0700 and some writers (safetensors) leave 0600 files: an artefact in
    a shared lab folder would then be unreadable to colleagues. Folders get ``0777 & ~umask``, files
    ``0666 & ~umask`` (an executable bit that a writer set is kept).
    """
    mask = _umask()
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for f in files:
            fp = os.path.join(root, f)
            if not os.path.islink(fp):
                os.chmod(fp, (0o777 if os.stat(fp).st_mode & 0o100 else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Build a folder artefact in a temporary sibling, then move it to ``path`` in one step.

    Yields the temporary folder to fill. On success it replaces ``path``: one atomic exchange of the
    two folders where the OS supports it (Linux ``renameat2``), else two renames whose gap
    :func:`recover_dir` repairs on the next load or save — a kill at any point leaves the old or the
    new artefact readable at ``path``. With ``replace=False`` an existing folder is kept and the new one
    discarded (a concurrent writer finished first). On an exception the temporary folder is removed
    and a previous artefact at ``path`` is left intact.

    With ``replace=True`` the write holds :func:`output_lock` of ``path`` throughout: a second writer
    gets :class:`~focuslens.core.errors.OutputBusy` instead of a half-swapped folder; leftovers of
    interrupted writers are recovered or removed first.

    Only the artefact's own files are replaced: every entry of the previous folder that the new one
    does not contain (a user's ``NOTES.md``, a subfolder) is carried into the new folder before the
    swap, as a hard link (a copy where the file system has no hard links), so a kill at any point
    still leaves it at ``path``; an entry created in the old folder during the swap is moved over
    after it. A symbolic link at ``path`` is refused (:class:`~focuslens.core.errors.UsageError`):
    swapping it would move the link, not the folder it points to.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    refuse_link(target, what="artefact folder")
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder; give a folder path for this artefact.")
    with output_lock(target) if replace else contextlib.nullcontext():
        if replace:
            _recover_locked(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        old = None
        try:
            yield tmp
            _publishable(tmp)
            if target.exists():
                if not replace:
                    shutil.rmtree(tmp, ignore_errors=True)
                    return
                _carry_over(target, tmp)  # after _publishable: the user's files keep their modes
                if _exchange(tmp, target):
                    old = tmp  # now holds the previous artefact
                else:
                    old = target.parent / f".{target.name}.old-{os.getpid()}-{time.time_ns()}"
                    os.replace(target, old)
                    os.replace(tmp, target)
            else:
                os.replace(tmp, target)
        except BaseException:
            if old is not None and old != tmp and not target.exists():
                os.replace(old, target)
                old = None
            if old is None or old != tmp:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if old is not None:
            _carry_over(old, target, move=True)  # an entry created in the old folder during the swap
            shutil.rmtree(old, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:  # no hard links here (some network or FAT file systems): a copy keeps the content
        shutil.copy2(src, dst, follow_symlinks=False)


def _carry_over(old: Path, new: Path, *, move: bool = False) -> None:
    """Put every entry of folder ``old`` that ``new`` lacks into ``new``: hard links (files), linked
    trees (folders) and copied symbolic links, or with ``move`` renamed (same file system)."""
    for entry in os.scandir(old):
        dst = new / entry.name
        if os.path.lexists(dst):
            continue
        if move:
            os.replace(entry.path, dst)
        elif entry.is_dir(follow_symlinks=False):
            shutil.copytree(entry.path, dst, symlinks=True, copy_function=_link_or_copy)
        elif entry.is_symlink():
            os.symlink(os.readlink(entry.path), dst)
        else:
            _link_or_copy(entry.path, str(dst))


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
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no copy of the bytes
    return h.hexdigest()[:n]


def file_checksum(path: str | os.PathLike, *, n: int = 16) -> str:
    """SHA-256 of a file's bytes (streamed): the identity of a ranking file, a data file, an input."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:n]
