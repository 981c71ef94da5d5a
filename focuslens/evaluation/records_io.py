"""The JSONL records file of :func:`~focuslens.evaluation.runner.evaluate`: written so that nothing is lost,
read back so that nothing is trusted blindly.

Layout (records format 2): line 1 is the header ``{"focuslens_eval": 2, "config_hash": h, "config":
{...}}``; every further line is one example's record, which carries ``line_hash``, a hash of its own
content together with the run's configuration hash ``h``.

Why each rule:

* **Only a focuslens records file is ever modified.** A path that is a symbolic link is refused (a
  write through it would change the file it points to); an existing file whose first line is not a
  focuslens header (a user's notes, another program's JSONL) is refused before any byte is changed,
  also with ``resume=False``; an empty file is fine. Before this, a notes file given as ``output=``
  was cut to its first line and then reported as "damaged".
* **A resumed record is the record that was written.** Every line is checked before anything is
  resumed: a line that is not JSON, not an object (``null``, ``[1, 2]``), has no ``key``, has fields
  of the wrong type, repeats an earlier key, or whose content no longer matches its ``line_hash``
  (``em`` or ``prediction`` edited by hand) is refused with the file, the line number and the fix
  (delete the line or the file; use another output file, or ``resume=False``). The hash detects
  edits and damage, not forgery: it is not keyed.
* **A run that died mid-write** leaves its last line without a newline: that line is dropped and its
  example recomputed (with a warning); the file is cut there only when the next record is written.
* **Older records files** (format 1: no per-line hashes, and a model identity that sampled the
  weights) are refused with a message saying to recompute, never resumed: their answers cannot be
  checked, and their weights digest cannot tell a model from one that differs in unsampled entries.
* **A read-only file system**: a finished records file is read without the write lock
  (:func:`focuslens.core.io.output_lock_if_writable`); only a write that is actually needed (an
  unfinished example, a fresh file) is refused, naming the file and why it cannot be written.
"""

from __future__ import annotations

import contextlib
import json
import numbers
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

from ..core.checks import check_regular_file, parse_json
from ..core.errors import UsageError
from ..core.io import atomic_write, content_hash, output_lock_if_writable, refuse_link

__all__ = ["RECORD_FORMAT_VERSION", "RecordsFile", "open_records", "line_hash"]

#: Version of the records layout: 2 added ``line_hash`` to every record and the full weights digest.
RECORD_FORMAT_VERSION = 2

#: The advice ends with "Use another output file, or resume=False ...": the CLI replaces that part by its own options.
_FIX = "delete that line (or the whole file) to recompute it. Use another output file, or resume=False to recompute all"
_WHAT = "a focuslens records file (.jsonl) or a new path"


def line_hash(record: dict[str, Any], config_hash: str) -> str:
    """The hash a record line carries: its content (every field but ``line_hash``) and the run's config hash."""
    return content_hash({"config_hash": config_hash, "record": {k: v for k, v in record.items() if k != "line_hash"}})


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, numbers.Real)  # bools included: em/substring/copy are written as bools or floats


#: Fields every record must have, with the check of their type (the ones the summary and the resume read).
_FIELDS: dict[str, tuple[Any, str]] = {
    "key": (lambda x: isinstance(x, str), "a string"),
    "index": (lambda x: _is_int(x) and x >= 0, "an integer >= 0"),
    "id": (lambda x: isinstance(x, str), "a string"),
    "prediction": (lambda x: isinstance(x, str), "a string"),
    "answers": (lambda x: isinstance(x, list) and all(isinstance(a, str) for a in x), "a list of strings"),
    "em": (_is_num, "a number"),
    "substring": (_is_num, "a number"),
    "distractor_copy": (_is_num, "a number"),
    "gold_position": (lambda x: x is None or _is_int(x), "an integer or null"),
    "n_prompt_tokens": (_is_int, "an integer"),
    "n_new_tokens": (_is_int, "an integer"),
    "seconds": (_is_num, "a number"),
    "prompt_hash": (lambda x: isinstance(x, str), "a string"),
    "line_hash": (lambda x: isinstance(x, str), "a string"),
}


def _problem(obj: Any, h: str) -> str | None:
    """What is wrong with one parsed record line (``None``: a valid record of the run ``h``)."""
    if not isinstance(obj, dict):
        return f"the line is {json.dumps(obj)[:40]}, not a record (a JSON object)"
    if "focuslens_eval" in obj:
        return "a second header line (two records files were joined?)"
    if obj.get("config_hash") != h:
        return (f"a record of another configuration (config_hash {obj.get('config_hash')!r}, this run's is {h!r})")
    for name, (ok, what) in _FIELDS.items():
        if name not in obj:
            return f"the record has no {name!r}"
        if not ok(obj[name]):
            return f"the record's {name!r} is {json.dumps(obj[name])[:40]}, not {what}"
    if obj["key"] != f"{obj['index']}:{obj['id']}":
        return f"the record's key {obj['key']!r} does not match its index and id"
    if obj["line_hash"] != line_hash(obj, h):
        return "the record's content does not match its line_hash (edited by hand, or damaged)"
    return None


def _header(line: bytes, path: Path) -> dict[str, Any]:
    """The header of a records file, or :class:`UsageError` saying the file is not one (nothing is changed)."""
    not_ours = (f"{path} is not a focuslens records file (its first line is not a focuslens_eval header), so "
                "it is left untouched: choose another output path.")
    try:
        obj = parse_json(line, path, what=not_ours)
    except UsageError:  # invalid, not UTF-8 or too deeply nested
        raise UsageError(not_ours) from None
    if not isinstance(obj, dict) or "focuslens_eval" not in obj:
        raise UsageError(not_ours)
    return obj


def _first_line(path: Path, limit: int = 1 << 24) -> bytes:
    with open(path, "rb") as f:
        return f.readline(limit)


class RecordsFile:
    """The records of one :func:`evaluate` call: ``done`` (key -> record) to resume, :meth:`append` for new ones.

    Use :func:`open_records`, which holds the output lock around it.
    """

    def __init__(self, path: Path, config: dict[str, Any], h: str, *, resume: bool, read_only: OSError | None):
        self.path, self.config, self.h, self.read_only = path, config, h, read_only
        self.done: dict[str, dict[str, Any]] = {}
        self._fh: Any = None
        self._size = 0  # bytes of the file as read or written: a change by someone else is refused
        self._cut: int | None = None  # where a torn last line starts (cut before the next write)
        self._newline = False  # the last line is a whole record without its newline: add one first
        exists = os.path.lexists(path)
        if exists:
            check_regular_file(path, what=_WHAT)
        if resume and exists and path.stat().st_size > 0:
            self._read()
            return
        if exists and path.stat().st_size > 0:  # resume=False: overwrite only a records file
            _header(_first_line(path), path)
        self._writable("write a new records file")
        text = json.dumps({"focuslens_eval": RECORD_FORMAT_VERSION, "config_hash": h, "config": config}) + "\n"
        atomic_write(path, text)
        self._size = len(text.encode("utf-8"))

    # ----------------------------------------------------------------------------------------------
    def _read(self) -> None:
        path = self.path
        with open(path, "rb") as f:
            data = f.read()
        self._size = len(data)
        lines = data.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline
        if not lines:  # one line and no newline: a torn header is never written (atomic_write)
            _header(tail, path)
            raise UsageError(f"{path}:1: the header line has no newline; add one, or delete the file. Use another "
                             "output file, or resume=False to overwrite it.")
        self._check_header(_header(lines[0], path))
        first: dict[str, int] = {}
        for lineno, line in enumerate(lines[1:], start=2):
            if not line.strip():
                continue
            obj = parse_json(line, f"{path}:{lineno}", what=f"the line is truncated or damaged; {_FIX}")
            self._take(obj, lineno, first)
        if tail.strip():
            self._torn(tail, len(lines) + 1, first)

    def _check_header(self, head: dict[str, Any]) -> None:
        path, h = self.path, self.h
        version = head.get("focuslens_eval")
        if version != RECORD_FORMAT_VERSION:
            if _is_int(version) and version > RECORD_FORMAT_VERSION:
                raise UsageError(f"{path} was written by a newer focuslens (records format {version}); upgrade "
                                 "focuslens to resume it. Use another output file, or resume=False to overwrite it.")
            raise UsageError(
                f"{path} holds records of an older focuslens (records format {version!r}: no per-line hashes, and a "
                "model identity that sampled the weights), which cannot be checked, so they are not resumed: "
                "delete the file to recompute them. Use another output file, or resume=False to overwrite it.")
        if not isinstance(head.get("config"), dict) or head.get("config_hash") != content_hash(head["config"]):
            raise UsageError(f"{path}:1: the header's config does not match its config_hash (edited by hand, or "
                             "damaged); delete the file to recompute. Use another output file, or resume=False to "
                             "overwrite it.")
        if head["config_hash"] != h:
            diff = _diff_keys(head["config"], json.loads(json.dumps(self.config)))
            raise UsageError(
                f"{path} holds results of a different evaluation configuration (hash {head['config_hash']} vs {h}; "
                f"differs in {[k for k, _, _ in diff]}: "
                + ", ".join(f"{k}={a!r} there, {b!r} now" for k, a, b in diff)
                + "). Use another output file, or resume=False to overwrite it."
            )

    def _take(self, obj: Any, lineno: int, first: dict[str, int]) -> None:
        why = _problem(obj, self.h)
        if why is None and obj["key"] in first:
            why = f"a second record for example {obj['key']} (the first is on line {first[obj['key']]})"
        if why is not None:
            raise UsageError(f"{self.path}:{lineno}: {why}; {_FIX}.")
        first[obj["key"]] = lineno
        self.done[obj["key"]] = {k: v for k, v in obj.items() if k != "line_hash"}

    def _torn(self, tail: bytes, lineno: int, first: dict[str, int]) -> None:
        """The last line has no newline: keep it if it is a whole valid record, else drop it (cut before the next write)."""
        try:
            obj = parse_json(tail, self.path, what="a torn last line")
        except UsageError:
            obj = None
        if obj is not None and _problem(obj, self.h) is None and obj["key"] not in first:
            self._take(obj, lineno, first)
            self._newline = True
            return
        self._cut = self._size - len(tail)
        warnings.warn(f"{self.path}:{lineno}: the last line is incomplete (the run that wrote it stopped while "
                      "writing); it is dropped and that example is recomputed.", UserWarning, stacklevel=4)

    # ----------------------------------------------------------------------------------------------
    def _writable(self, what: str) -> None:
        if self.read_only is not None:
            e = self.read_only
            raise UsageError(
                f"cannot {what} at {self.path}: its folder is not writable (the lock file {e.filename} could not "
                f"be created: {e.strerror}); {len(self.done)} finished records were read. Make the folder "
                "writable, or choose an output in a writable folder.")

    def append(self, record: dict[str, Any]) -> None:
        """Write one record (with its ``line_hash``) at the end of the file and flush it."""
        if self._fh is None:
            self._writable("add records")
            refuse_link(self.path, what="records file")
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0))
            try:
                if os.fstat(fd).st_size != self._size:
                    raise UsageError(f"{self.path} changed while this run was reading it (another program wrote "
                                     "to it); nothing was added. Rerun to resume, or choose another output.")
                if self._cut is not None:
                    os.ftruncate(fd, self._cut)
                elif self._newline:
                    os.write(fd, b"\n")
            except BaseException:
                os.close(fd)
                raise
            self._fh = os.fdopen(fd, "a", encoding="utf-8")
        line = {**record, "line_hash": line_hash(record, self.h)}
        self._fh.write(json.dumps(line) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


@contextlib.contextmanager
def open_records(path: Path, config: dict[str, Any], h: str, *, resume: bool) -> Iterator[RecordsFile]:
    """The records file ``path`` of the run ``h``, checked line by line, under its write lock.

    One writer per file: a second process is refused (:func:`~focuslens.core.io.output_lock`). Where the
    lock file cannot be created (a read-only file system) the file is still read, and only a write is
    refused. See the module docstring for what is refused and why.
    """
    refuse_link(path, what="records file")
    path.parent.mkdir(parents=True, exist_ok=True)
    with output_lock_if_writable(path) as read_only:
        records = RecordsFile(path, config, h, resume=resume, read_only=read_only)
        try:
            yield records
        finally:
            records.close()


def _diff_keys(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, old, new)`` for every leaf that differs (nested dicts, e.g. a spec identity)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _diff_keys(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [(prefix.rstrip("."), old, new)]
