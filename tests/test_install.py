"""What pip resolves is what the runtime accepts (issue #35: a plain `pip install` picked transformers
5.25, which `load_model` then refused). pyproject.toml's declared ranges against
``check_bridge_versions``; the ``figures`` extra carries what PNG export needs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from focuslens.core import models

packaging = pytest.importorskip("packaging")
from packaging.requirements import Requirement  # noqa: E402
from packaging.version import Version  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _project() -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirement(name: str, reqs: list[str]) -> Requirement:
    found = [Requirement(r) for r in reqs if Requirement(r).name == name]
    assert len(found) == 1, f"{name} is declared {len(found)} times in {reqs}"
    return found[0]


def _accepted(monkeypatch, transformers: str, transformer_lens: str) -> bool:
    vers = {"transformers": transformers, "transformer-lens": transformer_lens, "transformer_lens": transformer_lens}
    monkeypatch.delenv("FOCUSLENS_ALLOW_ANY_TRANSFORMERS", raising=False)
    monkeypatch.setattr(models, "_version", lambda dist: tuple(int(x) for x in vers[dist].split(".")))
    try:
        models.check_bridge_versions()
        return True
    except RuntimeError:
        return False


# every transformers release from the floor on, and the TransformerLens releases the range admits (PyPI,
# 2026-12-06: 4.3.0 is the newest; no release has the 5.24 fix)
TRANSFORMERS = ["5.9.0", "5.10.4", "5.20.2", "5.22.2", "5.23.0", "5.24.0", "5.25.0", "5.30.0", "6.0.0"]
TRANSFORMER_LENS = ["3.9.0", "4.0.0", "4.2.0", "4.3.0"]


@pytest.mark.parametrize("tl", TRANSFORMER_LENS)
def test_declared_transformers_range_is_what_load_model_accepts(monkeypatch, tl):
    deps = _project()["dependencies"]
    tf_spec = _requirement("transformers", deps).specifier
    assert Version(tl) in _requirement("transformer-lens", deps).specifier
    for tf in TRANSFORMERS:
        declared = Version(tf) in tf_spec
        accepted = _accepted(monkeypatch, tf, tl)
        assert declared == accepted, (f"transformers {tf} with TransformerLens {tl}: pyproject "
                                      f"{'allows' if declared else 'excludes'} it, load_model "
                                      f"{'accepts' if accepted else 'refuses'} it")


def test_the_refusal_names_the_declared_range(monkeypatch):
    deps = _project()["dependencies"]
    spec = str(_requirement("transformers", deps).specifier)
    monkeypatch.delenv("FOCUSLENS_ALLOW_ANY_TRANSFORMERS", raising=False)
    monkeypatch.setattr(models, "_version", lambda dist: (5, 25, 0) if dist == "transformers" else (4, 3, 0))
    with pytest.raises(RuntimeError) as e:
        models.check_bridge_versions()
    assert all(part in str(e.value) for part in spec.split(",")), (spec, str(e.value))


def test_the_figures_extra_carries_png_export():
    extra = {Requirement(r).name: Requirement(r) for r in _project()["optional-dependencies"]["figures"]}
    assert Version("1.0") in extra["kaleido"].specifier and Version("0.2.1") not in extra["kaleido"].specifier
    # kaleido 1.x is used by plotly >= 6.1 only; plotly 7 refuses kaleido 0.2
    assert Version("6.0.1") not in extra["plotly"].specifier and Version("7.1.0") in extra["plotly"].specifier
