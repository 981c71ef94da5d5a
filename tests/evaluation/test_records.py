"""The records file of evaluate(): per-line hashes, what a resume accepts, older formats (issue #34).

The hostile cases (edited, duplicated, malformed lines; files that are not records; links; a read-only
file system) are in tests/test_hostile.py, section 10.
"""

from __future__ import annotations

import json

import pytest

from focuslens.core.errors import UsageError
from focuslens.core.io import content_hash
from focuslens.evaluation.records_io import RECORD_FORMAT_VERSION, line_hash
from focuslens.evaluation.runner import evaluate
from focuslens.tasks import make_synthetic_qa


def _run(model, out, n=3, **kw):
    return evaluate(model, make_synthetic_qa(n, n_docs=2, seed=5), output=out, progress=False, max_new_tokens=2, **kw)


def test_every_line_carries_its_hash_and_resumed_records_equal_fresh_ones(tiny_llama, tmp_path):
    out = tmp_path / "r.jsonl"
    fresh = _run(tiny_llama, out)
    head, *lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert head["focuslens_eval"] == RECORD_FORMAT_VERSION == 2
    assert head["config_hash"] == content_hash(head["config"]) == fresh.config_hash
    for rec in lines:
        assert rec["line_hash"] == line_hash(rec, fresh.config_hash)
        assert line_hash(rec, "another-run") != rec["line_hash"]  # the run's hash is part of it
    resumed = _run(tiny_llama, out)
    assert resumed.n_resumed == 3
    assert resumed.records == fresh.records  # the same dicts: no line_hash in memory, fresh or resumed
    assert all("line_hash" not in r for r in resumed.records)


def test_a_whole_last_record_without_its_newline_is_kept(tiny_llama, tmp_path):
    """An editor that drops the final newline loses nothing: the record is kept, the newline restored."""
    out = tmp_path / "r.jsonl"
    _run(tiny_llama, out, n=2)
    out.write_text(out.read_text().rstrip("\n"))
    res = _run(tiny_llama, out, n=3)
    assert res.n_resumed == 2
    lines = out.read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(x) for x in lines)


def test_a_torn_last_line_is_recomputed_with_a_warning(tiny_llama, tmp_path):
    out = tmp_path / "r.jsonl"
    first = _run(tiny_llama, out, n=2)
    text = out.read_text()
    out.write_text(text[: text.rstrip("\n").rfind("\n") + 1 + 20])  # the run died writing record 2
    with pytest.warns(UserWarning, match=r"r\.jsonl:3: the last line is incomplete.*recomputed"):
        res = _run(tiny_llama, out, n=2)
    assert res.n_resumed == 1 and res.predictions == first.predictions
    lines = out.read_text().splitlines()
    assert lines[:2] == text.splitlines()[:2] and len(lines) == 3  # the torn line was cut, then rewritten
    assert json.loads(lines[2])["prediction"] == first.predictions[1]


def test_records_of_the_older_format_are_refused_not_resumed(tiny_llama, tmp_path):
    """Format 1 (no per-line hashes, a sampled weights digest) cannot be checked: recompute."""
    out = tmp_path / "old.jsonl"
    old_cfg = {"format": 1, "model": "x", "model_weights": "22d53657e8245217"}
    old = json.dumps({"focuslens_eval": 1, "config_hash": content_hash(old_cfg), "config": old_cfg}) + "\n"
    old += json.dumps({"key": "0:q0", "config_hash": content_hash(old_cfg), "em": True, "prediction": "x"}) + "\n"
    out.write_text(old)
    with pytest.raises(UsageError, match=r"old\.jsonl holds records of an older focuslens \(records format 1.*"
                                         r"delete the file to recompute them. Use another output file, or "
                                         r"resume=False"):
        _run(tiny_llama, out)
    assert out.read_text() == old
    res = _run(tiny_llama, out, resume=False)  # a focuslens records file: resume=False may overwrite it
    assert res.n_resumed == 0 and json.loads(out.read_text().splitlines()[0])["focuslens_eval"] == 2
    newer = tmp_path / "newer.jsonl"
    newer.write_text(json.dumps({"focuslens_eval": 99, "config_hash": "h", "config": {}}) + "\n")
    with pytest.raises(UsageError, match="newer focuslens"):
        _run(tiny_llama, newer)


def test_an_edited_header_is_refused(tiny_llama, tmp_path):
    out = tmp_path / "r.jsonl"
    _run(tiny_llama, out)
    lines = out.read_text().splitlines()
    head = json.loads(lines[0])
    head["config"]["max_new_tokens"] = 99  # the hash still says 2
    out.write_text("\n".join([json.dumps(head), *lines[1:]]) + "\n")
    with pytest.raises(UsageError, match=r"r\.jsonl:1: the header's config does not match its config_hash"):
        _run(tiny_llama, out)


def test_an_empty_file_or_a_folder_as_output(tiny_llama, tmp_path):
    out = tmp_path / "empty.jsonl"
    out.touch()
    assert len(_run(tiny_llama, out)) == 3 and len(out.read_text().splitlines()) == 4
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(UsageError, match=r"dir\.jsonl is a folder, not a regular file"):
        _run(tiny_llama, tmp_path / "dir.jsonl")
