"""focuslens.core.io: atomic writes (no half-written file, ever), output locks and content identities.

Kills, planted files and second processes are in tests/test_hostile.py."""

from __future__ import annotations

import json
import os

import pytest
import torch

import focuslens.core.io as fio
from focuslens.core.errors import OutputBusy
from focuslens.core.io import (
    atomic_dir,
    atomic_write,
    atomic_write_json,
    content_hash,
    lock_path,
    output_lock,
    recover_dir,
    tensor_checksum,
)


def test_atomic_write_text_bytes_and_callback(tmp_path):
    p = tmp_path / "a" / "b.json"
    atomic_write(p, "hello")
    assert p.read_text() == "hello"
    atomic_write(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    atomic_write(p, lambda tmp: open(tmp, "w").write("via callback"))
    assert p.read_text() == "via callback"
    atomic_write_json(p, {"x": torch.tensor([1.5]), "y": torch.tensor(2).item()})
    assert json.loads(p.read_text()) == {"x": [1.5], "y": 2}
    assert sorted(os.listdir(p.parent)) == ["b.json"]  # no temporary file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert (p.stat().st_mode & 0o777) == 0o666 & ~umask


def test_atomic_write_crash_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    p = tmp_path / "r.json"
    atomic_write(p, "old")

    def boom(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(p, boom)
    assert p.read_text() == "old"
    assert os.listdir(tmp_path) == ["r.json"]


def test_atomic_write_refuses_a_folder(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder"):
        atomic_write(tmp_path, "x")


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "art"
    with atomic_dir(target) as d:
        (d / "w").write_text("1")
    assert (target / "w").read_text() == "1"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as d:
            (d / "w").write_text("2")
            raise RuntimeError("crash")
    assert (target / "w").read_text() == "1" and sorted(os.listdir(tmp_path)) == ["art"]
    with atomic_dir(target, replace=False) as d:  # a concurrent writer finished first: keep its copy
        (d / "w").write_text("3")
    assert (target / "w").read_text() == "1" and sorted(os.listdir(tmp_path)) == ["art"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        with atomic_dir(tmp_path / "file"):
            pass


def test_atomic_dir_publishes_with_umask_permissions(tmp_path):
    """mkdtemp's 0700 folder and a writer's 0600 file must not leak into the published artefact."""
    old = os.umask(0o022)
    try:
        target = tmp_path / "art"
        with atomic_dir(target) as d:
            fd = os.open(d / "w.bin", os.O_CREAT | os.O_WRONLY, 0o600)  # as safetensors' writer leaves it
            os.close(fd)
            (d / "run.sh").write_text("#!/bin/sh\n")
            os.chmod(d / "run.sh", 0o700)
        assert oct(target.stat().st_mode & 0o777) == oct(0o755)
        assert oct((target / "w.bin").stat().st_mode & 0o777) == oct(0o644)
        assert oct((target / "run.sh").stat().st_mode & 0o777) == oct(0o755)
    finally:
        os.umask(old)


@pytest.mark.parametrize("exchange", [True, False])
def test_atomic_dir_with_and_without_the_atomic_exchange(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(fio, "_exchange", lambda a, b: False)  # two renames (non-Linux)
    target = tmp_path / "art"
    for v in ("1", "2", "3"):
        with atomic_dir(target) as d:
            (d / "w").write_text(v)
        assert (target / "w").read_text() == v and sorted(os.listdir(tmp_path)) == ["art"]


def test_output_lock_refuses_another_holder_and_is_reentrant(tmp_path):
    import fcntl

    target = tmp_path / "records.jsonl"
    with output_lock(target):
        assert lock_path(target).read_text().strip() == str(os.getpid())
        with output_lock(target):  # the same process again: allowed
            pass
        assert lock_path(target).exists()  # still held by the outer block
    assert not lock_path(target).exists()  # removed on release
    with open(lock_path(target), "w") as other:  # another open file description = another holder
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        other.write("123\n")
        other.flush()
        with pytest.raises(OutputBusy, match=r"another focuslens process is writing .*records\.jsonl \(pid 123\)"):
            with output_lock(target):
                pass
    with output_lock(target):  # the other holder is gone (its descriptor closed)
        pass


def test_recover_dir_puts_the_previous_folder_back(tmp_path):
    target = tmp_path / "art"
    assert recover_dir(target) == target  # nothing to do, nothing created
    assert os.listdir(tmp_path) == []
    (tmp_path / ".art.old-1-2").mkdir()
    (tmp_path / ".art.old-1-2" / "w").write_text("old")
    (tmp_path / ".art.tmp-x").mkdir()
    assert recover_dir(target) == target and (target / "w").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["art"]


def test_content_hash_is_stable_and_sensitive():
    a = {"heads": [[1, 2], [0, 1]], "tau": 0.2, "v": torch.ones(3)}
    assert content_hash(a) == content_hash(dict(reversed(list(a.items()))))  # key order does not matter
    assert content_hash(a) != content_hash({**a, "tau": 0.5})
    assert content_hash(a) != content_hash({**a, "heads": [[0, 1], [1, 2]]})  # head order does
    v = torch.ones(3)
    v[1] = torch.nextafter(v[1], torch.tensor(2.0))  # one ulp
    assert content_hash(a) != content_hash({**a, "v": v})
    assert len(content_hash(a)) == 16


def test_tensor_checksum_bits_dtype_shape():
    x = torch.arange(6, dtype=torch.float32)
    assert tensor_checksum(x) == tensor_checksum(x.clone())
    assert tensor_checksum(x) != tensor_checksum(x.double())
    assert tensor_checksum(x) != tensor_checksum(x.reshape(2, 3))
    assert tensor_checksum(x.reshape(2, 3).t()) == tensor_checksum(x.reshape(2, 3).t().contiguous())
    assert tensor_checksum(torch.tensor(1.0)) != tensor_checksum(torch.tensor(2.0))  # 0-dim works
    assert tensor_checksum(torch.zeros(0)) == tensor_checksum(torch.zeros(0))
    assert tensor_checksum(torch.tensor(-0.0)) != tensor_checksum(torch.tensor(0.0))  # bits, not values


def test_file_checksum_streams_bytes(tmp_path):
    import hashlib

    from focuslens.core.io import file_checksum

    p = tmp_path / "d.bin"
    data = bytes(range(256)) * 5000  # > one 1 MiB block
    p.write_bytes(data)
    assert file_checksum(p) == hashlib.sha256(data).hexdigest()[:16]
    p.write_bytes(data[:-1] + b"\x00")
    assert file_checksum(p) != hashlib.sha256(data).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Issue #34: writes never destroy what they did not create; reading needs no lock


@pytest.mark.parametrize("exchange", [True, False])
@pytest.mark.parametrize("links", [True, False])
def test_atomic_dir_keeps_the_files_it_does_not_write(tmp_path, monkeypatch, exchange, links):
    """Replacing an artefact replaces its own files only: the user's files, folders and links stay."""
    if not exchange:
        monkeypatch.setattr(fio, "_exchange", lambda a, b: False)
    if not links:  # a file system without hard links: the files are copied instead
        def no_link(*a, **k):
            raise OSError(1, "Operation not permitted")
        monkeypatch.setattr(fio.os, "link", no_link)
    target = tmp_path / "art"
    with atomic_dir(target) as d:
        (d / "w").write_text("1")
    (target / "NOTES.md").write_text("notes")
    (target / "sub").mkdir()
    (target / "sub" / "x.txt").write_text("x")
    (target / "ln").symlink_to("NOTES.md")
    with atomic_dir(target) as d:
        (d / "w").write_text("2")
        (d / "NOTES.md").write_text("the artefact's own NOTES.md")  # a file the writer writes is replaced
    assert (target / "w").read_text() == "2"
    assert (target / "NOTES.md").read_text() == "the artefact's own NOTES.md"
    assert (target / "sub" / "x.txt").read_text() == "x"
    assert (target / "ln").is_symlink() and os.readlink(target / "ln") == "NOTES.md"
    assert sorted(os.listdir(tmp_path)) == ["art"]
    # an interrupted write still leaves the previous folder with the user's files
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as d:
            raise RuntimeError("crash")
    assert (target / "sub" / "x.txt").read_text() == "x" and sorted(os.listdir(tmp_path)) == ["art"]


def test_atomic_dir_refuses_a_symlink_and_atomic_write_replaces_one(tmp_path):
    from focuslens.core.errors import UsageError

    real = tmp_path / "real"
    real.mkdir()
    (real / "keep").write_text("k")
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    with pytest.raises(UsageError, match="link is a symbolic link.*give the real path"):
        with atomic_dir(tmp_path / "link") as d:
            (d / "w").write_text("1")
    assert os.listdir(real) == ["keep"] and (tmp_path / "link").is_symlink()
    # atomic_write never writes through a link: the link is replaced, the file it pointed to is untouched
    user = tmp_path / "user.txt"
    user.write_text("precious")
    (tmp_path / "out.json").symlink_to(user)
    atomic_write(tmp_path / "out.json", "{}")
    assert user.read_text() == "precious"
    assert not (tmp_path / "out.json").is_symlink() and (tmp_path / "out.json").read_text() == "{}"


def test_output_lock_if_writable_yields_the_refusal_on_a_read_only_folder(tmp_path, monkeypatch):
    import errno

    from focuslens.core.io import output_lock_if_writable

    with output_lock_if_writable(tmp_path / "a.jsonl") as refused:
        assert refused is None and lock_path(tmp_path / "a.jsonl").exists()
    assert not lock_path(tmp_path / "a.jsonl").exists()
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", os.fsdecode(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(fio.os, "open", read_only)
    with output_lock_if_writable(tmp_path / "a.jsonl") as refused:
        assert isinstance(refused, OSError) and refused.errno == errno.EROFS
    with pytest.raises(OSError):  # output_lock itself still needs the lock file
        with output_lock(tmp_path / "a.jsonl"):
            pass
    monkeypatch.undo()
    with output_lock(tmp_path / "a.jsonl"):  # someone else holds it: still refused, read-only or not
        import subprocess
        import sys

        code = ("from focuslens.core.io import output_lock_if_writable\n"
                f"with output_lock_if_writable({str(tmp_path / 'a.jsonl')!r}): pass\n")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
        assert r.returncode != 0 and "OutputBusy" in r.stderr


def test_tensor_checksum_hashes_the_bytes_without_copying_them():
    import hashlib

    for t in (torch.arange(10, dtype=torch.float32), torch.ones(3, 2, dtype=torch.bfloat16), torch.tensor([True])):
        h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        assert tensor_checksum(t) == h.hexdigest()[:16]
