"""The README's Python example runs as written (at a small size) on the embedded model."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_example() -> str:
    text = README.read_text()
    section = text[text.index("## Python in ten lines"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example_runs(smollm, tmp_path, monkeypatch):
    import focuslens as fl

    code = _python_example()
    assert "fl.FocusLens(" in code and "fl.SplitSoftmax(" in code
    code = code.replace("make_synthetic_qa(50,", "make_synthetic_qa(2,")  # small size for CI
    assert "make_synthetic_qa(2," in code
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fl, "load_model", lambda *a, **k: smollm)  # the session's copy of the same model
    ns: dict = {}
    exec(compile(code, str(README), "exec"), ns)
    assert len(ns["heads"]) == 20 and ns["res"].summary()["n"] == 2
    assert (tmp_path / "runs" / "ss.jsonl").exists()
    assert fl.core.count_hooks(smollm) == 0


def test_readme_your_own_prompt_runs(smollm):
    """The "Your own prompt" section runs as written (issue #35); the full walk-through is notebook 00."""
    import focuslens as fl

    text = README.read_text()
    section = text[text.index("## Your own prompt"):]
    assert "notebooks/00_your_own_prompt.ipynb" in section
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    ns: dict = {"fl": fl, "lens": fl.FocusLens(smollm)}
    exec(compile(code, str(README), "exec"), ns)
    assert ns["est"].shape == ns["exact"].shape == (30, 9)
    assert not ns["exact"][23].isnan().any() and ns["exact"][:23].isnan().all()
    assert fl.core.count_hooks(smollm) == 0


def test_guarantees_cite_tests_that_exist():
    """Every test docs/guarantees.md names as the check of a guarantee is a test function in tests/."""
    root = README.parent
    cited = set(re.findall(r"`(test_[a-z0-9_]+)", (root / "docs" / "guarantees.md").read_text()))
    source = "\n".join(p.read_text() for p in (root / "tests").rglob("test_*.py"))
    defined = set(re.findall(r"^def (test_[a-z0-9_]+)", source, re.M))
    assert len(cited) > 30
    assert not cited - defined, sorted(cited - defined)
