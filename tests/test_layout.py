"""The package's shape: folders in the method's order, imports one way, a one-screen top level.

Read from the source (nothing imported but focuslens itself), so a new import that breaks the
layout fails here with the offending line, not in a review.
"""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest

import focuslens as fl

PKG = Path(fl.__file__).resolve().parent
#: a folder imports only from core/, tasks/ and the folders before it; the applications sit on top
ORDER = ["core", "tasks", "score", "heads", "intervene", "engine", "directions", "evaluation", "plot", "backends"]


def _modules():
    for f in sorted(PKG.rglob("*.py")):
        if "__pycache__" in f.parts:
            continue
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        yield f, ".".join(parts[:-1] if is_pkg else parts), is_pkg


def _imports():
    """(file, line, importer, imported module, imported names) for every relative/absolute focuslens import."""
    for f, mod, is_pkg in _modules():
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.startswith("focuslens"):
                    yield f, node.lineno, mod, target, [a.name for a in node.names]


def _folder(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ORDER else None


def test_folders_import_only_from_earlier_steps():
    upward = []
    for f, line, mod, target, names in _imports():
        a, b = _folder(mod), _folder(target)
        if a is None:
            continue  # the applications (lens, cli, demo, testing) may import anything
        if target == "focuslens" or b is None or ORDER.index(b) > ORDER.index(a):
            upward.append(f"{f.relative_to(PKG.parent)}:{line} {mod} -> {target} {names}")
    assert upward == []


def test_no_private_name_crosses_a_folder():
    crossing = []
    for f, line, mod, target, names in _imports():
        same_folder = mod.rsplit(".", 1)[0] == target.rsplit(".", 1)[0] and mod.count(".") > 1
        for n in names:
            if n.startswith("_") and not n.startswith("__") and not same_folder:
                crossing.append(f"{f.relative_to(PKG.parent)}:{line} {n} from {target}")
    assert crossing == []


def test_top_level_fits_one_screen_and_every_name_resolves():
    assert len(fl.__all__) <= 30
    assert len(set(fl.__all__)) == len(fl.__all__)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in fl.__all__:
            assert getattr(fl, name) is not None


@pytest.mark.parametrize("name", sorted(__import__("focuslens.deprecations").deprecations.MOVED))
def test_old_top_level_names_warn_and_name_their_new_home(name):
    from focuslens.deprecations import MOVED

    module, attr, instead = MOVED[name]
    with pytest.warns(DeprecationWarning, match=f"focuslens.{name} moved"):
        obj = getattr(fl, name)
    import importlib

    mod = importlib.import_module(module)
    assert obj is (mod if attr is None else getattr(mod, attr))
    assert name not in fl.__all__


def test_unknown_top_level_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        fl.nonexistent  # noqa: B018


def test_each_step_folder_says_what_it_is():
    for folder in ORDER:
        init = PKG / folder / "__init__.py"
        assert init.exists(), folder
        assert ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))), f"{folder}/__init__.py has no docstring"


def test_tests_mirror_the_layout():
    tests = Path(__file__).resolve().parent
    for folder in ORDER:
        assert list((tests / folder).glob("test_*.py")), f"tests/{folder}/ has no tests"


def test_no_import_cycles():
    """Also through imports inside functions: a cycle there is a cycle held together by a late import."""
    mods = {mod for _, mod, is_pkg in _modules() if not is_pkg}
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for _, _, mod, target, names in _imports():
        if mod not in mods:
            continue
        for n in names:
            t = f"{target}.{n}" if f"{target}.{n}" in mods else target
            if t in mods and t != mod:
                edges[mod].add(t)
    # depth-first search for a back edge
    state: dict[str, int] = {}
    cycles = []

    def visit(v: str, path: list[str]) -> None:
        state[v] = 1
        for w in sorted(edges[v]):
            if state.get(w) == 1:
                cycles.append(" -> ".join(path[path.index(w):] + [w]))
            elif w not in state:
                visit(w, path + [w])
        state[v] = 2

    for m in sorted(mods):
        if m not in state:
            visit(m, [m])
    assert cycles == []
